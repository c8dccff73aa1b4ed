"""Conversions between gemmatune's parameter tree and other tools' formats."""

from __future__ import annotations

from pathlib import Path

from jax.sharding import Mesh

from gemmatune.config import ModelConfig, Quantization, load_config
from gemmatune.convert.gguf_read import gguf_config, is_gguf, load_gguf
from gemmatune.convert.hf import checkpoint_quantization, load_hf
from gemmatune.convert.kerashub import is_kerashub_preset, kerashub_config, load_kerashub
from gemmatune.layout import Params

__all__ = ["checkpoint_quantization", "load_model", "model_config"]


def load_model(model_dir: str | Path, dtype: str = "auto", *, stacked: bool = True,
               mesh: Mesh | None = None, quant: Quantization | None = None) -> tuple[ModelConfig, Params]:
    """A Gemma 2 or Gemma 3 checkpoint: a Hugging Face directory, a KerasHub preset (config.json +
    model.weights.h5, as downloaded from Kaggle) or a GGUF file (llama.cpp, Ollama), converted on load.
    stacked=False gives the per-layer list decoding takes. With a mesh, the parameters are split over it
    (sharding.param_shardings). With `quant`, the projection weights are quantized as they stream in (QLoRA);
    a Hugging Face checkpoint quantized by bitsandbytes keeps its own codes (see convert.hf.load_hf)."""
    if is_gguf(model_dir):
        return load_gguf(model_dir, dtype, stacked=stacked, mesh=mesh, quant=quant)
    if is_kerashub_preset(model_dir):
        return load_kerashub(model_dir, dtype, stacked=stacked, mesh=mesh, quant=quant)
    return load_hf(model_dir, dtype, stacked=stacked, mesh=mesh, quant=quant)


def model_config(model_dir: str | Path) -> ModelConfig:
    """The configuration of a checkpoint `load_model` reads, without its weights."""
    if is_gguf(model_dir):
        return gguf_config(model_dir)
    return kerashub_config(model_dir) if is_kerashub_preset(model_dir) else load_config(model_dir)
