"""Cross-entropy over the tied output projection, computed a chunk of positions at a time.

Full logits for a batch of 8 x 1024 with Gemma's 256k vocabulary are 2 G floats; here at most `chunk` positions'
logits exist at once. The final soft-cap is applied inside (model.output_logits, as in every scoring path). The loss
comes back as (sum, count) so that gradient accumulation can normalise by the trained tokens of the whole effective
batch.

The gradient with respect to the hidden states is computed in the forward pass, while the chunk's [c, V] logits
exist (a custom VJP): the backward pass then only scales it, so the output projection runs twice per trained token
(logits, then their gradient back to the hidden states) instead of three times (logits, logits again when the
backward pass rematerialises them, gradient). Only the embedding's own gradient (full fine-tuning) recomputes the
logits; with a frozen embedding (LoRA) XLA drops that computation as dead code.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from gemmatune.config import ModelConfig
from gemmatune.layout import Params
from gemmatune.model import output_logits, rms_norm


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

    def body(acc: tuple[jax.Array, jax.Array], xs: tuple[jax.Array, ...]) -> tuple[tuple[jax.Array, ...], None]:
        hc, tc, wc = xs
        hn = rms_norm(hc, params["final_norm"], cfg.rms_norm_eps)  # [c, D]
        s = weighted_nll(hn, params["embed"], tc, wc, cfg.final_logit_softcap)
        return (acc[0] + s, acc[1] + jnp.sum(wc)), None

    (total, count), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)),
                                     (h, targets, weights))
    return total, count


def _nll(hn: jax.Array, embed: jax.Array, targets: jax.Array, cap: float | None
         ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(soft-capped logits [c, V], their logsumexp [c], per-token negative log-likelihood [c]), float32."""
    logits = output_logits(hn, embed, cap)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return logits, lse, lse - jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]


def _dlogits(logits: jax.Array, lse: jax.Array, targets: jax.Array, weights: jax.Array, cap: float | None
             ) -> jax.Array:
    """d sum(w * nll) / d(logits before the soft-cap): w * (softmax - onehot(target)) * (1 - tanh^2). [c, V]."""
    p = jnp.exp(logits - lse[:, None])
    g = jnp.where(jnp.arange(logits.shape[-1]) == targets[:, None], p - 1.0, p) * weights[:, None]
    return g if cap is None else g * (1.0 - jnp.square(logits / cap))  # cap * tanh(z / cap) has slope 1 - tanh^2


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def weighted_nll(hn: jax.Array, embed: jax.Array, targets: jax.Array, weights: jax.Array, cap: float | None
                 ) -> jax.Array:
    """sum(weights * nll) of one chunk: hn [c, D] normed hidden states, embed [V, D], targets, weights [c]."""
    return jnp.sum(_nll(hn, embed, targets, cap)[2] * weights)


def _fwd(hn: jax.Array, embed: jax.Array, targets: jax.Array, weights: jax.Array, cap: float | None
         ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    logits, lse, nll = _nll(hn, embed, targets, cap)
    g = _dlogits(logits, lse, targets, weights, cap).astype(embed.dtype)
    dhn = jnp.einsum("cv,vd->cd", g, embed, preferred_element_type=jnp.float32).astype(hn.dtype)  # [c, D]
    return jnp.sum(nll * weights), (dhn, hn, embed, targets, weights, lse, nll)


def _bwd(cap: float | None, res: tuple[jax.Array, ...], ct: jax.Array) -> tuple[jax.Array, ...]:
    dhn, hn, embed, targets, weights, lse, nll = res
    # The embedding's gradient recomputes the logits; unused (a frozen embedding), XLA removes all of it.
    logits = output_logits(hn, embed, cap)
    g = _dlogits(logits, lse, targets, weights, cap).astype(hn.dtype)
    dembed = jnp.einsum("cv,cd->vd", g, hn, preferred_element_type=jnp.float32)
    return ((ct * dhn).astype(hn.dtype), (ct * dembed).astype(embed.dtype),
            np.zeros(targets.shape, jax.dtypes.float0), ct * nll)


weighted_nll.defvjp(_fwd, _bwd)
