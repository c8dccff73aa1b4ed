"""Conversions between gemmatune's parameter tree and other tools' formats."""
