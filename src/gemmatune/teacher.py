"""A teacher's next-token distribution for knowledge distillation, reduced to its top k tokens per position.

For every position of packed rows [B, T], the k most likely next tokens and their log-probabilities at temperature
tau: log_softmax(z / tau) with z the soft-capped output logits (model.output_logits on the final-normed hidden state,
as every scoring path computes them), restricted to the first `vocab` ids and normalised over them. A teacher and a
student of one tokenizer share their first ids (Gemma 3 4B and up have 262,208 embedding rows, 270M and 1B
262,144), so `vocab` is the smaller of the two.

As for every loss (loss.chunked_rows), the logits exist a chunk of positions at a time ([chunk, vocab]), never as
[B, T, vocab].
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from gemmatune.config import ModelConfig
from gemmatune.layout import Params
from gemmatune.loss import chunked_rows
from gemmatune.model import hidden_states


def teacher_topk(params: Params, batch: dict[str, jax.Array], cfg: ModelConfig, *, k: int, temperature: float,
                 vocab: int, chunk: int, dtype: Any = None, attn_impl: str | None = None
                 ) -> tuple[jax.Array, jax.Array]:
    """batch: "inputs", "positions", "segment_ids" [B, T] (data.packing.build_rows). Returns (ids int32 [B, T, k],
    log-probabilities float32 [B, T, k]), each position's top k in descending order of log-probability (ties: the
    lower id first, as jax.lax.top_k). Positions are predicted from the tokens of their own segment only; padding
    positions get a distribution too (of no use: callers skip them). Pure and traceable: jit it."""
    if not 1 <= k <= vocab <= params["embed"].shape[0]:
        raise ValueError(f"need 1 <= k ({k}) <= vocab ({vocab}) <= the teacher's {params['embed'].shape[0]} rows")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    h = hidden_states(params, batch["inputs"], cfg, positions=batch["positions"], segment_ids=batch["segment_ids"],
                      dtype=dtype, attn_impl=attn_impl)  # [B, T, D]
    def top(logits: jax.Array, _: Any) -> tuple[jax.Array, jax.Array]:  # [c, V] -> [c, k] each
        # The ids teacher and student share are the first ones; the logits are cut, not the embedding (a copy).
        logprobs, ids = jax.lax.top_k(jax.nn.log_softmax(logits[:, :vocab] / temperature, axis=-1), k)
        return ids.astype(jnp.int32), logprobs

    return chunked_rows(params, h, cfg, chunk, top, grad=False)
