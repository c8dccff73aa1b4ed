"""Fused (flash) attention for NVIDIA GPUs, written in Pallas with the Triton lowering, forward and backward.

It computes exactly the attention of model.attention: logits q.k (q already scaled), Gemma 2's soft-cap
cap * tanh(logits / cap) before anything else, then causal masking, the sliding window on local layers (key s is
seen from query t when t - W < s <= t), packed rows (a query sees keys of its own segment, never padding: segment
0), and grouped-query heads (query head h reads key/value head h // G, as transformers' repeat_kv). No [T, S] array
is stored: each program holds one tile of queries (or keys) and walks over the tiles of the other side with an
online softmax (FlashAttention-2), skipping the tiles that the causal mask, the window and (in packed rows) the
other examples' segments exclude. The backward pass recomputes the probabilities from the saved log-sum-exp, in
two kernels: one over key tiles (dK and dV of one key/value head, its G query heads walked in the same program),
one over query tiles (dQ), so that each program owns its output and nothing needs atomics.

Off a GPU the same kernels run in Pallas interpret mode: the tests check them there against the XLA path.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

# A finite stand-in for -inf: a query whose keys are all masked (padding) then gets a uniform softmax over the
# keys it visited instead of NaN, and nothing computes inf - inf. Its output is read by nothing.
MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tile sizes: queries and keys per program of the forward pass (q, k) and of both backward kernels (bwd_q,
    bwd_k), and Triton's warps and pipeline stages. Powers of two; each must divide the sequence."""

    q: int
    k: int
    bwd_q: int
    bwd_k: int
    warps: int
    stages: int

    def divide(self, seq_len: int) -> bool:
        """Whether every tile divides a sequence of seq_len."""
        return not any(seq_len % n for n in (self.q, self.k, self.bwd_q, self.bwd_k))


# Per head_dim, untuned (no GPU has run them yet; benchmarks/attention.py --sweep times alternatives). A program
# holds a [q, head_dim] query tile and its float32 accumulator in registers and streams [k, head_dim] key and
# value tiles through shared memory, `stages` deep. They are sized for the smallest shared memory of the GPUs the
# kernel is chosen on, about 100 KiB per SM on the RTX 30/40 series (A100 164, H100 228): at head_dim 256 (Gemma 2
# 2B/9B, Gemma 3 below 27B) one stage of key and value tiles of 32 is 32 KiB. Eight warps above head_dim 64, as
# jax's own Triton attention chooses. The backward kernels keep two accumulators (dK and dV, or dQ) and recompute
# the probabilities, so their tiles are smaller.
BLOCKS: dict[int, Blocks] = {
    64: Blocks(q=128, k=64, bwd_q=64, bwd_k=64, warps=4, stages=2),
    128: Blocks(q=128, k=64, bwd_q=64, bwd_k=64, warps=8, stages=2),
    256: Blocks(q=64, k=32, bwd_q=32, bwd_k=32, warps=8, stages=2),
}


def blocks_for(head_dim: int, seq_len: int) -> Blocks | None:
    """The tiles for this head_dim, or None where the kernel does not apply (another head_dim, or a sequence that
    some tile does not divide)."""
    b = BLOCKS.get(head_dim)
    return b if b is not None and b.divide(seq_len) else None


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    """A 2-D matrix product contracting a's axis contract[0] with b's contract[1], accumulated in float32. Float32
    inputs are multiplied as float32 (Triton would otherwise round them to TF32)."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, ((contract[:1], contract[1:]), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def _scores(q: jax.Array, k: jax.Array, cap: float | None) -> tuple[jax.Array, jax.Array | None]:
    """[bq, E] x [bk, E] -> the soft-capped logits float32 [bq, bk] and tanh(logits / cap) (None without a cap),
    whose 1 - t^2 is the cap's derivative."""
    s = _dot(q, k, (1, 1))
    if cap is None:
        return s, None
    t = jnp.tanh(s / cap)
    return cap * t, t


def _visible(rows: jax.Array, cols: jax.Array, seg_q: jax.Array, seg_k: jax.Array, window: int | None
             ) -> jax.Array:
    """[bq] query and [bk] key positions and segments -> bool [bq, bk]: causal, within the window, same segment,
    key not padding."""
    mask = (cols[None, :] <= rows[:, None]) & (seg_q[:, None] == seg_k[None, :]) & (seg_k[None, :] != 0)
    if window is not None:
        mask &= rows[:, None] - cols[None, :] < window
    return mask


def _key_blocks(q_start: jax.Array, bq: int, bk: int, window: int | None) -> tuple[jax.Array, jax.Array]:
    """The key blocks [lo, hi) that queries q_start .. q_start + bq - 1 may see: up to the last query (causal), and
    from the first query's window start on."""
    hi = lax.div(q_start + bq + bk - 1, bk)
    lo = 0 if window is None else lax.div(lax.max(q_start - (window - 1), 0), bk)
    return lo, hi


def _query_blocks(k_start: jax.Array, bq: int, bk: int, window: int | None, n_q: int
                  ) -> tuple[jax.Array, jax.Array]:
    """The query blocks [lo, hi) that may see keys k_start .. k_start + bk - 1: from the first key on (causal), up
    to the last key's window end."""
    lo = lax.div(k_start, bq)
    hi = n_q if window is None else lax.min(lax.div(k_start + bk - 1 + window - 1, bq) + 1, n_q)
    return lo, hi


def _segment_extent(seg: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[B, T] segment ids -> the first and the last position of each position's segment, [B, T] each (the last is
    -1 for padding keys, which nothing sees). Ids are clipped to [0, T]: ids the clip merges only widen the extent,
    which stays a safe bound."""
    B, T = seg.shape
    ids = jnp.clip(seg, 0, T)
    rows = jnp.arange(B)[:, None]
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    first = jnp.full((B, T + 1), T, jnp.int32).at[rows, ids].min(pos)
    last = jnp.full((B, T + 1), -1, jnp.int32).at[rows, ids].max(pos)
    return (jnp.take_along_axis(first, ids, axis=1),
            jnp.where(seg == 0, -1, jnp.take_along_axis(last, ids, axis=1)))


def _first_key_block(first: jax.Array, bq: int, bk: int) -> jax.Array:
    """[B, T] first positions -> [B, T // bq]: the first key block any query of each query block may see. With
    packed rows this skips the blocks of earlier examples, which the causal bound alone would visit."""
    B, T = first.shape
    return first.reshape(B, T // bq, bq).min(axis=2) // bk


def _query_block_end(last: jax.Array, bq: int, bk: int) -> jax.Array:
    """[B, T] last positions -> [B, T // bk]: one past the last query block that may see each key block (0 for a
    block of padding)."""
    B, T = last.shape
    return last.reshape(B, T // bk, bk).max(axis=2) // bq + 1


# --- kernels (one program: one row b; one query head, or for dK and dV one key/value head; one tile) -------------

def _forward_kernel(first_ref, seg_q_ref, seg_k_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, cap: float | None,
                    window: int | None, bq: int, bk: int) -> None:
    q_start = pl.program_id(2) * bq
    q = q_ref[...]  # [bq, E]
    rows = q_start + jnp.arange(bq)
    seg_q = seg_q_ref[...]  # [bq]

    def body(j: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        acc, m, total = carry  # [bq, E] float32, running max [bq], running sum of exp [bq]
        keys = pl.ds(pl.multiple_of(j * bk, bk), bk)
        s, _ = _scores(q, k_ref[keys, :], cap)
        s = jnp.where(_visible(rows, j * bk + jnp.arange(bk), seg_q, seg_k_ref[keys], window), s, MASKED)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.exp(s - m_new[:, None])
        alpha = jnp.exp(m - m_new)  # rescales what was summed under the old max
        v = v_ref[keys, :]
        return acc * alpha[:, None] + _dot(p.astype(v.dtype), v, (1, 0)), m_new, total * alpha + jnp.sum(p, axis=1)

    lo, hi = _key_blocks(q_start, bq, bk, window)
    lo = lax.max(lo, jnp.min(first_ref[...]))  # blocks before the block's segments hold no key it may see
    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq,), MASKED, jnp.float32), jnp.zeros((bq,), jnp.float32))
    acc, m, total = lax.fori_loop(lo, hi, body, init)
    o_ref[...] = (acc / total[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(total)


def _probs_and_dlogits(q: jax.Array, k: jax.Array, v: jax.Array, do: jax.Array, lse: jax.Array, delta: jax.Array,
                       mask: jax.Array, cap: float | None) -> tuple[jax.Array, jax.Array]:
    """The probabilities [bq, bk] of a block, recomputed from the log-sum-exp, and the gradient of the loss with
    respect to the uncapped logits q.k. Masked entries are exactly 0 in both (a padding query's uniform softmax
    passes nothing back)."""
    s, t = _scores(q, k, cap)
    p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
    ds = p * (_dot(do, v, (1, 1)) - delta[:, None])  # softmax backward: p * (dP - rowsum(dO * O))
    if t is not None:
        ds = ds * (1.0 - t * t)  # d(cap * tanh(x / cap)) / dx
    return p, ds


def _dkv_kernel(end_ref, seg_q_ref, seg_k_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                cap: float | None, window: int | None, bq: int, bk: int, n_q: int, groups: int) -> None:
    # One key/value head: q_ref, do_ref [T, G, E] and lse_ref, delta_ref [G, T] hold its G query heads.
    k_start = pl.program_id(2) * bk
    k, v = k_ref[...], v_ref[...]  # [bk, E]
    cols = k_start + jnp.arange(bk)
    seg_k = seg_k_ref[...]

    def body(i: jax.Array, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        dk, dv = carry
        queries = pl.ds(pl.multiple_of(i * bq, bq), bq)
        mask = _visible(i * bq + jnp.arange(bq), cols, seg_q_ref[queries], seg_k, window)  # shared by the group
        for g in range(groups):
            q, do = q_ref[queries, g, :], do_ref[queries, g, :]
            p, ds = _probs_and_dlogits(q, k, v, do, lse_ref[g, queries], delta_ref[g, queries], mask, cap)
            dk, dv = dk + _dot(ds.astype(q.dtype), q, (0, 0)), dv + _dot(p.astype(do.dtype), do, (0, 0))
        return dk, dv

    lo, hi = _query_blocks(k_start, bq, bk, window, n_q)
    hi = lax.min(hi, jnp.max(end_ref[...]))  # blocks after the keys' segments hold no query that sees them
    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(lo, hi, body, (zeros, zeros))
    dk_ref[...], dv_ref[...] = dk.astype(dk_ref.dtype), dv.astype(dv_ref.dtype)


def _dq_kernel(first_ref, seg_q_ref, seg_k_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               cap: float | None, window: int | None, bq: int, bk: int) -> None:
    q_start = pl.program_id(2) * bq
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    rows = q_start + jnp.arange(bq)
    seg_q = seg_q_ref[...]

    def body(j: jax.Array, dq: jax.Array) -> jax.Array:
        keys = pl.ds(pl.multiple_of(j * bk, bk), bk)
        k = k_ref[keys, :]
        mask = _visible(rows, j * bk + jnp.arange(bk), seg_q, seg_k_ref[keys], window)
        _, ds = _probs_and_dlogits(q, k, v_ref[keys, :], do, lse, delta, mask, cap)
        return dq + _dot(ds.astype(k.dtype), k, (1, 0))

    lo, hi = _key_blocks(q_start, bq, bk, window)
    lo = lax.max(lo, jnp.min(first_ref[...]))
    dq_ref[...] = lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32)).astype(dq_ref.dtype)


# --- the calls -----------------------------------------------------------------------------------------------------

def _compiler(blocks: Blocks, interpret: bool) -> dict[str, Any]:
    if interpret:
        return {"interpret": True}
    from jax.experimental.pallas import triton as plt  # imported only for a GPU: the backend is GPU-only

    return {"compiler_params": plt.CompilerParams(num_warps=blocks.warps, num_stages=blocks.stages)}


def _query_specs(T: int, E: int, G: int, bq: int) -> list[pl.BlockSpec]:
    """BlockSpecs for (the tile's first key block, segment ids of the query tile, segment ids of all keys, q, k, v)
    on a grid (B, H, T // bq) over query tiles: the keys are whole, walked by the kernel. The first key block
    ([B, T // bq] int32, _first_key_block) comes as a block of one."""
    kv_whole = pl.BlockSpec((None, T, None, E), lambda b, h, i: (b, 0, h // G, 0))
    return [pl.BlockSpec((None, 1), lambda b, h, i: (b, i)), pl.BlockSpec((None, bq), lambda b, h, i: (b, i)),
            pl.BlockSpec((None, T), lambda b, h, i: (b, 0)),
            pl.BlockSpec((None, bq, None, E), lambda b, h, i: (b, i, h, 0)), kv_whole, kv_whole]


def _forward(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array, cap: float | None, window: int | None,
             blocks: Blocks, interpret: bool) -> tuple[jax.Array, jax.Array]:
    B, T, H, E = q.shape
    G = H // k.shape[2]
    kernel = functools.partial(_forward_kernel, cap=cap, window=window, bq=blocks.q, bk=blocks.k)
    return pl.pallas_call(
        kernel, grid=(B, H, T // blocks.q), in_specs=_query_specs(T, E, G, blocks.q),
        out_specs=[pl.BlockSpec((None, blocks.q, None, E), lambda b, h, i: (b, i, h, 0)),
                   pl.BlockSpec((None, None, blocks.q), lambda b, h, i: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, H, T), jnp.float32)],
        name="gemma_flash_forward", **_compiler(blocks, interpret),
    )(_first_key_block(_segment_extent(seg)[0], blocks.q, blocks.k), seg, seg, q, k, v)  # out, lse [B, H, T]


def _backward(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array, o: jax.Array, lse: jax.Array,
              do: jax.Array, cap: float | None, window: int | None, blocks: Blocks, interpret: bool
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
    B, T, H, E = q.shape
    K = k.shape[2]
    G = H // K
    bq, bk = blocks.bwd_q, blocks.bwd_k
    first, last = _segment_extent(seg)
    delta = jnp.einsum("bthe,bthe->bht", o.astype(jnp.float32), do.astype(jnp.float32))  # rowsum(dO * O) [B, H, T]
    rows_tile = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))
    compiler = _compiler(blocks, interpret)

    # dK and dV: one program per key/value head and key tile, walking the query tiles of its G query heads (q and
    # dO viewed as [B, T, K, G, E], the log-sum-exp and delta as [B, K, G, T]).
    kv_tile = pl.BlockSpec((None, bk, None, E), lambda b, h, i: (b, i, h, 0))
    group = pl.BlockSpec((None, T, None, G, E), lambda b, h, i: (b, 0, h, 0, 0))
    group_rows = pl.BlockSpec((None, None, G, T), lambda b, h, i: (b, h, 0, 0))
    q5, do5 = (x.reshape(B, T, K, G, E) for x in (q, do))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cap=cap, window=window, bq=bq, bk=bk, n_q=T // bq, groups=G),
        grid=(B, K, T // bk),
        in_specs=[pl.BlockSpec((None, 1), lambda b, h, i: (b, i)), pl.BlockSpec((None, T), lambda b, h, i: (b, 0)),
                  pl.BlockSpec((None, bk), lambda b, h, i: (b, i)), group, kv_tile, kv_tile, group, group_rows,
                  group_rows],
        out_specs=[kv_tile, kv_tile], out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
        name="gemma_flash_dkv", **compiler,
    )(_query_block_end(last, bq, bk), seg, seg, q5, k, v, do5, lse.reshape(B, K, G, T), delta.reshape(B, K, G, T))
    qs = _query_specs(T, E, G, bq)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cap=cap, window=window, bq=bq, bk=bk),
        grid=(B, H, T // bq), in_specs=[*qs, qs[3], rows_tile, rows_tile], out_specs=qs[3],
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), name="gemma_flash_dq", **compiler,
    )(_first_key_block(first, bq, bk), seg, seg, q, k, v, do, lse, delta)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array, cap: float | None, window: int | None,
           blocks: Blocks, interpret: bool) -> jax.Array:
    return _forward(q, k, v, seg, cap, window, blocks, interpret)[0]


def _flash_fwd(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array, cap: float | None, window: int | None,
               blocks: Blocks, interpret: bool) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    o, lse = _forward(q, k, v, seg, cap, window, blocks, interpret)
    return o, (q, k, v, seg, o, lse)


def _flash_bwd(cap: float | None, window: int | None, blocks: Blocks, interpret: bool,
               res: tuple[jax.Array, ...], do: jax.Array) -> tuple[jax.Array | None, ...]:
    q, k, v, seg, o, lse = res
    return (*_backward(q, k, v, seg, o, lse, do, cap, window, blocks, interpret), None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *, cap: float | None,
                    window: int | None, blocks: Blocks | None = None, interpret: bool | None = None) -> jax.Array:
    """Causal attention with soft-capped logits (cap None: none), within `window` keys back (None: all), tokens
    attending only within their segment (0: padding). q: [B, T, H, E] already scaled; k, v: [B, T, K, E] with K
    dividing H; segment_ids: [B, T]. Returns [B, T, H, E] in q's dtype. blocks: the tiles (default: BLOCKS for
    head_dim, which must divide T); interpret: run in Pallas interpret mode (default: off a GPU)."""
    B, T, H, E = q.shape
    if H % k.shape[2]:
        raise ValueError(f"{k.shape[2]} key/value heads do not divide {H} query heads")
    blocks = blocks or blocks_for(E, T)
    if blocks is None or not blocks.divide(T):
        raise ValueError(f"no flash attention tiles for head_dim {E} that divide a sequence of {T}")
    if interpret is None:
        interpret = jax.default_backend() not in ("gpu", "cuda")
    window = None if window is not None and window >= T else window  # a window as long as the row masks nothing
    return _flash(q, k, v, segment_ids.astype(jnp.int32), None if cap is None else float(cap), window, blocks,
                  interpret)

