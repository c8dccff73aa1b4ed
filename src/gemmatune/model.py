"""Gemma 2 and Gemma 3 in JAX: parameters as a pytree of einsum-shaped arrays, the layer stack under `lax.scan`.

Letters in shape comments: B batch, T query tokens, S key slots, D hidden, H query heads, K key/value heads,
G query heads per key/value head (H = K * G), E head_dim, F intermediate, V vocabulary, L layers.

The numbers follow transformers' Gemma2ForCausalLM and Gemma3ForCausalLM (see tests/test_model.py for the parity
checks): embeddings times sqrt(D) in the compute dtype, RMSNorm scaling by (1 + w) in float32, four norms per block,
queries scaled by query_pre_attn_scalar ** -0.5, a sliding window on the local layers, GeGLU with tanh GELU, tied
output projection. Gemma 2 soft-caps the attention logits (before masking) and the final logits; Gemma 3 instead
normalises queries and keys over head_dim before RoPE (QK-norm), and takes RoPE's base and linear scaling per layer
kind (config.rope).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from gemmatune import quantize, sharding
from gemmatune.attention import (
    IMPLS,
    attention_impl,
    cudnn_attention,
    flash_gpu_attention,
    segment_mask,
    splash_attention,
)
from gemmatune.config import LOCAL, LoraConfig, ModelConfig
from gemmatune.layout import PROJECTIONS, Params, is_shape, param_shapes

Cache = dict[str, Any]

# attend(q, k, v) -> (attention output, the layer's new KV cache or None); see `block`.
Attend = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]

NEG_INF = -2.3819763e38  # finite, so a fully masked row (padding) gives a uniform softmax instead of NaN

REMAT = ("none", "block", "full")


def init_params(cfg: ModelConfig, key: jax.Array, dtype: Any = jnp.bfloat16, *,
                norm_mean: float = 0.0, post_norm_mean: float = 0.0) -> Params:
    """Random weights, bfloat16 unless asked (the compute dtype follows the weights). Defaults are small
    (training from scratch); tests pass larger norm means so that a missing
    (1 + w) or a swapped norm changes the output, and greedy decoding of random weights does not collapse."""
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=is_shape)
    paths = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(shapes, is_leaf=is_shape)[0]]
    keys = jax.random.split(key, len(leaves))
    out = []
    for path, shape, k in zip(paths, leaves, keys):
        if "post_" in path and "norm" in path:
            a = post_norm_mean + 0.1 * jax.random.normal(k, shape)
        elif "norm" in path:
            a = norm_mean + 0.1 * jax.random.normal(k, shape)
        elif "embed" in path:
            a = 0.1 * jax.random.normal(k, shape)
        else:
            fan_in = shape[1] if "o_proj" not in path else shape[1] * shape[2]
            a = jax.random.normal(k, shape) / math.sqrt(fan_in)
        out.append(a.astype(dtype))
    return jax.tree.unflatten(treedef, out)


# --- building blocks -------------------------------------------------------------------------------------------

def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """Gemma's RMSNorm: float32 math, scale by (1 + w), cast back (transformers: (x * w).to(dtype))."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * (1.0 + w.astype(jnp.float32))).astype(x.dtype)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    return x if cap is None else jnp.tanh(x / cap) * cap


def rope(x: jax.Array, positions: jax.Array, theta: float, factor: float = 1.0) -> jax.Array:
    """Rotary embedding, rotate-half layout as in the Hugging Face checkpoints. x: [B, T, N, E], positions: [B, T].
    factor: linear scaling (the frequencies divided by it, as transformers' "linear" rope_type)."""
    E = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, E, 2, dtype=jnp.float32) / E))  # [E/2]
    if factor != 1.0:
        inv_freq = inv_freq / factor
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, E/2]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, cap: float | None) -> jax.Array:
    """Grouped-query attention with soft-capped logits. q: [B, T, H, E] (already scaled), k, v: [B, S, K, E],
    mask: [B, T, S] bool. Returns [B, T, H, E]."""
    B, T, H, E = q.shape
    K = k.shape[2]
    q = q.reshape(B, T, K, H // K, E)  # query head h uses key/value head h // G, as transformers' repeat_kv
    logits = jnp.einsum("btkge,bske->bkgts", q, k, preferred_element_type=jnp.float32)
    logits = softcap(logits, cap)  # the cap comes before the mask and the softmax
    logits = jnp.where(mask[:, None, None], logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bske->btkge", probs, v)
    return out.reshape(B, T, H, E)


def project(x: jax.Array, p: Params, names: tuple[str, ...], adapter: LoraConfig | None = None,
            key: jax.Array | None = None) -> list[jax.Array]:
    """x through each projection in `names` (all of which read x), plus its LoRA update
    scale * (dropout(x) A) B where p["lora"] has one.

    The LoRA products run on x flattened to [N, inputs] with A as [inputs, r] and B as [r, outputs]: with the
    einsum layouts (batch and time as separate axes), XLA's CPU backend transposed the [N, outputs] gradient for
    the weight gradient of B, a full extra pass. Projections that read the same x (q, k, v; gate, up) share one
    x A product, with their A's side by side; with dropout each draws its own mask, so each has its own product."""
    ys = [quantize.project(name, x, p[name]) if quantize.is_quantized(p[name]) else
          jnp.einsum(PROJECTIONS[name], x, p[name]) for name in names]
    if "lora_rows" in p:
        return _project_rows(x, ys, p["lora_rows"], names)
    lora = p.get("lora", {})
    adapted = [i for i, name in enumerate(names) if name in lora]
    if not adapted or adapter is None:
        return ys
    n_in = lora[names[adapted[0]]]["a"].ndim - 1  # x's trailing axes that A contracts
    x2 = x.reshape(-1, math.prod(x.shape[x.ndim - n_in:]))  # [N, inputs]
    a2 = [lora[names[i]]["a"].reshape(x2.shape[1], -1) for i in adapted]  # [inputs, r] each
    if adapter.dropout > 0 and key is not None:
        xa = []
        for i, a in zip(adapted, a2):
            keep = jax.random.bernoulli(jax.random.fold_in(key, list(PROJECTIONS).index(names[i])),
                                        1 - adapter.dropout, x2.shape)
            xa.append(jnp.where(keep, x2 / (1 - adapter.dropout), 0).astype(x.dtype) @ a)
    else:
        xa = jnp.split(x2 @ jnp.concatenate(a2, axis=1), len(a2), axis=1)  # [N, r] each
    for i, u in zip(adapted, xa):
        b = lora[names[i]]["b"]
        ys[i] = ys[i] + adapter.scale * (u @ b.reshape(b.shape[0], -1)).reshape(ys[i].shape)
    return ys


def _project_rows(x: jax.Array, ys: list[jax.Array], rows: Params, names: tuple[str, ...]) -> list[jax.Array]:
    """The projections ys of x plus each row's own LoRA update (x A_b) B_b: rows[name] = {"a": [B, *inputs, R],
    "b": [B, R, *outputs]}, the adapter of each row of the batch (lora.Bank.rows), its scale already in B."""
    B, T = x.shape[:2]
    x3 = x.reshape(B, T, -1)  # [B, T, inputs]
    out = list(ys)
    for i, name in enumerate(names):
        if name in rows:
            a, b = rows[name]["a"], rows[name]["b"]
            xa = jnp.einsum("bti,bir->btr", x3, a.reshape(B, x3.shape[-1], -1))  # [B, T, R]
            out[i] = ys[i] + jnp.einsum("btr,bro->bto", xa, b.reshape(B, b.shape[1], -1)).reshape(ys[i].shape)
    return out


def block(x: jax.Array, p: Params, cfg: ModelConfig, kind: str, positions: jax.Array, attend: Attend,
          adapter: LoraConfig | None = None,
          key: jax.Array | None = None) -> tuple[jax.Array, Any]:
    """One decoder layer of `kind` (LOCAL or GLOBAL: its RoPE). `attend(q, k, v) -> (out, cache_update)` supplies
    the keys in view and the mask, so the training path and the KV-cache path share everything else. `adapter`
    (a LoraConfig) scales p["lora"]; `key` draws its dropout."""
    # Compute in x's dtype whatever the weights' (no-op if equal); quantized weights dequantize into it themselves.
    p = {k: v if quantize.is_quantized(v) else jax.tree.map(lambda a: a.astype(x.dtype), v) for k, v in p.items()}

    def proj(h: jax.Array, *names: str) -> list[jax.Array]:
        return project(h, p, names, adapter, key)

    # On a mesh (sharding.active): rows split over data/fsdp, heads and MLP units over model; no-ops elsewhere.
    x = sharding.shard(x, "batch", "seq", "act_embed")
    h = rms_norm(x, p["input_norm"], cfg.rms_norm_eps)
    q, k, v = proj(h, "q_proj", "k_proj", "v_proj")
    if cfg.qk_norm:
        q, k = rms_norm(q, p["q_norm"], cfg.rms_norm_eps), rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
    theta, factor = cfg.rope(kind)
    q = rope(q, positions, theta, factor) * jnp.asarray(cfg.query_pre_attn_scalar ** -0.5, x.dtype)
    q = sharding.shard(q, "batch", "seq", "heads", "head_dim")
    k = sharding.shard(rope(k, positions, theta, factor), "batch", "seq", "kv_heads", "head_dim")
    a, update = attend(q, k, v)
    x = x + rms_norm(proj(a, "o_proj")[0], p["post_attn_norm"], cfg.rms_norm_eps)
    h = rms_norm(x, p["pre_ffw_norm"], cfg.rms_norm_eps)
    gate, up = proj(h, "gate_proj", "up_proj")
    h = sharding.shard(jax.nn.gelu(gate, approximate=True) * up, "batch", "seq", "mlp")  # GeGLU, tanh GELU
    x = x + rms_norm(proj(h, "down_proj")[0], p["post_ffw_norm"], cfg.rms_norm_eps)
    return x, update


def _grouped(layers: Params, repeats: int, pattern: tuple[str, ...]) -> Params:
    """[L, ...] -> [repeats, P, ...], P the pattern's length (L = repeats * P): a free reshape."""
    return jax.tree.map(lambda a: a.reshape(repeats, len(pattern), *a.shape[1:]), layers)


def embed(params: Params, tokens: jax.Array, dtype: Any) -> jax.Array:
    """[B, T] -> [B, T, D]. transformers computes the sqrt(D) normaliser in the compute dtype."""
    x = params["embed"][tokens].astype(dtype)
    return x * jnp.asarray(math.sqrt(params["embed"].shape[1]), dtype)


def logits_from_hidden(params: Params, h: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Final norm, tied output projection, final soft-cap. [..., D] -> float32 [..., V]."""
    return output_logits(rms_norm(h, params["final_norm"], cfg.rms_norm_eps), params["embed"],
                         cfg.final_logit_softcap)


def output_logits(hn: jax.Array, embed: jax.Array, cap: float | None) -> jax.Array:
    """Normed hidden states [..., D] through the tied output projection (embed [V, D]), then the final soft-cap:
    float32 [..., V]."""
    logits = jnp.einsum("...d,vd->...v", hn, embed.astype(hn.dtype), preferred_element_type=jnp.float32)
    return softcap(logits, cap)


# --- full-sequence forward (training, scoring) -----------------------------------------------------------------

def full_attend(cfg: ModelConfig, segment_ids: jax.Array, impl: str) -> dict[str, Attend]:
    """For each layer kind, attend(q, k, v) -> (out, None) over the whole sequence: causal, within segments
    (segment_ids [B, T], 0 marks padding), and within the sliding window on local layers. impl: one of IMPLS
    (gemmatune.attention chooses it: attention_impl)."""
    kinds = set(cfg.layer_types)
    if impl == "splash":
        return {kind: lambda q, k, v, kind=kind: (splash_attention(q, k, v, segment_ids, kind, cfg), None)
                for kind in kinds}
    if impl == "flash":
        return {kind: lambda q, k, v, kind=kind: (flash_gpu_attention(q, k, v, segment_ids, kind, cfg), None)
                for kind in kinds}
    if impl == "cudnn":
        def fused(q: jax.Array, k: jax.Array, v: jax.Array, kind: str) -> tuple[jax.Array, None]:
            # cuDNN's partitioner takes queries, keys and values split alike; block constrains q and k, not v.
            v = sharding.shard(v, "batch", "seq", "kv_heads", "head_dim")
            return cudnn_attention(q, k, v, segment_ids, kind, cfg), None

        return {kind: lambda q, k, v, kind=kind: fused(q, k, v, kind) for kind in kinds}
    if impl != "xla":
        raise ValueError(f"attn_impl must be one of {IMPLS}, got {impl!r}")
    idx = jnp.arange(segment_ids.shape[1])
    causal = idx[None, :] <= idx[:, None]  # [T, S]
    same = segment_mask(segment_ids)  # [B, T, S]
    masks = {kind: same & causal & ((idx[:, None] - idx[None, :] < cfg.sliding_window) if kind == LOCAL else True)
             for kind in kinds}  # [B, T, S] each
    return {kind: lambda q, k, v, m=masks[kind]: (attention(q, k, v, m, cfg.attn_logit_softcap), None)
            for kind in kinds}


def hidden_states(params: Params, tokens: jax.Array, cfg: ModelConfig, *, positions: jax.Array | None = None,
                  segment_ids: jax.Array | None = None, dtype: Any = None, adapter: LoraConfig | None = None,
                  key: jax.Array | None = None, remat: str = "none", attn_impl: str | None = None) -> jax.Array:
    """tokens: [B, T] int. segment_ids: [B, T] int, 0 marks padding; tokens attend only within their segment
    (packed examples). positions: [B, T], restarting at 0 per segment. Returns [B, T, D] before the final norm.

    adapter: the LoraConfig of params["layers"]["lora"] (its scale and dropout); key: the dropout randomness.
    remat: what the backward pass keeps of each layer: "none" everything; "block" only the matrix products
    (norms, activations, softmax recomputed: little extra work); "full" only the layer's input (the layer is
    recomputed: least memory, about one more forward pass of work). attn_impl: one of IMPLS (see
    gemmatune.attention); by default the platform's choice."""
    B, T = tokens.shape
    dtype = dtype or params["embed"].dtype
    if segment_ids is None:
        segment_ids = jnp.ones((B, T), jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    attend = full_attend(cfg, segment_ids, attn_impl or attention_impl(jax.default_backend(), cfg, T, dtype=dtype))

    if remat not in REMAT:
        raise ValueError(f"remat must be one of {REMAT}, got {remat!r}")
    x = embed(params, tokens, dtype)
    # One scan per segment of the stack (cfg.layer_segments); its body is one repeat of the local/global pattern.
    # A segment that is the whole stack scans the weights as xs, reshaped to [repeats, P, ...]. A shorter one (a
    # stack that ends in a partial repeat: Gemma 3 1B, 4B, 27B) reads its layers from the whole stack inside the
    # loop: slicing the stack into xs would make XLA copy every layer's weights (6 GiB on 4B).
    for start, repeats, pattern in cfg.layer_segments:
        whole = repeats * len(pattern) == cfg.num_layers

        def group(x: jax.Array, pg: tuple[Params, jax.Array], start: int = start, pattern: tuple[str, ...] = pattern,
                  whole: bool = whole) -> tuple[jax.Array, None]:
            p, g = pg
            for j, kind in enumerate(pattern):
                i = start + g * len(pattern) + j  # the layer's index in the stack
                pj = jax.tree.map(lambda a, j=j, i=i: a[j] if whole else jax.lax.dynamic_index_in_dim(a, i, 0, False),
                                  p)
                layer_key = None if key is None else jax.random.fold_in(key, i)
                x, _ = block(x, pj, cfg, kind, positions, attend[kind], adapter, layer_key)
            return x, None

        if remat == "block":
            policies = jax.checkpoint_policies
            group = jax.checkpoint(group, policy=policies.save_from_both_policies(
                policies.dots_with_no_batch_dims_saveable, policies.save_only_these_names(quantize.PRODUCT)))
        elif remat == "full":
            group = jax.checkpoint(group, policy=jax.checkpoint_policies.nothing_saveable)
        if whole:
            x, _ = jax.lax.scan(group, x, (_grouped(params["layers"], repeats, pattern), jnp.arange(repeats)))
        else:
            x, _ = jax.lax.scan(lambda x, g, group=group: group(x, (params["layers"], g)), x, jnp.arange(repeats))
    return x


def forward(params: Params, tokens: jax.Array, cfg: ModelConfig, **kw: Any) -> jax.Array:
    """Logits, float32 [B, T, V]. Keyword arguments as `hidden_states`."""
    return logits_from_hidden(params, hidden_states(params, tokens, cfg, **kw), cfg)


# --- KV cache (generation) -------------------------------------------------------------------------------------
# Each row has its own clock: time t counts that row's cache slots from its start, and its real tokens begin at
# time start[b] (left padding before them is masked). Rows advance independently (length [B]), so a serving batch
# can hold requests that began at different moments. Global layers keep every time; local layers keep a ring of
# the last `sliding_window` times (slot = t % W).
#
# Decoding runs the layers in a Python loop over per-layer weights and per-layer caches. Slicing a layer out of
# the stacked [L, ...] arrays inside a scan makes XLA's CPU backend copy that layer's weights at every step, and
# per-layer caches are updated in place.

def unstack(params: Params) -> Params:
    """Stacked layers ({name: [L, ...]}) -> a list of per-layer dicts, the layout `forward_cached` takes.
    Costs one copy of the layer weights; `load_hf(..., stacked=False)` loads this layout directly."""
    layers = params["layers"]
    if isinstance(layers, list):
        return params
    n = len(layers["input_norm"])  # a norm: never quantized, so an array
    return {**params, "layers": [jax.tree.map(lambda a, i=i: a[i], layers) for i in range(n)]}


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any, start: jax.Array | None = None) -> Cache:
    """An empty cache of `batch` rows, `max_len` times each. start: [B], where each row's real tokens begin."""
    kv = []
    for kind in cfg.layer_types:
        size = min(cfg.sliding_window, max_len) if kind == LOCAL else max_len
        kv.append({n: jnp.zeros((batch, size, cfg.num_kv_heads, cfg.head_dim), dtype) for n in ("k", "v")})
    return {"kv": kv, "length": jnp.zeros((batch,), jnp.int32),
            "start": jnp.zeros((batch,), jnp.int32) if start is None else start.astype(jnp.int32)}


def _slot_times(length: jax.Array, size: int, ring: bool) -> jax.Array:
    """The time held by each cache slot once `length` tokens are written ([S]); negative when the slot is empty."""
    s = jnp.arange(size)
    if not ring:
        return jnp.where(s < length, s, -1)
    return (length - 1) - jnp.mod(length - 1 - s, size)  # latest t < length with t % size == s


def _visible(kind: str, cfg: ModelConfig, times: jax.Array, q_times: jax.Array, start: jax.Array) -> jax.Array:
    """Which cache slots each query sees: [B, n, S] from slot times [B, S], query times [B, n] and the rows' starts
    [B]: written, not in the future, within the window on local layers, and not left padding."""
    ok = (times[:, None, :] <= q_times[:, :, None]) & (times[:, None, :] >= start[:, None, None])
    if kind == LOCAL:
        ok &= q_times[:, :, None] - times[:, None, :] < cfg.sliding_window
    return ok  # empty slots hold time -1 < start


def _write_rows(c: jax.Array, x: jax.Array, offsets: jax.Array) -> jax.Array:
    """x [B, n, K, E] written into c [B, S, K, E] at each row's own slot offsets [B]: one in-place update per row
    (a vmapped update would become a scatter, a quarter slower to decode on a CPU)."""
    for b in range(c.shape[0]):
        c = jax.lax.dynamic_update_slice(c, x[b:b + 1], (b, offsets[b], 0, 0))
    return c


def _ring_chunk(kind: str, cfg: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array, c: Params, length: jax.Array,
                start: jax.Array) -> tuple[jax.Array, Params]:
    """One row (q [n, H, E], k, v [n, K, E], c {"k", "v": [W, K, E]}) of a chunk of n > 1 tokens on a local layer's
    ring: it needs the slots it overwrites, so it attends over ring + chunk, then writes."""
    n, size = k.shape[0], c["k"].shape[0]
    q_times = length + jnp.arange(n)
    keys = {"k": jnp.concatenate([c["k"], k]), "v": jnp.concatenate([c["v"], v])}
    times = jnp.concatenate([_slot_times(length, size, True), q_times])
    if n >= size:  # the chunk alone fills the ring: its last `size` tokens, rolled to slot t % size
        shift = jnp.mod(length + n - size, size)
        new = {"k": jnp.roll(k[-size:], shift, axis=0), "v": jnp.roll(v[-size:], shift, axis=0)}
    else:
        slots = jnp.mod(q_times, size)
        new = {"k": c["k"].at[slots].set(k), "v": c["v"].at[slots].set(v)}
    mask = _visible(kind, cfg, times[None], q_times[None], start[None])
    return attention(q[None], keys["k"][None], keys["v"][None], mask, cfg.attn_logit_softcap)[0], new


def _cached_attend(kind: str, cfg: ModelConfig, c: Params, length: jax.Array, start: jax.Array) -> Attend:
    """attend(q, k, v) of a chunk [B, n, ...] against one layer's cache c ({"k", "v": [B, S, K, E]}), each row at
    its own time (length, start: [B])."""
    size = c["k"].shape[1]
    # A local layer's cache is a ring exactly when it holds one window; shorter caches never wrap.
    ring = kind == LOCAL and size == cfg.sliding_window

    def attend(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, Params]:
        n = k.shape[1]
        if ring and n > 1:
            return jax.vmap(lambda *a: _ring_chunk(kind, cfg, *a))(q, k, v, c, length, start)
        # Otherwise write the chunk in place (on a ring, one token overwrites only the slot that just left its
        # window), then attend over the whole cache.
        offsets = jnp.mod(length, size) if ring else length
        new = {"k": _write_rows(c["k"], k, offsets), "v": _write_rows(c["v"], v, offsets)}
        times = _slot_times(length[:, None] + n, size, ring)  # [B, S]
        mask = _visible(kind, cfg, times, length[:, None] + jnp.arange(n), start)
        return attention(q, new["k"], new["v"], mask, cfg.attn_logit_softcap), new

    return attend


def forward_cached(params: Params, tokens: jax.Array, cache: Cache, cfg: ModelConfig, dtype: Any = None, *,
                   last_only: bool = False, bank: list[Params] | None = None,
                   adapter_ids: jax.Array | None = None) -> tuple[jax.Array, Cache]:
    """Run a chunk of tokens [B, n] through the model, reading and extending the cache. params["layers"] is a
    list of per-layer dicts (see `unstack`). Returns float32 logits [B, n, V] ([B, 1, V] with last_only) and the
    new cache. Prefill and single-token decode are the same call.

    bank (lora.Bank.layers: per layer {name: {"a": [N, *inputs, R], "b": [N, R, *outputs]}}) and adapter_ids
    ([B] int, an index into the bank per row) give each row its own LoRA adapter, applied unmerged."""
    dtype = dtype or params["embed"].dtype
    length, start = cache["length"], cache["start"]
    q_times = length[:, None] + jnp.arange(tokens.shape[1])  # [B, n]
    positions = jnp.maximum(q_times - start[:, None], 0)  # padding gets a dummy position
    x = embed(params, tokens, dtype)
    kv = []
    for i, (kind, p, c) in enumerate(zip(cfg.layer_types, params["layers"], cache["kv"], strict=True)):
        if bank:  # each row's A and B, gathered: [B, *inputs, R] and [B, R, *outputs]
            p = {**p, "lora_rows": jax.tree.map(lambda t: t[adapter_ids], bank[i])}
        x, c = block(x, p, cfg, kind, positions, _cached_attend(kind, cfg, c, length, start))
        kv.append(c)
    if last_only:  # a prefill needs only the next token's logits; XLA does not prune an unused [B, n, V]
        x = x[:, -1:]
    return logits_from_hidden(params, x, cfg), {**cache, "kv": kv, "length": length + tokens.shape[1]}
