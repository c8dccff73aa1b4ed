"""LoRA adapters: for each targeted projection W, a pair A (W's input axes + rank) and B (rank + W's output axes),
stacked over layers like the base weights; the layer computes x W + scale * (x A) B (see model.project).

B starts at zero, so a fresh adapter leaves the base model's output exactly unchanged. Only the adapters are
trained: the base is a separate, frozen tree (`attach` joins them for the forward pass).

For decoding with many adapters on one base (`gemmatune serve`), `make_bank` stacks several adapters so that each
row of a batch applies its own (model.forward_cached's bank and adapter_ids): nothing is merged or reloaded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gemmatune.config import LoraConfig, ModelConfig
from gemmatune.layout import PROJECTIONS, Params, adapter_shapes, weight_axes


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


def make_bank(entries: Sequence[tuple[Params, LoraConfig] | None], *, size: int | None = None,
              rank: int | None = None) -> list[Params]:
    """Adapters (stacked [L, ...] as saved, any targets and ranks) side by side for per-row application: per layer
    {name: {"a": [N, *inputs, R], "b": [N, R, *outputs]}}, float32, entry n at index n (None: no adapter, zeros).
    Each adapter's scale is folded into its B; ranks are zero-padded to R (the largest, or `rank`) and the bank to
    N = `size` entries (or as many as given), so that adding an adapter rarely changes the shapes (a new compile).
    The padding adds exact zeros to each row's update. Every projection any adapter targets is in the bank."""
    given = [e for e in entries if e is not None]
    names = [n for n in PROJECTIONS if any(n in ad for ad, _ in given)]
    if not names:
        return []
    layers = next(iter(given[0][0].values()))["a"].shape[0]
    R = max([rank or 0] + [lcfg.rank for _, lcfg in given])
    N = max(size or 0, len(entries))
    bank: dict[str, dict[str, np.ndarray]] = {}
    for name in names:
        ad0 = next(ad[name] for ad, _ in given if name in ad)
        a_in, b_out = ad0["a"].shape[1:-1], ad0["b"].shape[2:]
        a = np.zeros((N, layers, *a_in, R), np.float32)
        b = np.zeros((N, layers, R, *b_out), np.float32)
        for n, entry in enumerate(entries):
            if entry is not None and name in entry[0]:
                ad, lcfg = entry[0][name], entry[1]
                a[n, ..., :lcfg.rank] = np.asarray(ad["a"], np.float32)
                b[n, :, :lcfg.rank] = np.asarray(ad["b"], np.float32) * lcfg.scale
        bank[name] = {"a": a, "b": b}
    return [jax.tree.map(lambda t, i=i: jnp.asarray(t[:, i]), bank) for i in range(layers)]
