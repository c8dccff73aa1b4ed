"""Batched text generation with the KV cache: left-padded prompts, one prefill, then one compiled decode step
per token. The host reads only the new token ids each step; everything else stays on the device."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemmatune.config import ModelConfig
from gemmatune.errors import GemmatuneError
from gemmatune.layout import Params
from gemmatune.model import Cache, forward_cached, init_cache, unstack

# Prompt widths and cache lengths are rounded up to this, so calls of similar sizes reuse one compilation.
BUCKET = 8
FINISHED = -1  # what `on_tokens` receives for a row that has stopped


def sample_rows(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, seed: jax.Array,
                step: jax.Array) -> jax.Array:
    """The next token of each row from float32 logits [B, V], each row with its own settings ([B] each): temperature
    0 is greedy; otherwise the logits divided by it, cut to the top_k most likely (0: no cut), then to the smallest
    prefix by decreasing probability whose mass reaches top_p (1: no cut), and sampled with the key of (seed, step):
    a request's draws do not depend on the other rows."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled() -> jax.Array:
        order = jnp.argsort(-logits, axis=-1)  # [B, V], most likely first
        vals = jnp.take_along_axis(logits, order, axis=-1) / jnp.maximum(temperature, 1e-6)[:, None]
        rank = jnp.arange(logits.shape[-1])
        vals = jnp.where((top_k[:, None] == 0) | (rank < top_k[:, None]), vals, -jnp.inf)
        probs = jax.nn.softmax(vals, axis=-1)
        ahead = jnp.cumsum(probs, axis=-1) - probs  # mass before each candidate; 0 for the first
        vals = jnp.where(ahead < top_p[:, None], vals, -jnp.inf)
        keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seed, step)
        choice = jax.vmap(jax.random.categorical)(keys, vals)  # [B]
        pick = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
        return jnp.where(temperature > 0, pick, greedy)

    # The sort over the vocabulary is paid only by steps where some row samples.
    return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda: greedy)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"), donate_argnames=("cache",))
def next_tokens(params: Params, tokens: jax.Array, cache: Cache, bank: list[Params] | None,
                adapter_ids: jax.Array | None, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
                seed: jax.Array, step: jax.Array, *, cfg: ModelConfig, dtype: Any) -> tuple[jax.Array, Cache]:
    """Feed tokens [B, n] (prompts or chunks of them, or each row's last token) and pick each row's next token
    (`sample_rows`, its settings [B] each; step [B]: how many tokens the row has generated). Returns (int32 [B],
    the cache n further). bank and adapter_ids: each row's adapter (model.forward_cached). The one decoding step of
    `generate` and of the serving engine."""
    logits, cache = forward_cached(params, tokens, cache, cfg, dtype, last_only=True, bank=bank,
                                   adapter_ids=adapter_ids)  # [B, 1, V]
    return sample_rows(logits[:, 0], temperature, top_k, top_p, seed, step), cache


Settings = tuple[float, int, float, int]  # one row's (temperature, top_k, top_p, seed), as `settings` takes them


def row_settings(temperature: float, top_k: int | None, top_p: float | None, seed: int) -> Settings:
    """One row's sampling settings: top_k 0 and top_p 1 mean no cut, a top_k past int32 is none either, and any
    integer seeds (reduced to 31 bits)."""
    return (float(temperature), min(int(top_k or 0), 2**31 - 1), 1.0 if top_p is None else float(top_p),
            int(seed) % 2**31)


def settings(rows: Sequence[Settings]) -> tuple[jax.Array, ...]:
    """Per-row settings as `next_tokens` takes them: temperature, top_k, top_p, seed, [B] each."""
    t, k, p, s = zip(*rows)
    return (jnp.asarray(t, jnp.float32), jnp.asarray(k, jnp.int32), jnp.asarray(p, jnp.float32),
            jnp.asarray(s, jnp.int32))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _validate(cfg: ModelConfig, prompts: list[list[int]], max_new_tokens: int, temperature: float,
              top_k: int | None, top_p: float | None) -> None:
    if not prompts:
        raise GemmatuneError("generate: no prompts given; pass at least one prompt (a list of token ids).")
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise GemmatuneError(f"generate: prompt(s) {empty} are empty; every prompt needs at least one token "
                             "(usually <bos>).")
    bad = [i for i, p in enumerate(prompts) if min(p) < 0 or max(p) >= cfg.vocab_size]
    if bad:
        raise GemmatuneError(f"generate: prompt(s) {bad} hold token ids outside the vocabulary "
                             f"[0, {cfg.vocab_size}); was the prompt tokenised for another model?")
    if max_new_tokens < 1:
        raise GemmatuneError(f"generate: max_new_tokens is {max_new_tokens}; it must be at least 1.")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise GemmatuneError(
            f"generate: the longest prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}) is "
            f"{longest + max_new_tokens}, beyond the model's max_position_embeddings ({cfg.max_position_embeddings})."
            f" Lower max_new_tokens to at most {max(cfg.max_position_embeddings - longest, 0)} or shorten the prompt.")
    check_sampling(temperature, top_k, top_p)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """A GemmatuneError for sampling settings that mean nothing (generate and the serving engine alike)."""
    if temperature < 0:
        raise GemmatuneError(f"temperature is {temperature}; use 0 for greedy decoding or a positive value to "
                             "sample.")
    if top_k is not None and top_k < 1:
        raise GemmatuneError(f"top_k is {top_k}; it must be at least 1 (or none for no top-k cut).")
    if top_p is not None and not 0 < top_p <= 1:
        raise GemmatuneError(f"top_p is {top_p}; it must be in (0, 1] (or none for no nucleus cut).")


def generate(params: Params, cfg: ModelConfig, prompts: list[list[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             stop_ids: Sequence[int] = (), dtype: Any = None, bank: list[Params] | None = None,
             adapter_ids: Sequence[int] | None = None,
             on_tokens: Callable[[np.ndarray], None] | None = None) -> list[list[int]]:
    """Continue each prompt (token ids) by up to max_new_tokens tokens; returns only the new ids per row.

    A row ends after a token in stop_ids (not returned) or after max_new_tokens; the loop ends when every row
    has. Sampling is deterministic for a seed, and a row's draws do not depend on the other rows (`sample_rows`).
    `on_tokens` gets each step's tokens, int32 [B], with FINISHED (-1) for rows that have stopped, including a row
    whose token this step was a stop id.
    dtype is the compute and cache dtype (default: the parameters' dtype). bank (lora.make_bank) and adapter_ids
    (one bank index per prompt) give each row its own LoRA adapter, unmerged. Decoding takes per-layer weights:
    stacked parameters are unstacked here, a copy of the layer weights for the call; pass `unstack(params)` (or
    load with `load_hf(..., stacked=False)`) to avoid it."""
    _validate(cfg, prompts, max_new_tokens, temperature, top_k, top_p)
    params = unstack(params)
    B = len(prompts)
    if bank and adapter_ids is not None and len(adapter_ids) != B:
        raise GemmatuneError(f"generate: {len(adapter_ids)} adapter ids for {B} prompts; give one per prompt.")
    lengths = np.array([len(p) for p in prompts])
    width = _round_up(int(lengths.max()), BUCKET)  # extra left padding is masked, so bucketing is free
    tokens = np.full((B, width), cfg.pad_token_id, np.int32)  # [B, width], left-padded
    for b, p in enumerate(prompts):
        tokens[b, width - len(p):] = p
    dtype = jnp.dtype(dtype or params["embed"].dtype)
    cache = init_cache(cfg, B, _round_up(width + max_new_tokens, BUCKET), dtype, jnp.asarray(width - lengths))
    step = functools.partial(next_tokens, params, cfg=cfg, dtype=dtype)
    extra = (bank or None, None if not bank else jnp.asarray(adapter_ids or [0] * B, jnp.int32),
             *settings([row_settings(temperature, top_k, top_p, seed)] * B))
    stops = np.array(sorted(set(stop_ids)), np.int64)

    out: list[list[int]] = [[] for _ in range(B)]
    done = np.zeros(B, bool)
    nxt, cache = step(jnp.asarray(tokens), cache, *extra, jnp.zeros(B, jnp.int32))  # [B]
    for i in range(max_new_tokens):
        current = nxt
        if i + 1 < max_new_tokens:  # queue the next step before reading this one, so the device never idles
            nxt, cache = step(current[:, None], cache, *extra, jnp.full(B, i + 1, jnp.int32))
        ids = np.asarray(current)  # [B]; the one host sync per token
        done |= np.isin(ids, stops)
        shown = np.where(done, FINISHED, ids).astype(np.int32)
        for b in np.flatnonzero(~done):
            out[b].append(int(ids[b]))
        if on_tokens is not None:
            on_tokens(shown)
        if done.all():
            break
    return out
