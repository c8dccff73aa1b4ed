"""Conversions between gemmatune's parameter tree and other tools' formats."""

from __future__ import annotations

from pathlib import Path

from gemmatune.config import ModelConfig, load_config
from gemmatune.model import Params, unstack


def model_config(model_dir: str | Path) -> ModelConfig:
    """The config of a Hugging Face directory or a KerasHub preset, without reading any weight."""
    from gemmatune.convert.kerashub import is_kerashub_preset, kerashub_config

    return kerashub_config(model_dir) if is_kerashub_preset(model_dir) else load_config(Path(model_dir) / "config.json")


def load_model(model_dir: str | Path, dtype: str = "auto", *, stacked: bool = True) -> tuple[ModelConfig, Params]:
    """A Gemma 2 checkpoint: a Hugging Face directory, or a KerasHub preset (config.json + model.weights.h5, as
    downloaded from Kaggle), converted on load. stacked=False gives the per-layer list decoding takes."""
    from gemmatune.convert.hf import load_hf
    from gemmatune.convert.kerashub import is_kerashub_preset, load_kerashub

    if is_kerashub_preset(model_dir):
        cfg, params = load_kerashub(model_dir, dtype)
        return cfg, params if stacked else unstack(params)
    return load_hf(model_dir, dtype, stacked=stacked)
