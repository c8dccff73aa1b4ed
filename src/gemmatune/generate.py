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


def sample_logits(logits: jax.Array, key: jax.Array, *, temperature: float, top_k: int | None = None,
                  top_p: float | None = None) -> jax.Array:
    """The next token per row from float32 logits [B, V] -> int32 [B]. temperature 0 is greedy (argmax);
    otherwise the logits are divided by the temperature, cut to the top_k most likely, then to the smallest
    prefix (by decreasing probability) whose mass reaches top_p, and sampled."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is None and top_p is None:
        return jax.random.categorical(key, logits).astype(jnp.int32)
    # Candidates sorted by decreasing logit: the k best (cheap for small k), or all of them when only top-p is set.
    vals, ids = jax.lax.top_k(logits, min(top_k or logits.shape[-1], logits.shape[-1]))  # [B, k] each
    if top_p is not None:
        probs = jax.nn.softmax(vals, axis=-1)
        ahead = jnp.cumsum(probs, axis=-1) - probs  # mass of the candidates before this one; exactly 0 for the first
        vals = jnp.where(ahead < top_p, vals, -jnp.inf)
    choice = jax.random.categorical(key, vals)  # [B] index into the candidates
    return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype", "temperature", "top_k", "top_p"),
                   donate_argnames=("cache",))
def _step(params: Params, tokens: jax.Array, cache: Cache, key: jax.Array, bank: list[Params] | None,
          adapter_ids: jax.Array | None, *, cfg: ModelConfig, dtype: Any, temperature: float, top_k: int | None,
          top_p: float | None) -> tuple[jax.Array, Cache]:
    """Feed tokens [B, n] (the padded prompts, or the last sampled token with n = 1) and sample the next one.
    Returns ([B, 1] int32, the new cache); the [B, 1] output is the next call's input as is."""
    # Folding in the time gives every step fresh randomness without threading a key through the loop.
    key = jax.random.fold_in(key, cache["length"][0])  # every row of a generate batch shares the clock
    logits, cache = forward_cached(params, tokens, cache, cfg, dtype, last_only=True, bank=bank,
                                   adapter_ids=adapter_ids)  # [B, 1, V]
    nxt = sample_logits(logits[:, 0], key, temperature=temperature, top_k=top_k, top_p=top_p)
    return nxt[:, None], cache


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
    if temperature < 0:
        raise GemmatuneError(f"generate: temperature is {temperature}; use 0 for greedy decoding or a positive "
                             "value to sample.")
    if top_k is not None and top_k < 1:
        raise GemmatuneError(f"generate: top_k is {top_k}; it must be at least 1 (or None for no top-k cut).")
    if top_p is not None and not 0 < top_p <= 1:
        raise GemmatuneError(f"generate: top_p is {top_p}; it must be in (0, 1] (or None for no nucleus cut).")


def generate(params: Params, cfg: ModelConfig, prompts: list[list[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             stop_ids: Sequence[int] = (), dtype: Any = None, bank: list[Params] | None = None,
             adapter_ids: Sequence[int] | None = None,
             on_tokens: Callable[[np.ndarray], None] | None = None) -> list[list[int]]:
    """Continue each prompt (token ids) by up to max_new_tokens tokens; returns only the new ids per row.

    A row ends after a token in stop_ids (not returned) or after max_new_tokens; the loop ends when every row
    has. Sampling is deterministic for a seed. `on_tokens` gets each step's tokens, int32 [B], with FINISHED (-1)
    for rows that have stopped, including a row whose token this step was a stop id.
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
    # Static sampling settings: one compilation per setting; greedy ignores the cuts, and these cuts are no-ops.
    greedy = temperature == 0
    step = functools.partial(
        _step, params, cfg=cfg, dtype=dtype, temperature=float(temperature),
        top_k=None if greedy or top_k is None or top_k >= cfg.vocab_size else int(top_k),
        top_p=None if greedy or top_p is None or top_p >= 1 else float(top_p))
    key = jax.random.key(seed)
    step = functools.partial(step, bank=bank or None,
                             adapter_ids=None if not bank else jnp.asarray(adapter_ids or [0] * B, jnp.int32))
    stops = np.array(sorted(set(stop_ids)), np.int64)

    out: list[list[int]] = [[] for _ in range(B)]
    done = np.zeros(B, bool)
    nxt, cache = step(jnp.asarray(tokens), cache, key)  # [B, 1]
    for i in range(max_new_tokens):
        current = nxt
        if i + 1 < max_new_tokens:  # queue the next step before reading this one, so the device never idles
            nxt, cache = step(current, cache, key)
        ids = np.asarray(current)[:, 0]  # [B]; the one host sync per token
        done |= np.isin(ids, stops)
        shown = np.where(done, FINISHED, ids).astype(np.int32)
        for b in np.flatnonzero(~done):
            out[b].append(int(ids[b]))
        if on_tokens is not None:
            on_tokens(shown)
        if done.all():
            break
    return out
