"""The parameter layout, written down once: every array's shape, its logical axes, and the einsum of each
projection. The model, LoRA, sharding, the train step and the converters all read it; it imports nothing of
gemmatune's but the configuration, so it sits at the bottom of the import graph.

Letters of the projection equations: b batch, t tokens, d hidden, h query heads, k key/value heads, e head_dim,
f intermediate (the MLP's hidden units).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from gemmatune.config import LoraConfig, ModelConfig

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


def param_shapes(cfg: ModelConfig) -> Params:
    """Every parameter's shape; layer weights are stacked over a leading [L] axis."""
    L, D, F, H, K, E, V = (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                           cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size)
    return {
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


def trainable_shapes(cfg: ModelConfig, method: str, lora_cfg: LoraConfig) -> Params:
    """The trained tree's shapes: the adapters, or for full fine-tuning every parameter."""
    return param_shapes(cfg) if method == "full" else adapter_shapes(cfg, lora_cfg)


# --- logical axes ------------------------------------------------------------------------------------------------

def param_axes(cfg: ModelConfig) -> Params:
    """The logical axes of every parameter, a tree shaped like `param_shapes(cfg)`: projections take theirs from
    PROJECTIONS; the rest are the embedding [V, D] and norm weights ([L, D] or [D]; QK-norms [L, E])."""

    def axes(path: tuple[Any, ...], shape: Shape) -> Axes:
        name = path[-1].key
        if name in PROJECTIONS:
            return ("layers", *(LETTERS[c] for c in weight_axes(name)[0]))
        if name == "embed":
            return ("vocab", "embed")
        if name in QK_NORMS:
            return ("layers", "head_dim")
        return ("layers",) * (len(shape) - 1) + ("embed",)

    return jax.tree_util.tree_map_with_path(axes, param_shapes(cfg), is_leaf=is_shape)


def adapter_axes(names: Sequence[str]) -> Params:
    """LoRA adapters' logical axes: A [L, *W's input axes, r], B [L, r, *W's output axes]; the rank axis is
    replicated, so each adapter is split like the weight it adapts."""
    out = {}
    for name in names:
        _, w_in, w_out = weight_axes(name)
        out[name] = {"a": ("layers", *(LETTERS[c] for c in w_in), "lora_rank"),
                     "b": ("layers", "lora_rank", *(LETTERS[c] for c in w_out))}
    return out


def trainable_axes(cfg: ModelConfig, method: str, lora_cfg: LoraConfig) -> Params:
    """The trained tree's logical axes: the adapters, or for full fine-tuning every parameter."""
    return param_axes(cfg) if method == "full" else adapter_axes(target_names(lora_cfg))


def per_layer(tree: Params) -> Params:
    """Shapes or axes of the per-layer layout that decoding takes (`model.unstack`): the layer stacks lose their
    leading "layers" axis."""
    return {**tree, "layers": jax.tree.map(lambda a: a[1:], tree["layers"], is_leaf=is_shape)}
