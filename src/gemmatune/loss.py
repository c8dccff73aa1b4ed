"""Cross-entropy over the tied output projection, computed a chunk of positions at a time.

Full logits for a batch of 8 x 1024 with Gemma's 256k vocabulary are 2 G floats; here at most `chunk` positions'
logits exist at once, in the forward and (each chunk is rematerialised) in the backward pass. The final soft-cap is
applied inside (model.logits_from_hidden), as in every scoring path. The loss comes back as (sum, count) so that
gradient accumulation can normalise by the trained tokens of the whole effective batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gemmatune.config import ModelConfig
from gemmatune.model import Params, logits_from_hidden


def chunked_loss(params: Params, h: jax.Array, targets: jax.Array, weights: jax.Array, cfg: ModelConfig,
                 chunk: int) -> tuple[jax.Array, jax.Array]:
    """h: [B, T, D] hidden states (before the final norm); targets: [B, T] int; weights: [B, T] (1 on trained
    targets). Returns (sum of weighted negative log-likelihoods, sum of weights), float32 scalars."""
    B, T, D = h.shape
    n = B * T
    chunk = min(chunk, n)
    pad = -n % chunk
    # Positions of all rows flattened, padded with zero-weight positions to whole chunks: [N / c, c, ...].
    h = jnp.pad(h.reshape(n, D), ((0, pad), (0, 0))).reshape(-1, chunk, D)
    targets = jnp.pad(targets.reshape(n), (0, pad)).reshape(-1, chunk)
    weights = jnp.pad(weights.reshape(n).astype(jnp.float32), (0, pad)).reshape(-1, chunk)

    @jax.checkpoint  # keep only the chunk's inputs for the backward pass, never its [c, V] logits
    def one(hc: jax.Array, tc: jax.Array, wc: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = logits_from_hidden(params, hc[None], cfg)[0]  # [c, V] float32, soft-capped
        nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
        return jnp.sum(nll * wc), jnp.sum(wc)

    def body(acc: tuple[jax.Array, jax.Array], xs: tuple[jax.Array, ...]) -> tuple[tuple[jax.Array, ...], None]:
        s, c = one(*xs)
        return (acc[0] + s, acc[1] + c), None

    (total, count), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)),
                                     (h, targets, weights))
    return total, count
