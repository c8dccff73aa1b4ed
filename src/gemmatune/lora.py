"""LoRA adapters: for each targeted projection W, a pair A (W's input axes + rank) and B (rank + W's output axes),
stacked over layers like the base weights; the layer computes x W + scale * (x A) B (see model.project).

B starts at zero, so a fresh adapter leaves the base model's output exactly unchanged. Only the adapters are
trained: the base is a separate, frozen tree (`attach` joins them for the forward pass).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from gemmatune.config import LoraConfig, ModelConfig
from gemmatune.layout import Params, adapter_shapes, weight_axes


def init_adapters(cfg: ModelConfig, lora_cfg: LoraConfig, key: jax.Array) -> Params:
    """A uniform in +-1/sqrt(fan_in) (PEFT's Kaiming-uniform with a = sqrt(5)), B zero; float32."""
    shapes = adapter_shapes(cfg, lora_cfg)
    keys = jax.random.split(key, len(shapes))
    out = {}
    for k, (name, s) in zip(keys, shapes.items()):
        fan_in = math.prod(s["a"][1:-1])
        bound = 1.0 / math.sqrt(fan_in)
        out[name] = {"a": jax.random.uniform(k, s["a"], jnp.float32, -bound, bound),
                     "b": jnp.zeros(s["b"], jnp.float32)}
    return out


def attach(base: Params, adapters: Params) -> Params:
    """The parameters the model's forward takes: the base with the adapters under layers["lora"]."""
    return {**base, "layers": {**base["layers"], "lora": adapters}}


def delta(name: str, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """scale * A B in W's layout, float32, for stacked layers (or one layer: leading axes broadcast)."""
    w, w_in, w_out = weight_axes(name)
    return scale * jnp.einsum(f"...{w_in}r,...r{w_out}->...{w}", a.astype(jnp.float32), b.astype(jnp.float32))


def merge(base: Params, adapters: Params, lora_cfg: LoraConfig) -> Params:
    """Fold the adapters into the (stacked) base weights: W + scale * A B, computed in float32 and stored in
    W's dtype. The embedding stays tied and untouched (no adapter targets it)."""
    layers = {k: v for k, v in base["layers"].items() if k != "lora"}
    for name, ab in adapters.items():
        w = layers[name]
        layers[name] = (w.astype(jnp.float32) + delta(name, ab["a"], ab["b"], lora_cfg.scale)).astype(w.dtype)
    return {**base, "layers": layers}


def count(tree: Params) -> int:
    return int(sum(np.prod(a.shape) for a in jax.tree.leaves(tree)))
