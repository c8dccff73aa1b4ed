"""Preference losses (DPO and its variants) from the log-probabilities of chosen and rejected responses.

Packed rows hold whole pairs (data.loader, pairs=True): in each row, segment 2j - 1 is a chosen response and
segment 2j its rejected partner, both with their own copy of the prompt. `pair_logps` sums each segment's trained
log-probabilities; `losses` turns the policy's (and the reference model's) sums into one loss per pair, with the
formulas of TRL's DPOTrainer (sigmoid, IPO), CPOTrainer (SimPO) and ORPOTrainer:

  sigmoid  -log sigmoid(beta z) (1 - eps) - log sigmoid(-beta z) eps,  z = (pc - pr) - (rc - rr)   (sums)
  ipo      (z - 1 / (2 beta))^2, z as above on per-token means
  simpo    -log sigmoid(beta z) (1 - eps) - log sigmoid(-beta z) eps,  z = mc - mr - gamma / beta   (no reference)
  orpo     -mc - beta log sigmoid(log odds(mc) - log odds(mr)),  odds(m) = e^m / (1 - e^m)       (no reference)

p: the policy's summed log-probabilities, r: the reference's, m: the policy's per-token means, c/r: chosen and
rejected; eps is label smoothing. Rewards are beta (p - r) (means for ipo), beta m for the reference-free losses.
ORPO's NLL term is the chosen response's per-token mean (the paper's; TRL's ORPOTrainer averages over every chosen
token of the batch), and SimPO has none (CPOTrainer with cpo_alpha 0).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

REFERENCE_FREE = ("simpo", "orpo")
MEAN_LOGPS = ("ipo", "simpo", "orpo")  # the losses defined on per-token means rather than sums


@dataclasses.dataclass(frozen=True)
class Pairs:
    """Per pair slot [B, P] (P = T // 2 slots per row; most are empty): summed log-probabilities of the chosen and
    rejected responses, their trained-token counts, and whether the slot holds a pair."""

    chosen: jax.Array
    rejected: jax.Array
    n_chosen: jax.Array
    n_rejected: jax.Array

    @property
    def valid(self) -> jax.Array:
        return (self.n_chosen > 0) & (self.n_rejected > 0)

    def means(self) -> tuple[jax.Array, jax.Array]:
        return self.chosen / jnp.maximum(self.n_chosen, 1.0), self.rejected / jnp.maximum(self.n_rejected, 1.0)


def pair_logps(logps: jax.Array, weights: jax.Array, segment_ids: jax.Array) -> Pairs:
    """logps, weights, segment_ids [B, T] -> Pairs: sums of weights * logps per segment, paired (2j - 1, 2j)."""
    B, T = segment_ids.shape
    ids = (segment_ids + (T + 1) * jnp.arange(B)[:, None]).reshape(-1)  # one id per (row, segment)

    def per_segment(x: jax.Array) -> jax.Array:  # [B, T] -> [B, T + 1] sums, column s = segment s
        return jax.ops.segment_sum(x.reshape(-1), ids, num_segments=B * (T + 1)).reshape(B, T + 1)

    w = weights.astype(jnp.float32)
    sums, counts = per_segment(logps * w), per_segment(w)
    P = T // 2
    return Pairs(sums[:, 1:2 * P:2], sums[:, 2:2 * P + 1:2], counts[:, 1:2 * P:2], counts[:, 2:2 * P + 1:2])


def losses(kind: str, policy: Pairs, reference: Pairs | None, beta: float, label_smoothing: float = 0.0,
           simpo_gamma: float = 0.5) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss [B, P], metrics {name: [B, P]}) per pair slot; empty slots hold finite values (mask with .valid).
    Metrics: rewards_chosen, rewards_rejected, reward_accuracy (chosen's reward above rejected's), reward_margin,
    logps_chosen, logps_rejected (the policy's sums)."""
    def smoothed(z: jax.Array) -> jax.Array:
        return -jax.nn.log_sigmoid(beta * z) * (1 - label_smoothing) - jax.nn.log_sigmoid(-beta * z) * label_smoothing

    if kind in REFERENCE_FREE:
        pc, pr = policy.means()
        rewards = beta * pc, beta * pr
        if kind == "simpo":
            loss = smoothed(pc - pr - simpo_gamma / beta)
        else:
            # log odds(m) = m - log(1 - e^m); m < 0 for any response with a trained token (log1p(-e^m) is finite).
            log_odds = (pc - pr) - (jnp.log1p(-jnp.exp(jnp.minimum(pc, -1e-7)))
                                    - jnp.log1p(-jnp.exp(jnp.minimum(pr, -1e-7))))
            loss = -pc - beta * jax.nn.log_sigmoid(log_odds)
    else:
        assert reference is not None, "sigmoid and ipo compare with a reference model"
        (pc, pr), (rc, rr) = (policy.means(), reference.means()) if kind in MEAN_LOGPS else \
            ((policy.chosen, policy.rejected), (reference.chosen, reference.rejected))
        z = (pc - pr) - (rc - rr)
        loss = smoothed(z) if kind == "sigmoid" else jnp.square(z - 1.0 / (2.0 * beta))
        rewards = beta * (pc - rc), beta * (pr - rr)
    chosen, rejected = (jax.lax.stop_gradient(r) for r in rewards)
    return loss, {"rewards_chosen": chosen, "rewards_rejected": rejected,
                  "reward_accuracy": (chosen > rejected).astype(jnp.float32), "reward_margin": chosen - rejected,
                  "logps_chosen": jax.lax.stop_gradient(policy.chosen),
                  "logps_rejected": jax.lax.stop_gradient(policy.rejected)}
