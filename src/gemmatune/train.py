"""Training: the optimizer, the compiled train and eval steps, and the loop behind `gemmatune train`.

Gradients are taken for the trainable tree only (the LoRA adapters; every weight with method "full"), so no
full-size gradient or optimizer buffer exists for a frozen base. A step runs its micro-batches under one scan,
adding up (loss sum, trained-token count) and gradient sums, and divides once by the count of the whole
effective batch: k micro-batches give the update of one batch k times the size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from gemmatune import lora
from gemmatune.config import ModelConfig, TrainConfig
from gemmatune.loss import chunked_loss
from gemmatune.model import Params, hidden_states

State = dict[str, Any]  # {"params": trainable tree, "opt_state", "step": int32, "rng": PRNG key}
BATCH_KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")


def schedule(tcfg: TrainConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to lr, then cosine or linear decay to lr * min_lr_ratio at total_steps, or constant."""
    end = tcfg.lr * tcfg.min_lr_ratio
    decay_steps = max(total_steps - tcfg.warmup_steps, 1)
    after = {"cosine": optax.cosine_decay_schedule(tcfg.lr, decay_steps, alpha=tcfg.min_lr_ratio),
             "linear": optax.linear_schedule(tcfg.lr, end, decay_steps),
             "constant": optax.constant_schedule(tcfg.lr)}[tcfg.schedule]
    if tcfg.warmup_steps == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, tcfg.lr, tcfg.warmup_steps), after],
                                [tcfg.warmup_steps])


def optimizer(tcfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW (weight decay on every trainable array: the adapters) after global-norm clipping."""
    parts = [optax.clip_by_global_norm(tcfg.clip_norm)] if tcfg.clip_norm > 0 else []
    parts.append(optax.adamw(schedule(tcfg, total_steps), b1=tcfg.adam_b1, b2=tcfg.adam_b2, eps=tcfg.adam_eps,
                             weight_decay=tcfg.weight_decay))
    return optax.chain(*parts)


def split_trainable(base: Params, cfg: ModelConfig, tcfg: TrainConfig, key: jax.Array) -> tuple[Params, Params]:
    """(trainable, frozen): fresh float32 adapters and the base as loaded, or for full fine-tuning the base in
    float32 (the master copy the optimizer updates) and nothing frozen."""
    if tcfg.method == "full":
        return jax.tree.map(lambda a: a.astype(jnp.float32), base), {}
    return lora.init_adapters(cfg, tcfg.lora, key), base


def model_params(trainable: Params, frozen: Params, tcfg: TrainConfig) -> Params:
    return trainable if tcfg.method == "full" else lora.attach(frozen, trainable)


def init_state(trainable: Params, opt: optax.GradientTransformation, key: jax.Array) -> State:
    return {"params": trainable, "opt_state": opt.init(trainable), "step": jnp.zeros((), jnp.int32), "rng": key}


def loss_sums(trainable: Params, frozen: Params, batch: dict[str, jax.Array], key: jax.Array | None,
              cfg: ModelConfig, tcfg: TrainConfig) -> tuple[jax.Array, jax.Array]:
    """(sum of token losses, trained-token count) of one micro-batch of packed rows [B, T]."""
    adapter = tcfg.lora if tcfg.method == "lora" else None
    h = hidden_states(model_params(trainable, frozen, tcfg), batch["inputs"], cfg, positions=batch["positions"],
                      segment_ids=batch["segment_ids"], dtype=jnp.dtype(tcfg.dtype), adapter=adapter, key=key,
                      remat=tcfg.remat)
    return chunked_loss(model_params(trainable, frozen, tcfg), h, batch["targets"], batch["weights"], cfg,
                        tcfg.loss_chunk)


def make_train_step(cfg: ModelConfig, tcfg: TrainConfig, opt: optax.GradientTransformation
                    ) -> Callable[[State, Params, dict[str, jax.Array]], tuple[State, dict[str, jax.Array]]]:
    """step(state, frozen, batches) with batches [k, B, T] (k = grad_accum micro-batches) -> (state, metrics).
    A step whose loss or gradients are not finite leaves the state unchanged, with metrics["finite"] False."""
    grad_fn = jax.value_and_grad(loss_sums, has_aux=True)
    use_dropout = tcfg.method == "lora" and tcfg.lora.dropout > 0

    def step(state: State, frozen: Params, batches: dict[str, jax.Array]) -> tuple[State, dict[str, jax.Array]]:
        rng, step_key = jax.random.split(state["rng"])

        def micro(acc: tuple[Params, jax.Array, jax.Array], xs: tuple[dict[str, jax.Array], jax.Array]
                  ) -> tuple[tuple[Params, jax.Array, jax.Array], None]:
            batch, i = xs
            key = jax.random.fold_in(step_key, i) if use_dropout else None
            (total, count), grads = grad_fn(state["params"], frozen, batch, key, cfg, tcfg)
            return (jax.tree.map(jnp.add, acc[0], grads), acc[1] + total, acc[2] + count), None

        zeros = jax.tree.map(jnp.zeros_like, state["params"])
        k = batches["inputs"].shape[0]
        (grads, total, count), _ = jax.lax.scan(micro, (zeros, jnp.zeros(()), jnp.zeros(())),
                                                (batches, jnp.arange(k)))
        denom = jnp.maximum(count, 1.0)  # a batch with no trained token changes nothing (its gradients are 0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss = total / denom
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": rng}
        # A non-finite step keeps the old parameters and optimizer moments (the step count still advances, so a
        # skipped step is not retried with the same batch).
        new = {**new, **jax.tree.map(lambda n, o: jnp.where(finite, n, o),
                                     {"params": params, "opt_state": opt_state},
                                     {"params": state["params"], "opt_state": state["opt_state"]})}
        return new, {"loss": loss, "tokens": count, "grad_norm": grad_norm, "finite": finite}

    return jax.jit(step, donate_argnums=0)


def make_eval_step(cfg: ModelConfig, tcfg: TrainConfig
                   ) -> Callable[[Params, Params, dict[str, jax.Array]], tuple[jax.Array, jax.Array]]:
    """eval(trainable, frozen, batch [B, T]) -> (loss sum, count), no dropout."""
    return jax.jit(lambda trainable, frozen, batch: loss_sums(trainable, frozen, batch, None, cfg, tcfg))


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Micro-batch layout of a step: grad_accum micro-batches of batch_size rows of seq_len positions."""

    grad_accum: int
    batch_size: int
    seq_len: int

    def stack(self, rows: dict[str, Any]) -> dict[str, jax.Array]:
        """[k * B, T] rows from the data iterator -> [k, B, T] device arrays, batch keys only."""
        return {k: jnp.asarray(rows[k]).reshape(self.grad_accum, self.batch_size, self.seq_len)
                for k in BATCH_KEYS}
