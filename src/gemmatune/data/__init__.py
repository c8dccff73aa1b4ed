"""The data pipeline: user files -> packed, masked training batches."""
