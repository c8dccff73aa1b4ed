"""The parameter layout, written down once: every array's shape, its logical axes, and the einsum of each
projection. The model, LoRA, sharding, the train step and the converters all read it; it imports nothing of
gemmatune's but the configuration, so it sits at the bottom of the import graph.

Letters of the projection equations: b batch, t tokens, d hidden, h query heads, k key/value heads, e head_dim,
f intermediate (the MLP's hidden units).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from gemmatune.config import LoraConfig, ModelConfig, Quantization
from gemmatune.errors import GemmatuneError

Params = dict[str, Any]  # a tree of arrays (or of shapes, or of logical axes) shaped like `param_shapes`
Shape = tuple[int, ...]
Axes = tuple[str, ...]

# Every projection as an einsum (one layer's weights). LoRA rewrites each into x -> A -> B from the same equation.
PROJECTIONS = {
    "q_proj": "btd,dhe->bthe",
    "k_proj": "btd,dke->btke",
    "v_proj": "btd,dke->btke",
    "o_proj": "bthe,hed->btd",
    "gate_proj": "btd,df->btf",
    "up_proj": "btd,df->btf",
    "down_proj": "btf,fd->btd",
}
NORMS = ("input_norm", "post_attn_norm", "pre_ffw_norm", "post_ffw_norm")
QK_NORMS = ("q_norm", "k_norm")  # Gemma 3: RMSNorm weights over head_dim, on queries and keys before RoPE
# The letters of PROJECTIONS' weight subscripts, as logical axes (sharding.RULES maps these to mesh axes).
LETTERS = {"d": "embed", "h": "heads", "k": "kv_heads", "e": "head_dim", "f": "mlp"}


def is_shape(x: Any) -> bool:
    """A leaf of a tree of shapes (or of logical axes): a tuple."""
    return isinstance(x, tuple)


def norm_names(cfg: ModelConfig) -> tuple[str, ...]:
    """A layer's norm weights: four over the hidden size, and on Gemma 3 two over head_dim (QK_NORMS)."""
    return NORMS + QK_NORMS if cfg.qk_norm else NORMS


def param_shapes(cfg: ModelConfig, quant: Quantization | None = None) -> Params:
    """Every parameter's shape; layer weights are stacked over a leading [L] axis. With `quant`, each projection
    is a dict of its quantized fields' shapes (`quantized_shapes`)."""
    L, D, F, H, K, E, V = (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                           cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size)
    out: Params = {
        "embed": (V, D),
        "final_norm": (D,),
        "layers": {
            **{name: (L, D) for name in NORMS},
            **({name: (L, E) for name in QK_NORMS} if cfg.qk_norm else {}),
            "q_proj": (L, D, H, E),
            "k_proj": (L, D, K, E),
            "v_proj": (L, D, K, E),
            "o_proj": (L, H, E, D),
            "gate_proj": (L, D, F),
            "up_proj": (L, D, F),
            "down_proj": (L, F, D),
        },
    }
    if quant is not None:
        layers = out["layers"]
        for name in PROJECTIONS:
            layers[name] = quantized_shapes(name, layers[name], quant)
    return out


def weight_axes(name: str) -> tuple[str, str, str]:
    """A projection's weight subscripts, those it contracts with x (input) and those it produces (output):
    "o_proj" ("bthe,hed->btd") gives ("hed", "he", "d")."""
    x, w = PROJECTIONS[name].split("->")[0].split(",")
    return w, "".join(c for c in w if c in x), "".join(c for c in w if c not in x)


def target_names(lora_cfg: LoraConfig) -> list[str]:
    """Config targets (q, k, ..., down) -> parameter names (q_proj, ...), in PROJECTIONS' order."""
    return [name for name in PROJECTIONS if name.removesuffix("_proj") in lora_cfg.targets]


def adapter_shapes(cfg: ModelConfig, lora_cfg: LoraConfig) -> Params:
    """{name: {"a": [L, *W's input axes, r], "b": [L, r, *W's output axes]}} for every target."""
    shapes = param_shapes(cfg)["layers"]
    out = {}
    for name in target_names(lora_cfg):
        w, w_in, w_out = weight_axes(name)
        L, dims = shapes[name][0], dict(zip(w, shapes[name][1:]))
        out[name] = {"a": (L, *(dims[c] for c in w_in), lora_cfg.rank),
                     "b": (L, lora_cfg.rank, *(dims[c] for c in w_out))}
    return out


def trainable_shapes(cfg: ModelConfig, tune: str, lora_cfg: LoraConfig) -> Params:
    """The trained tree's shapes: the adapters, or for full fine-tuning every parameter."""
    return param_shapes(cfg) if tune == "full" else adapter_shapes(cfg, lora_cfg)


# --- quantized projections (quantize.py computes them) ------------------------------------------------------------

NESTED_BLOCK = 256  # double quantization: scales per nested block (bitsandbytes' fixed choice)
# The dtype of each field of a quantized weight; the rest ("table", "scale", ...) are float32.
QUANT_DTYPES = {"packed": np.dtype(np.uint32), "codes": np.dtype(np.int8), "scale_codes": np.dtype(np.uint8)}


def stored_order(name: str) -> tuple[str, str]:
    """(output letters, input letters) of a projection. A quantized weight keeps W's own order with the input axes
    flattened, [prod(inputs), *outputs] (every W lists its inputs first: o_proj "hed" is stored [h * e, d]), so
    blocks run along the flattened input and the dequantized weight is W by a reshape. bitsandbytes' [out, in]
    order is the transpose (quantize.from_bnb and to_bnb convert): kept in that order, XLA's TPU compiler copied
    whole layer stacks into the transposed layout its matrix unit reads (README, "Fits in memory")."""
    _, w_in, w_out = weight_axes(name)
    return w_out, w_in


def check_block(name: str, shape: tuple[int, ...], quant: Quantization) -> None:
    """Refuse a block that does not divide a projection's input size: a block would straddle two outputs
    (bitsandbytes allows it, with scales shared between rows; gemmatune keeps blocks within a row, so that codes
    and scales split over a mesh like the weight)."""
    w, w_in, _ = weight_axes(name)
    dims = dict(zip(w, shape[len(shape) - len(w):]))
    size = math.prod(dims[c] for c in w_in)
    if size % quant.block:
        fits = [b for b in (32, 64, 128, 256) if size % b == 0]
        raise GemmatuneError(
            f"quantize_block {quant.block} does not divide {name}'s input size {size}; use a block that does: "
            f"--quantize-block {fits[-1] if fits else 64}.")


def quantized_shapes(name: str, shape: tuple[int, ...], quant: Quantization) -> Params:
    """{field: shape} of a projection weight of `shape` (leading axes, then W's layout) quantized as `quant`; the
    fields are described in quantize.py, their dtypes in QUANT_DTYPES."""
    check_block(name, shape, quant)
    w = weight_axes(name)[0]
    lead, dims = shape[:len(shape) - len(w)], dict(zip(w, shape[len(shape) - len(w):]))
    w_out, w_in = stored_order(name)
    out_dims, size = tuple(dims[c] for c in w_out), math.prod(dims[c] for c in w_in)
    blocks = (*lead, size // quant.block, *out_dims)
    out: Params = ({"codes": (*lead, size, *out_dims)} if quant.kind == "int8" else
                   {"packed": (*lead, size // 8, *out_dims), "table": (*lead, 16)})
    if quant.double:
        out.update(scale_codes=blocks, scale_table=(*lead, 256),
                   scale_absmax=(*lead, -(-math.prod(blocks[len(lead):]) // NESTED_BLOCK)), scale_offset=lead)
    else:
        out["scale"] = blocks
    return out


def leaf_dtype(path: tuple[Any, ...], dtype: Any) -> np.dtype:
    """The dtype of the parameter at `path` (jax tree path) when weights are in `dtype`: quantized fields have
    their own (QUANT_DTYPES, else float32)."""
    keys = [getattr(k, "key", None) for k in path]
    if len(keys) >= 2 and keys[-2] in PROJECTIONS:
        return QUANT_DTYPES.get(keys[-1], np.dtype(np.float32))
    return np.dtype(dtype)


def param_structs(cfg: ModelConfig, dtype: Any, quant: Quantization | None = None) -> Params:
    """Every parameter as a jax.ShapeDtypeStruct (for compiling from shapes and counting bytes)."""
    return jax.tree_util.tree_map_with_path(lambda p, s: jax.ShapeDtypeStruct(s, leaf_dtype(p, dtype)),
                                            param_shapes(cfg, quant), is_leaf=is_shape)


def nbytes(tree: Params) -> int:
    """Bytes of a tree of arrays or ShapeDtypeStructs."""
    return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


# --- logical axes ------------------------------------------------------------------------------------------------

def param_axes(cfg: ModelConfig, quant: Quantization | None = None) -> Params:
    """The logical axes of every parameter, a tree shaped like `param_shapes(cfg, quant)`: projections take theirs
    from PROJECTIONS (quantized codes and scales those of the weight they replace, in stored order; code books and
    nested scales are small and replicated); the rest are the embedding [V, D] and norm weights ([L, D] or [D];
    QK-norms [L, E])."""

    def axes(path: tuple[Any, ...], shape: Shape) -> Axes:
        name = path[-1].key
        if len(path) >= 2 and getattr(path[-2], "key", None) in PROJECTIONS:
            # The flattened input axis splits like its first letter: heads, for o_proj's (heads, head_dim).
            w_out, w_in = stored_order(path[-2].key)
            stored = ("layers", *(LETTERS[c] for c in w_in[0] + w_out))
            if name in ("packed", "codes", "scale", "scale_codes"):
                return stored
            return ("layers",) + (None,) * (len(shape) - 1)
        if name in PROJECTIONS:
            return ("layers", *(LETTERS[c] for c in weight_axes(name)[0]))
        if name == "embed":
            return ("vocab", "embed")
        if name in QK_NORMS:
            return ("layers", "head_dim")
        return ("layers",) * (len(shape) - 1) + ("embed",)

    return jax.tree_util.tree_map_with_path(axes, param_shapes(cfg, quant), is_leaf=is_shape)


def adapter_axes(names: Sequence[str]) -> Params:
    """LoRA adapters' logical axes: A [L, *W's input axes, r], B [L, r, *W's output axes]; the rank axis is
    replicated, so each adapter is split like the weight it adapts."""
    out = {}
    for name in names:
        _, w_in, w_out = weight_axes(name)
        out[name] = {"a": ("layers", *(LETTERS[c] for c in w_in), "lora_rank"),
                     "b": ("layers", "lora_rank", *(LETTERS[c] for c in w_out))}
    return out


def trainable_axes(cfg: ModelConfig, tune: str, lora_cfg: LoraConfig) -> Params:
    """The trained tree's logical axes: the adapters, or for full fine-tuning every parameter."""
    return param_axes(cfg) if tune == "full" else adapter_axes(target_names(lora_cfg))


def per_layer(tree: Params) -> Params:
    """Shapes or axes of the per-layer layout that decoding takes (`model.unstack`): the layer stacks lose their
    leading "layers" axis."""
    return {**tree, "layers": jax.tree.map(lambda a: a[1:], tree["layers"], is_leaf=is_shape)}
