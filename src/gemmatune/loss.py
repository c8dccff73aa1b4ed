"""Losses over the tied output projection, computed a chunk of positions at a time.

Full logits for a batch of 8 x 1024 with Gemma's 256k vocabulary are 2 G floats; here at most `chunk` positions'
logits exist at once. The final soft-cap is applied inside (model.output_logits, as in every scoring path).

Every objective is a row loss: a function of one position's logits (and that position's extra inputs: its target,
a teacher's logits) to that position's loss, `RowLoss`. `chunked_rows` applies one to every position and returns
the per-position losses [B, T]; the objectives (step.py) weight and combine them: next-token cross-entropy (`nll`),
DPO's sums over each response, a distillation divergence (`distill`).

The gradient with respect to the hidden states is computed in the forward pass, while the chunk's [c, V] logits
exist (a custom VJP): a row's loss depends on its own logits only, so its gradient is d loss_t / d h_t, kept as a
[c, D] residual that the backward pass only scales by the loss's cotangent. The output projection thus runs twice
per trained token (logits, then their gradient back to the hidden states) instead of three times (logits, logits
again when the backward pass rematerialises them, gradient). Only the embedding's own gradient (full fine-tuning)
recomputes the logits; with a frozen embedding (LoRA) XLA drops that computation as dead code.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemmatune.config import ModelConfig
from gemmatune.layout import Params
from gemmatune.model import output_logits, rms_norm, softcap

# fn(logits [c, V] float32 after the soft-cap, extra) -> (loss [c], metrics {name: [c]}); row t's loss and metrics
# depend on row t of logits and of extra's arrays only. Metrics carry no gradient.
RowLoss = Callable[[jax.Array, Any], tuple[jax.Array, dict[str, jax.Array]]]


def chunked_rows(params: Params, h: jax.Array, cfg: ModelConfig, chunk: int, fn: RowLoss, rows: Any = None,
                 shared: Any = None, grad: bool = True) -> Any:
    """fn at every position: h [B, T, D] hidden states (before the final norm); rows: a pytree of [B, T, ...]
    arrays, each position's extra inputs; shared: a pytree given whole to every chunk (a teacher's weights).
    fn receives (logits [c, V], (rows' chunk, shared)). Returns (loss [B, T], metrics {name: [B, T]}), float32.
    grad=False: no gradient is wanted (a frozen model), so none is computed, and fn may return any pytree of
    [c, ...] arrays, returned as [B, T, ...]."""
    B, T, D = h.shape
    n = B * T
    chunk = min(chunk, n)
    pad = -n % chunk

    def chunks(a: jax.Array) -> jax.Array:  # [B, T, ...] -> [N / c, c, ...], padded with zeros to whole chunks
        a = a.reshape(n, *a.shape[2:])
        return jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape(-1, chunk, *a.shape[1:])

    def body(_: None, xs: tuple[jax.Array, Any]) -> tuple[None, Any]:
        hc, rc = xs
        hn = rms_norm(hc, params["final_norm"], cfg.rms_norm_eps)  # [c, D]
        if grad:
            return None, row_losses(fn, cfg.final_logit_softcap, hn, params["embed"], (rc, shared))
        return None, fn(output_logits(hn, params["embed"], cfg.final_logit_softcap), (rc, shared))

    _, out = jax.lax.scan(body, None, (chunks(h), jax.tree.map(chunks, rows)))  # [N / c, c, ...] each
    return jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:])[:n].reshape(B, T, *a.shape[2:]), out)


def chunked_loss(params: Params, h: jax.Array, targets: jax.Array, weights: jax.Array, cfg: ModelConfig,
                 chunk: int) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy: h [B, T, D]; targets [B, T] int; weights [B, T] (1 on trained targets). Returns (sum of
    weighted negative log-likelihoods, sum of weights), float32 scalars."""
    weights = weights.astype(jnp.float32)
    loss, _ = chunked_rows(params, h, cfg, chunk, nll, targets)
    return jnp.sum(loss * weights), jnp.sum(weights)


def nll(logits: jax.Array, extra: tuple[jax.Array, Any]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """RowLoss: the negative log-likelihood of each row's target (extra: (targets [c], _))."""
    targets = extra[0]
    return token_nll(logits, targets), {}


@jax.custom_vjp
def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log softmax(logits)[target]: logits [c, V], targets [c] -> [c]. Its gradient is written out, softmax minus
    a one-hot made by comparison: autodiff's would scatter into [c, V] zeros, and a compare-and-select in the
    forward pass costs XLA one more [c, V] buffer."""
    return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]


def _nll_fwd(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    lse = jax.nn.logsumexp(logits, axis=-1)
    return lse - jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0], (logits, lse, targets)


def _nll_bwd(res: tuple[jax.Array, ...], ct: jax.Array) -> tuple[jax.Array, np.ndarray]:
    logits, lse, targets = res
    p = jnp.exp(logits - lse[:, None])
    g = jnp.where(jnp.arange(logits.shape[-1]) == targets[:, None], p - 1.0, p) * ct[:, None]
    return g, np.zeros(targets.shape, jax.dtypes.float0)


token_nll.defvjp(_nll_fwd, _nll_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def row_losses(fn: RowLoss, cap: float | None, hn: jax.Array, embed: jax.Array, extra: Any
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """fn over one chunk: hn [c, D] normed hidden states, embed [V, D]. (loss [c], metrics {name: [c]})."""
    return fn(output_logits(hn, embed, cap), extra)


def _raw_logits(hn: jax.Array, embed: jax.Array) -> jax.Array:
    return jnp.einsum("cd,vd->cv", hn, embed.astype(hn.dtype), preferred_element_type=jnp.float32)


def _row_grads(fn: RowLoss, cap: float | None, hn: jax.Array, embed: jax.Array, extra: Any, ct: jax.Array
               ) -> tuple[tuple[jax.Array, dict[str, jax.Array]], jax.Array]:
    """(fn's outputs, ct_t * d loss_t / d raw logits_t [c, V]): rows are independent, so one VJP gives each row's.
    The soft-cap's slope is applied by hand, from the capped logits (1 - tanh^2), so that autodiff keeps no copy
    of the raw logits."""
    logits = softcap(_raw_logits(hn, embed), cap)
    out, vjp, metrics = jax.vjp(lambda z: fn(z, extra), logits, has_aux=True)
    g = vjp(ct)[0]
    return (out, metrics), g if cap is None else g * (1.0 - jnp.square(logits / cap))


def _fwd(fn: RowLoss, cap: float | None, hn: jax.Array, embed: jax.Array, extra: Any
         ) -> tuple[tuple[jax.Array, dict[str, jax.Array]], tuple[Any, ...]]:
    out, g = _row_grads(fn, cap, hn, embed, extra, jnp.ones(hn.shape[0], jnp.float32))
    dhn = jnp.einsum("cv,vd->cd", g.astype(embed.dtype), embed, preferred_element_type=jnp.float32)  # [c, D]
    return out, (dhn.astype(hn.dtype), hn, embed, extra)


def _bwd(fn: RowLoss, cap: float | None, res: tuple[Any, ...], ct: tuple[jax.Array, Any]) -> tuple[Any, ...]:
    dhn, hn, embed, extra = res
    ct = ct[0]  # [c]; the metrics' cotangents are ignored (they carry no gradient)
    # The embedding's gradient recomputes the logits; unused (a frozen embedding), XLA removes all of it.
    _, g = _row_grads(fn, cap, hn, embed, extra, ct)
    dembed = jnp.einsum("cv,cd->vd", g.astype(hn.dtype), hn, preferred_element_type=jnp.float32)
    dextra = jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0) if not jnp.issubdtype(a.dtype, jnp.inexact)
                          else jnp.zeros_like(a), extra)
    return ((ct[:, None] * dhn.astype(jnp.float32)).astype(hn.dtype), dembed.astype(embed.dtype), dextra)


row_losses.defvjp(_fwd, _bwd)


# --- distillation ----------------------------------------------------------------------------------------------

def divergence(kind: str, lp_teacher: jax.Array, lp_student: jax.Array, beta: float) -> jax.Array:
    """Per row, over the last axis: log-probabilities [c, K] of two distributions on the same outcomes -> [c].
    forward_kl: KL(teacher || student); reverse_kl: KL(student || teacher); jsd: beta KL(teacher || m) +
    (1 - beta) KL(student || m), m = beta teacher + (1 - beta) student (TRL GKD's generalized JSD: beta 0 is
    forward KL's gradient direction, 1 reverse's). Outcomes of probability 0 add 0."""
    def kl(lp: jax.Array, lq: jax.Array) -> jax.Array:  # KL(p || q), with 0 log 0 = 0 and no NaN gradient there
        p = jnp.exp(lp)
        safe = jnp.where(p > 0, lp - lq, 0.0)
        return jnp.sum(p * safe, axis=-1)

    if kind == "forward_kl":
        return kl(lp_teacher, lp_student)
    if kind == "reverse_kl":
        return kl(lp_student, lp_teacher)
    if beta == 0.0:
        return kl(lp_teacher, lp_student)
    if beta == 1.0:
        return kl(lp_student, lp_teacher)
    m = jnp.logaddexp(lp_teacher + np.log(beta), lp_student + np.log1p(-beta))
    return beta * kl(lp_teacher, m) + (1.0 - beta) * kl(lp_student, m)


@partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def student_divergence(kind: str, z: jax.Array, lp_teacher: jax.Array, beta: float) -> jax.Array:
    """divergence(kind, lp_teacher, log_softmax(z), beta): z [c, V] the student's logits (at the temperature),
    lp_teacher [c, V] without gradient. Its gradient with respect to z is written out (softmax's Jacobian applied
    by hand), so that XLA keeps two [c, V] arrays for it instead of autodiff's chain of them: forward KL
    p_s - p_t; reverse KL and JSD p_s (a - sum(p_s a)) with a = lp_s - lp_t, or (1 - beta)(lp_s - lp_m)."""
    return divergence(kind, lp_teacher, jax.nn.log_softmax(z, axis=-1), beta)


def _div_fwd(kind: str, z: jax.Array, lp_teacher: jax.Array, beta: float
             ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    lp_s = jax.nn.log_softmax(z, axis=-1)
    return divergence(kind, lp_teacher, lp_s, beta), (lp_s, lp_teacher)


def _div_bwd(kind: str, beta: float, res: tuple[jax.Array, jax.Array], ct: jax.Array
             ) -> tuple[jax.Array, jax.Array]:
    lp_s, lp_t = res
    p_s = jnp.exp(lp_s)
    if kind == "forward_kl" or kind == "jsd" and beta == 0.0:
        g = p_s - jnp.exp(lp_t)
    else:
        if kind == "reverse_kl" or beta == 1.0:
            a = lp_s - lp_t
        else:
            a = (1.0 - beta) * (lp_s - jnp.logaddexp(lp_t + np.log(beta), lp_s + np.log1p(-beta)))
        g = p_s * (a - jnp.sum(p_s * a, axis=-1, keepdims=True))
    return g * ct[:, None], jnp.zeros_like(lp_t)


student_divergence.defvjp(_div_fwd, _div_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(0, 4))
def topk_divergence(kind: str, z: jax.Array, ids: jax.Array, lp_teacher: jax.Array, beta: float) -> jax.Array:
    """divergence over K + 1 outcomes (topk_buckets) of a teacher's top-k log-probabilities lp_teacher [c, K] at
    ids [c, K] and the student's log_softmax(z) (z [c, V]) at the same ids. The gradient with respect to z is
    written out: the K outcomes' gradient (autodiff on [c, K]) added at their ids, less softmax(z) times its sum;
    autodiff would keep the whole log-softmax and a scattered copy of the gradient beside it."""
    return _on_buckets(kind, lp_teacher, beta)(_picked(z, ids)[1])


def _picked(z: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(logsumexp(z) [c], log_softmax(z) at ids [c, K]), without the whole log-softmax."""
    lse = jax.nn.logsumexp(z, axis=-1)
    return lse, jnp.take_along_axis(z, ids, axis=-1) - lse[:, None]


def _on_buckets(kind: str, lp_teacher: jax.Array, beta: float) -> Callable[[jax.Array], jax.Array]:
    """The divergence as a function of the student's log-probabilities at the teacher's top-k ids [c, K]."""
    return lambda picked: divergence(kind, topk_buckets(lp_teacher), topk_buckets(picked), beta)


def _topk_fwd(kind: str, z: jax.Array, ids: jax.Array, lp_teacher: jax.Array, beta: float
              ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    lse, picked = _picked(z, ids)
    value, vjp = jax.vjp(_on_buckets(kind, lp_teacher, beta), picked)  # on [c, K]: autodiff is cheap there
    return value, (z, lse, ids, vjp(jnp.ones_like(value))[0], lp_teacher)


def _topk_bwd(kind: str, beta: float, res: tuple[jax.Array, ...], ct: jax.Array
              ) -> tuple[jax.Array, np.ndarray, jax.Array]:
    z, lse, ids, g_picked, lp_teacher = res
    g = g_picked * ct[:, None]  # [c, K]: d loss / d picked log-probabilities
    rows = jnp.arange(z.shape[0])[:, None]
    # picked_k = z[id_k] - logsumexp(z): d / dz = onehot(id_k) - softmax(z)
    gz = jnp.zeros_like(z).at[rows, ids].add(g) - jnp.exp(z - lse[:, None]) * jnp.sum(g, axis=-1, keepdims=True)
    return gz, np.zeros(ids.shape, jax.dtypes.float0), jnp.zeros_like(lp_teacher)


topk_divergence.defvjp(_topk_fwd, _topk_bwd)


def _log1mexp_sum(lp: jax.Array) -> jax.Array:
    """log(1 - sum(exp(lp))) over the last axis: the log-probability of every outcome not listed, [c]. Clipped
    away from log 0 (a top-k that is the whole vocabulary leaves ~0 up to rounding)."""
    s = jnp.sum(jnp.exp(lp), axis=-1)
    return jnp.log1p(-jnp.clip(s, 0.0, 1.0 - 2.0 ** -20))


def topk_buckets(lp_topk: jax.Array) -> jax.Array:
    """[c, K] log-probabilities of K outcomes -> [c, K + 1] with the rest of the vocabulary as one more."""
    return jnp.concatenate([lp_topk, _log1mexp_sum(lp_topk)[:, None]], axis=-1)


def distill(kind: str, temperature: float, alpha: float, beta: float, vocab: int, cap_teacher: float | None,
            eps_teacher: float) -> RowLoss:
    """RowLoss of distillation: alpha * temperature^2 * divergence(teacher, student at temperature) + (1 - alpha)
    * the target's cross-entropy (at temperature 1). Both distributions are over the first `vocab` ids (the ids
    teacher and student share). extra: ((targets [c], teacher) , shared) where teacher is either its hidden states
    [c, D_T] (shared: its final norm and embedding; its logits are computed here, a chunk at a time), or its top-k
    (ids [c, K], log-probs [c, K] at the temperature over the shared vocabulary), compared on K + 1 outcomes: the K
    ids and the rest of the vocabulary."""
    def fn(logits: jax.Array, extra: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        (targets, teacher), shared = extra
        z = logits[:, :vocab] / temperature  # [c, vocab]
        if shared is not None:  # the teacher's hidden states
            hn_t = rms_norm(teacher, shared["final_norm"], eps_teacher)
            # The logits are cut to the shared ids, not the embedding: a slice of it would be a copy.
            z_t = jax.lax.stop_gradient(output_logits(hn_t, shared["embed"], cap_teacher)[:, :vocab])
            kd = student_divergence(kind, z, jax.nn.log_softmax(z_t / temperature, axis=-1), beta)
        else:
            ids, lp_t = teacher
            kd = topk_divergence(kind, z, ids, lp_t, beta)
        kd = kd * temperature ** 2
        ce = token_nll(logits, targets)
        return alpha * kd + (1.0 - alpha) * ce, {"kd": kd, "ce": ce}

    return fn
