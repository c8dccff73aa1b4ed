"""The compiled pieces of training: the schedule and optimizer, the train state, the train and eval steps and
where their arguments live on a mesh. Pure functions of their arguments; the loop that drives them is loop.py.

Gradients are taken for the trainable tree only (the LoRA adapters; every weight with method "full"), so no
full-size gradient or optimizer buffer exists for a frozen base. A step runs its micro-batches under one scan,
adding up (loss sum, trained-token count) and gradient sums, and divides once by the count of the whole
effective batch: k micro-batches give the update of one batch k times the size.

The objective is a loss function of a micro-batch, `loss_fn(trainable, frozen, batch, key) -> (loss sum, count,
metric sums)`, chosen by tcfg.method (`objective`): next-token cross-entropy on the weighted targets (sft), summed
over trained tokens; DPO's loss (dpo), summed over preference pairs; a distillation divergence mixed with the
cross-entropy (distill), over trained tokens. The step divides the sums by the count of the whole effective batch.
Frozen models the objective needs ride along in `frozen` beside the base: "reference" (dpo: the adapter a run
started from) and "teacher" (distill: the teacher's weights), laid out by the same sharding rules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.typing import DTypeLike

from gemmatune import lora, preference, sharding
from gemmatune.config import LoraConfig, ModelConfig, TrainConfig
from gemmatune.errors import GemmatuneError
from gemmatune.layout import Params, is_shape, param_structs, trainable_axes, trainable_shapes
from gemmatune.loss import chunked_loss, chunked_rows, distill, nll
from gemmatune.model import hidden_states

State = dict[str, Any]  # {"params": trainable tree, "opt_state", "step": int32, "rng": PRNG key}
Batch = dict[str, jax.Array]  # batch_keys -> [B, T, ...] (one micro-batch) or [k, B, T, ...] (a step's)
BATCH_KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")
TEACHER_KEYS = ("teacher_ids", "teacher_logprobs")  # [B, T, K]: a teacher cache's top-k at each target
FROZEN_EXTRAS = ("reference", "teacher")  # what `frozen` may hold beside the base's own entries
# loss_fn(trainable, frozen, batch [B, T], key) -> (loss sum, count, {metric: sum}), float32 scalars; the step
# reports sum / count for each. key: this micro-batch's own PRNG key for dropout and other training-only
# randomness; None when evaluating.
LossFn = Callable[[Params, Params, Batch, jax.Array | None], tuple[jax.Array, jax.Array, dict[str, jax.Array]]]


def batch_keys(tcfg: TrainConfig) -> tuple[str, ...]:
    return BATCH_KEYS + (TEACHER_KEYS if tcfg.method == "distill" and tcfg.teacher_cache else ())


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


def split_trainable(base: Params, cfg: ModelConfig, tcfg: TrainConfig, key: jax.Array,
                    adapter: tuple[Params, LoraConfig] | None = None) -> tuple[Params, Params]:
    """(trainable, frozen): float32 adapters (fresh, or `adapter`: the tensors and config of tcfg.adapter, which
    must match tcfg.lora) and the base as loaded, or for full fine-tuning the base in float32 (the master copy the
    optimizer updates) and nothing frozen."""
    if tcfg.tune == "full":
        return jax.tree.map(lambda a: a.astype(jnp.float32), base), {}
    if adapter is None:
        return lora.init_adapters(cfg, tcfg.lora, key), base
    adapters, found = adapter
    # Dropout is a training choice, free to change; the rest decides what the adapter computes.
    if (found.rank, found.alpha, found.rslora, set(found.targets)) != (
            tcfg.lora.rank, tcfg.lora.alpha, tcfg.lora.rslora, set(tcfg.lora.targets)):
        raise GemmatuneError(f"{tcfg.adapter}: the adapter has rank {found.rank}, alpha {found.alpha}, targets "
                             f"{','.join(found.targets)}, rslora {found.rslora}; set the same lora.* settings "
                             f"(now rank {tcfg.lora.rank}, alpha {tcfg.lora.alpha}, targets "
                             f"{','.join(tcfg.lora.targets)}, rslora {tcfg.lora.rslora}) to continue training it.")
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), adapters), base


def frozen_base(frozen: Params) -> Params:
    """The frozen base alone, without the frozen models an objective adds (FROZEN_EXTRAS)."""
    return {k: v for k, v in frozen.items() if k not in FROZEN_EXTRAS}


def model_params(trainable: Params, frozen: Params, tcfg: TrainConfig) -> Params:
    """The trained model's parameters: the trained tree, or the frozen base with the adapters attached."""
    return trainable if tcfg.tune == "full" else lora.attach(frozen_base(frozen), trainable)


def has_reference(tcfg: TrainConfig) -> bool:
    """Whether frozen["reference"] holds the reference adapter: DPO with a reference model, started from --adapter."""
    return tcfg.method == "dpo" and bool(tcfg.adapter) and tcfg.dpo_loss not in preference.REFERENCE_FREE


def init_state(trainable: Params, opt: optax.GradientTransformation, key: jax.Array,
               shardings: State | None = None) -> State:
    """A fresh train state; with shardings (StepShardings.state), built on their mesh from a copy of trainable."""
    if shardings is None:
        return {"params": trainable, "opt_state": opt.init(trainable), "step": jnp.zeros((), jnp.int32), "rng": key}
    # The key enters as raw data, a host array that every process passes alike.
    build = jax.jit(lambda t, k: init_state(t, opt, jax.random.wrap_key_data(k)), out_shardings=shardings)
    return build(sharding.put(trainable, shardings["params"]), np.asarray(jax.random.key_data(key)))


def _hidden(params: Params, batch: Batch, cfg: ModelConfig, tcfg: TrainConfig, adapter: LoraConfig | None,
            key: jax.Array | None, remat: str | None = None) -> jax.Array:
    """[B, T, D] hidden states of the packed rows (the LoRA dropout drawn from key)."""
    return hidden_states(params, batch["inputs"], cfg, positions=batch["positions"], segment_ids=batch["segment_ids"],
                         dtype=jnp.dtype(tcfg.dtype), adapter=adapter, key=key, remat=remat or tcfg.remat,
                         attn_impl=None if tcfg.attention == "auto" else tcfg.attention)


def supervised_loss(cfg: ModelConfig, tcfg: TrainConfig) -> LossFn:
    """The fine-tuning objective: cross-entropy of each weighted target given the tokens before it in its segment,
    over packed rows [B, T]."""
    adapter = tcfg.lora if tcfg.tune == "lora" else None

    def loss(trainable: Params, frozen: Params, batch: Batch, key: jax.Array | None
             ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        params = model_params(trainable, frozen, tcfg)
        h = _hidden(params, batch, cfg, tcfg, adapter, key)
        return (*chunked_loss(params, h, batch["targets"], batch["weights"], cfg, tcfg.loss_chunk), {})

    return loss


def preference_loss(cfg: ModelConfig, tcfg: TrainConfig) -> LossFn:
    """DPO and its variants (preference.losses) over packed pairs, summed over pairs. The reference model is the
    frozen base with the adapters switched off, or the adapter the run started from (frozen["reference"]): one
    forward pass more, without gradients, and no second copy of the weights."""
    def logps(params: Params, batch: Batch, adapter: LoraConfig | None, key: jax.Array | None, grad: bool
              ) -> preference.Pairs:
        h = _hidden(params, batch, cfg, tcfg, adapter, key, None if grad else "none")
        if not grad:
            h = jax.lax.stop_gradient(h)
        token_loss, _ = chunked_rows(params, h, cfg, tcfg.loss_chunk, nll, batch["targets"], grad=grad)
        return preference.pair_logps(-token_loss, batch["weights"], batch["segment_ids"])

    def loss(trainable: Params, frozen: Params, batch: Batch, key: jax.Array | None
             ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        policy = logps(model_params(trainable, frozen, tcfg), batch, tcfg.lora, key, True)
        reference = None
        if tcfg.dpo_loss not in preference.REFERENCE_FREE:
            if has_reference(tcfg):  # the adapter the run started from, frozen
                reference = logps(model_params(frozen["reference"], frozen, tcfg), batch, tcfg.lora, None, False)
            else:  # the base with the adapters switched off
                reference = logps(frozen_base(frozen), batch, None, None, False)
        losses, metrics = preference.losses(tcfg.dpo_loss, policy, reference, tcfg.dpo_beta,
                                            tcfg.dpo_label_smoothing, tcfg.simpo_gamma)
        valid = policy.valid.astype(jnp.float32)  # [B, P]
        return (jnp.sum(losses * valid), jnp.sum(valid),
                {name: jnp.sum(m * valid) for name, m in metrics.items()})

    return loss


def distill_loss(cfg: ModelConfig, tcfg: TrainConfig, teacher: ModelConfig | None) -> LossFn:
    """Distillation (loss.distill) over the trained targets: the teacher's distribution from its weights
    (frozen["teacher"], run in the same step without gradients; `teacher` its config) or from a teacher cache's
    top-k (the batch's TEACHER_KEYS, teacher None)."""
    adapter = tcfg.lora if tcfg.tune == "lora" else None
    vocab = cfg.vocab_size if teacher is None else min(cfg.vocab_size, teacher.vocab_size)
    fn = distill(tcfg.kd_loss, tcfg.kd_temperature, tcfg.kd_alpha, tcfg.kd_beta, vocab,
                 teacher.final_logit_softcap if teacher else None, teacher.rms_norm_eps if teacher else 0.0)

    def loss(trainable: Params, frozen: Params, batch: Batch, key: jax.Array | None
             ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        params = model_params(trainable, frozen, tcfg)
        h = _hidden(params, batch, cfg, tcfg, adapter, key)
        if teacher is None:
            rows, shared = (batch["targets"], (batch["teacher_ids"], batch["teacher_logprobs"])), None
        else:
            t = frozen["teacher"]
            ht = jax.lax.stop_gradient(_hidden(t, batch, teacher, tcfg, None, None, "none"))  # [B, T, D_T]
            rows, shared = (batch["targets"], ht), {"final_norm": t["final_norm"], "embed": t["embed"]}
        token_loss, metrics = chunked_rows(params, h, cfg, tcfg.loss_chunk, fn, rows, shared)
        w = batch["weights"].astype(jnp.float32)
        return jnp.sum(token_loss * w), jnp.sum(w), {name: jnp.sum(m * w) for name, m in metrics.items()}

    return loss


def objective(cfg: ModelConfig, tcfg: TrainConfig, teacher: ModelConfig | None = None) -> LossFn:
    """tcfg.method's loss function; `teacher`: the config of a teacher that runs in the step (distill without a
    teacher cache)."""
    if tcfg.method == "dpo":
        return preference_loss(cfg, tcfg)
    if tcfg.method == "distill":
        return distill_loss(cfg, tcfg, teacher)
    return supervised_loss(cfg, tcfg)


@dataclasses.dataclass(frozen=True)
class StepShardings:
    """Where the train step's arguments live on a mesh: the train state (adapters, and the optimizer moments laid
    out like them), the frozen base, and the [k, B, T] micro-batches (rows over data and fsdp)."""

    state: State
    frozen: Params
    batches: dict[str, NamedSharding]  # [k, B, T] (a train step)
    rows: dict[str, NamedSharding]  # one [B, T] batch (evaluation)


def _abstract(shapes: Params, dtype: DTypeLike) -> Params:
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), shapes, is_leaf=is_shape)


def step_shardings(cfg: ModelConfig, tcfg: TrainConfig, mesh: Mesh, opt: optax.GradientTransformation,
                   teacher: ModelConfig | None = None) -> StepShardings:
    """Every argument's sharding from sharding.RULES: the trained tree split like the weights it adapts (rank
    replicated), optimizer moments like their parameter, counters and the PRNG key replicated; a reference
    adapter like the trained one, a teacher like any base (`teacher`: its config). Batch arrays split their rows
    over data and fsdp (a teacher cache's [.., K] axis replicated)."""
    shapes = trainable_shapes(cfg, tcfg.tune, tcfg.lora)
    params = sharding.tree_shardings(mesh, trainable_axes(cfg, tcfg.tune, tcfg.lora), shapes)
    rep = sharding.replicated(mesh)
    opt_state = optax.tree_map_params(opt, lambda _, s: s, jax.eval_shape(opt.init, _abstract(shapes, jnp.float32)),
                                      params, transform_non_params=lambda _: rep)
    frozen = {} if tcfg.tune == "full" else sharding.param_shardings(cfg, mesh, quant=tcfg.quantization())
    if has_reference(tcfg):
        frozen = {**frozen, "reference": params}
    if teacher is not None:
        frozen = {**frozen, "teacher": sharding.param_shardings(teacher, mesh, quant=tcfg.quantization())}
    rows = NamedSharding(mesh, sharding.spec(sharding.BATCH, (tcfg.batch_size, 1), mesh.shape))
    micro = NamedSharding(mesh, jax.sharding.PartitionSpec(None, *rows.spec))
    keys = batch_keys(tcfg)
    return StepShardings({"params": params, "opt_state": opt_state, "step": rep, "rng": rep}, frozen,
                         dict.fromkeys(keys, micro), dict.fromkeys(keys, rows))


def make_train_step(cfg: ModelConfig, tcfg: TrainConfig, opt: optax.GradientTransformation,
                    mesh: Mesh | None = None, loss_fn: LossFn | None = None, teacher: ModelConfig | None = None
                    ) -> Callable[[State, Params, Batch], tuple[State, dict[str, jax.Array]]]:
    """step(state, frozen, batches) with batches [k, B, T] (k = grad_accum micro-batches) -> (state, metrics),
    minimising loss_fn (default: the objective of tcfg.method; `teacher`: an in-step teacher's config). A step
    whose loss or gradients are not finite leaves the state unchanged, with metrics["finite"] False. With a mesh,
    the arguments are taken and the state returned as `step_shardings` lays them out. Metrics: loss, tokens (the
    count the loss is divided by: trained tokens, or pairs for dpo), grad_norm, finite, seen, and the objective's
    own (each divided by the count)."""
    loss_fn = loss_fn or objective(cfg, tcfg, teacher)

    def with_aux(*args: Any) -> tuple[jax.Array, tuple[jax.Array, dict[str, jax.Array]]]:
        total, count, sums = loss_fn(*args)
        return total, (count, sums)

    grad_fn = jax.value_and_grad(with_aux, has_aux=True)

    def step(state: State, frozen: Params, batches: Batch) -> tuple[State, dict[str, jax.Array]]:
        with sharding.active(mesh):
            return _step(state, frozen, batches)

    def _step(state: State, frozen: Params, batches: Batch) -> tuple[State, dict[str, jax.Array]]:
        rng, step_key = jax.random.split(state["rng"])

        def micro(acc: tuple[Params, jax.Array, jax.Array, dict[str, jax.Array]], xs: tuple[Batch, jax.Array]
                  ) -> tuple[tuple[Params, jax.Array, jax.Array, dict[str, jax.Array]], None]:
            batch, i = xs
            (total, (count, sums)), grads = grad_fn(state["params"], frozen, batch, jax.random.fold_in(step_key, i))
            return (jax.tree.map(jnp.add, acc[0], grads), acc[1] + total, acc[2] + count,
                    jax.tree.map(jnp.add, acc[3], sums)), None

        zeros = jax.tree.map(jnp.zeros_like, state["params"])
        k = batches["inputs"].shape[0]
        first = jax.tree.map(lambda a: a[0], batches)
        sums0 = jax.tree.map(jnp.zeros_like, jax.eval_shape(loss_fn, state["params"], frozen, first, step_key)[2])
        (grads, total, count, sums), _ = jax.lax.scan(micro, (zeros, jnp.zeros(()), jnp.zeros(()), sums0),
                                                      (batches, jnp.arange(k)))
        denom = jnp.maximum(count, 1.0)  # a batch with nothing trained changes nothing (its gradients are 0)
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
        # "seen": every non-padding input position, counted here because each process holds only its own rows.
        return new, {"loss": loss, "tokens": count, "grad_norm": grad_norm, "finite": finite,
                     "seen": jnp.count_nonzero(batches["segment_ids"]),
                     **{name: v / denom for name, v in sums.items()}}

    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    sh = step_shardings(cfg, tcfg, mesh, opt, teacher)
    return jax.jit(step, donate_argnums=0, in_shardings=(sh.state, sh.frozen, sh.batches),
                   out_shardings=(sh.state, sharding.replicated(mesh)))


def make_eval_step(cfg: ModelConfig, tcfg: TrainConfig, mesh: Mesh | None = None, loss_fn: LossFn | None = None,
                   teacher: ModelConfig | None = None
                   ) -> Callable[[Params, Params, Batch], tuple[jax.Array, jax.Array, dict[str, jax.Array]]]:
    """eval(trainable, frozen, batch [B, T]) -> (loss sum, count, metric sums) of loss_fn (default: the
    objective of tcfg.method), without dropout (its key is None)."""
    loss = loss_fn or objective(cfg, tcfg, teacher)

    def evaluate(trainable: Params, frozen: Params, batch: Batch) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        with sharding.active(mesh):
            return loss(trainable, frozen, batch, None)

    if mesh is None:
        return jax.jit(evaluate)
    sh = step_shardings(cfg, tcfg, mesh, optax.identity(), teacher)
    return jax.jit(evaluate, in_shardings=(sh.state["params"], sh.frozen, sh.rows),
                   out_shardings=sharding.replicated(mesh))


def abstract_step(cfg: ModelConfig, tcfg: TrainConfig, mesh: Mesh, shapes: Shapes,
                  teacher: ModelConfig | None = None
                  ) -> tuple[Callable[..., Any], tuple[State, Params, dict[str, jax.ShapeDtypeStruct]]]:
    """The train step `gemmatune train` would compile for this configuration on `mesh` (`teacher`: an in-step
    teacher's config), and its arguments as jax.ShapeDtypeStructs carrying their shardings; no weights are read or
    allocated. For planning: `step.lower(*args).compile().memory_analysis()` gives the per-device memory of the
    real step."""
    opt = optimizer(tcfg, max(tcfg.max_steps, 1))
    sh = step_shardings(cfg, tcfg, mesh, opt, teacher)
    params = _abstract(trainable_shapes(cfg, tcfg.tune, tcfg.lora), jnp.float32)
    state = {"params": params, "opt_state": jax.eval_shape(opt.init, params),
             "step": jax.ShapeDtypeStruct((), jnp.int32), "rng": jax.eval_shape(jax.random.key, 0)}
    dtype = jnp.dtype(tcfg.dtype)
    frozen = {} if tcfg.tune == "full" else param_structs(cfg, dtype, tcfg.quantization())
    if has_reference(tcfg):
        frozen = {**frozen, "reference": params}
    if teacher is not None:
        frozen = {**frozen, "teacher": param_structs(teacher, dtype, tcfg.quantization())}
    batch = (shapes.grad_accum, shapes.batch_size, shapes.seq_len)
    kinds = {"weights": (jnp.float32, ()), "teacher_ids": (jnp.int32, (tcfg.kd_topk,)),
             "teacher_logprobs": (jnp.float32, (tcfg.kd_topk,))}
    batches = {k: jax.ShapeDtypeStruct(batch + kinds.get(k, (jnp.int32, ()))[1], kinds.get(k, (jnp.int32, ()))[0])
               for k in batch_keys(tcfg)}

    def with_sharding(a: jax.ShapeDtypeStruct, s: jax.sharding.Sharding) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)

    args = jax.tree.map(with_sharding, (state, frozen, batches), (sh.state, sh.frozen, sh.batches))
    return make_train_step(cfg, tcfg, opt, mesh, teacher=teacher), args


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Micro-batch layout of a step: grad_accum micro-batches of batch_size rows of seq_len positions."""

    grad_accum: int
    batch_size: int
    seq_len: int

    def stack(self, rows: dict[str, Any]) -> Batch:
        """[k * B, T, ...] rows from the data iterator -> [k, B, T, ...] device arrays, batch keys only."""
        return {k: jnp.asarray(a).reshape(self.grad_accum, self.batch_size, self.seq_len, *np.shape(a)[2:])
                for k, a in rows.items() if k in BATCH_KEYS + TEACHER_KEYS}

    def take(self, rows: range) -> list[int]:
        """Which of a step's k * B rows a process reads when it supplies rows `rows` of each micro-batch."""
        return [i * self.batch_size + j for i in range(self.grad_accum) for j in rows]


def global_batch(rows: dict[str, Any], shardings: dict[str, NamedSharding], shape: tuple[int, ...]) -> Batch:
    """This process's rows -> global arrays of `shape` ([k, B, T] or [B, T]; a teacher cache's arrays keep their
    trailing [K]), one for each key of `shardings`; one process supplies them all."""
    def one(k: str) -> jax.Array:
        local = np.asarray(rows[k])  # [rows, T, ...]
        rest = local.shape[2:]
        return jax.make_array_from_process_local_data(
            shardings[k], local.reshape(shape[:-2] + (-1, shape[-1]) + rest), shape + rest)

    return {k: one(k) for k in shardings}
