"""Training: the optimizer, the compiled train and eval steps, and the loop behind `gemmatune train`.

Gradients are taken for the trainable tree only (the LoRA adapters; every weight with method "full"), so no
full-size gradient or optimizer buffer exists for a frozen base. A step runs its micro-batches under one scan,
adding up (loss sum, trained-token count) and gradient sums, and divides once by the count of the whole
effective batch: k micro-batches give the update of one batch k times the size.
"""

from __future__ import annotations

import atexit
import dataclasses
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gemmatune import distributed, lora, sharding
from gemmatune.config import ModelConfig, TrainConfig
from gemmatune.errors import GemmatuneError
from gemmatune.layout import Params, is_shape, param_shapes, trainable_axes, trainable_shapes
from gemmatune.loss import chunked_loss
from gemmatune.model import hidden_states, unstack

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
    """(trainable, frozen): float32 adapters (fresh, or tcfg.adapter's) and the base as loaded, or for full
    fine-tuning the base in float32 (the master copy the optimizer updates) and nothing frozen."""
    if tcfg.method == "full":
        return jax.tree.map(lambda a: a.astype(jnp.float32), base), {}
    if not tcfg.adapter:
        return lora.init_adapters(cfg, tcfg.lora, key), base
    from gemmatune.convert.peft import load_any_adapter

    adapters, found = load_any_adapter(tcfg.adapter, cfg)
    # Dropout is a training choice, free to change; the rest decides what the adapter computes.
    if (found.rank, found.alpha, found.rslora, set(found.targets)) != (
            tcfg.lora.rank, tcfg.lora.alpha, tcfg.lora.rslora, set(tcfg.lora.targets)):
        raise GemmatuneError(f"{tcfg.adapter}: the adapter has rank {found.rank}, alpha {found.alpha}, targets "
                             f"{','.join(found.targets)}, rslora {found.rslora}; set the same lora.* settings "
                             f"(now rank {tcfg.lora.rank}, alpha {tcfg.lora.alpha}, targets "
                             f"{','.join(tcfg.lora.targets)}, rslora {tcfg.lora.rslora}) to continue training it.")
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), adapters), base


def model_params(trainable: Params, frozen: Params, tcfg: TrainConfig) -> Params:
    return trainable if tcfg.method == "full" else lora.attach(frozen, trainable)


def init_state(trainable: Params, opt: optax.GradientTransformation, key: jax.Array,
               shardings: State | None = None) -> State:
    """A fresh train state; with shardings (StepShardings.state), built on their mesh from a copy of trainable."""
    if shardings is None:
        return {"params": trainable, "opt_state": opt.init(trainable), "step": jnp.zeros((), jnp.int32), "rng": key}
    # The key enters as raw data, a host array that every process passes alike.
    build = jax.jit(lambda t, k: init_state(t, opt, jax.random.wrap_key_data(k)), out_shardings=shardings)
    return build(sharding.put(trainable, shardings["params"]), np.asarray(jax.random.key_data(key)))


def loss_sums(trainable: Params, frozen: Params, batch: dict[str, jax.Array], key: jax.Array | None,
              cfg: ModelConfig, tcfg: TrainConfig) -> tuple[jax.Array, jax.Array]:
    """(sum of token losses, trained-token count) of one micro-batch of packed rows [B, T]."""
    adapter = tcfg.lora if tcfg.method == "lora" else None
    h = hidden_states(model_params(trainable, frozen, tcfg), batch["inputs"], cfg, positions=batch["positions"],
                      segment_ids=batch["segment_ids"], dtype=jnp.dtype(tcfg.dtype), adapter=adapter, key=key,
                      remat=tcfg.remat)
    return chunked_loss(model_params(trainable, frozen, tcfg), h, batch["targets"], batch["weights"], cfg,
                        tcfg.loss_chunk)


@dataclasses.dataclass(frozen=True)
class StepShardings:
    """Where the train step's arguments live on a mesh: the train state (adapters, and the optimizer moments laid
    out like them), the frozen base, and the [k, B, T] micro-batches (rows over data and fsdp)."""

    state: State
    frozen: Params
    batches: dict[str, Any]
    rows: dict[str, Any]  # one [B, T] batch (evaluation)


def _abstract(shapes: Params, dtype: Any) -> Params:
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), shapes, is_leaf=is_shape)


def step_shardings(cfg: ModelConfig, tcfg: TrainConfig, mesh: jax.sharding.Mesh,
                   opt: optax.GradientTransformation) -> StepShardings:
    """Every argument's sharding from sharding.RULES: the trained tree split like the weights it adapts (rank
    replicated), optimizer moments like their parameter, counters and the PRNG key replicated."""
    shapes = trainable_shapes(cfg, tcfg.method, tcfg.lora)
    params = sharding.tree_shardings(mesh, trainable_axes(cfg, tcfg.method, tcfg.lora), shapes)
    rep = sharding.replicated(mesh)
    opt_state = optax.tree_map_params(opt, lambda _, s: s, jax.eval_shape(opt.init, _abstract(shapes, jnp.float32)),
                                      params, transform_non_params=lambda _: rep)
    frozen = {} if tcfg.method == "full" else sharding.param_shardings(cfg, mesh)
    rows = jax.sharding.NamedSharding(mesh, sharding.spec(sharding.BATCH, (tcfg.batch_size, 1), mesh.shape))
    micro = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, *rows.spec))
    return StepShardings({"params": params, "opt_state": opt_state, "step": rep, "rng": rep}, frozen,
                         dict.fromkeys(BATCH_KEYS, micro), dict.fromkeys(BATCH_KEYS, rows))


def make_train_step(cfg: ModelConfig, tcfg: TrainConfig, opt: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh | None = None
                    ) -> Callable[[State, Params, dict[str, jax.Array]], tuple[State, dict[str, jax.Array]]]:
    """step(state, frozen, batches) with batches [k, B, T] (k = grad_accum micro-batches) -> (state, metrics).
    A step whose loss or gradients are not finite leaves the state unchanged, with metrics["finite"] False.
    With a mesh, the arguments are taken and the state returned as `step_shardings` lays them out."""
    grad_fn = jax.value_and_grad(loss_sums, has_aux=True)
    use_dropout = tcfg.method == "lora" and tcfg.lora.dropout > 0

    def step(state: State, frozen: Params, batches: dict[str, jax.Array]) -> tuple[State, dict[str, jax.Array]]:
        with sharding.active(mesh):
            return _step(state, frozen, batches)

    def _step(state: State, frozen: Params, batches: dict[str, jax.Array]) -> tuple[State, dict[str, jax.Array]]:
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
        # "seen": every non-padding input position, counted here because each process holds only its own rows.
        return new, {"loss": loss, "tokens": count, "grad_norm": grad_norm, "finite": finite,
                     "seen": jnp.count_nonzero(batches["segment_ids"])}

    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    sh = step_shardings(cfg, tcfg, mesh, opt)
    return jax.jit(step, donate_argnums=0, in_shardings=(sh.state, sh.frozen, sh.batches),
                   out_shardings=(sh.state, sharding.replicated(mesh)))


def make_eval_step(cfg: ModelConfig, tcfg: TrainConfig, mesh: jax.sharding.Mesh | None = None
                   ) -> Callable[[Params, Params, dict[str, jax.Array]], tuple[jax.Array, jax.Array]]:
    """eval(trainable, frozen, batch [B, T]) -> (loss sum, count), no dropout."""
    def evaluate(trainable: Params, frozen: Params, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        with sharding.active(mesh):
            return loss_sums(trainable, frozen, batch, None, cfg, tcfg)

    if mesh is None:
        return jax.jit(evaluate)
    sh = step_shardings(cfg, tcfg, mesh, optax.identity())
    return jax.jit(evaluate, in_shardings=(sh.state["params"], sh.frozen, sh.rows),
                   out_shardings=sharding.replicated(mesh))


def abstract_step(cfg: ModelConfig, tcfg: TrainConfig, mesh: jax.sharding.Mesh, shapes: Shapes
                  ) -> tuple[Callable[..., Any], tuple[State, Params, dict[str, jax.ShapeDtypeStruct]]]:
    """The train step `run` would compile for this configuration on `mesh`, and its arguments as
    jax.ShapeDtypeStructs carrying their shardings; no weights are read or allocated. For planning:
    `step.lower(*args).compile().memory_analysis()` gives the per-device memory of the real step."""
    opt = optimizer(tcfg, max(tcfg.max_steps, 1))
    sh = step_shardings(cfg, tcfg, mesh, opt)
    params = _abstract(trainable_shapes(cfg, tcfg.method, tcfg.lora), jnp.float32)
    state = {"params": params, "opt_state": jax.eval_shape(opt.init, params),
             "step": jax.ShapeDtypeStruct((), jnp.int32), "rng": jax.eval_shape(jax.random.key, 0)}
    frozen = {} if tcfg.method == "full" else _abstract(param_shapes(cfg), jnp.dtype(tcfg.dtype))
    batch = (shapes.grad_accum, shapes.batch_size, shapes.seq_len)
    batches = {k: jax.ShapeDtypeStruct(batch, jnp.float32 if k == "weights" else jnp.int32) for k in BATCH_KEYS}

    def with_sharding(a: jax.ShapeDtypeStruct, s: jax.sharding.Sharding) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)

    args = jax.tree.map(with_sharding, (state, frozen, batches), (sh.state, sh.frozen, sh.batches))
    return make_train_step(cfg, tcfg, opt, mesh), args


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

    def take(self, rows: range) -> list[int]:
        """Which of a step's k * B rows a process reads when it supplies rows `rows` of each micro-batch."""
        return [i * self.batch_size + j for i in range(self.grad_accum) for j in rows]


def global_batch(rows: dict[str, Any], shardings: dict[str, jax.sharding.NamedSharding],
                 shape: tuple[int, ...]) -> dict[str, jax.Array]:
    """This process's rows -> global arrays of `shape` ([k, B, T] or [B, T]); one process supplies them all."""
    return {k: jax.make_array_from_process_local_data(
        shardings[k], np.asarray(rows[k]).reshape(shape[:-2] + (-1, shape[-1])), shape) for k in BATCH_KEYS}


# --- the loop --------------------------------------------------------------------------------------------------

NONFINITE_HELP = ("Likely causes: a learning rate too high for this model (lower --lr or add warmup), float16 "
                  "weights (Gemma 2 overflows in float16: use bfloat16 or float32), or corrupt data or weights. "
                  "Pass --nonfinite skip to drop such steps and count them instead.")


def answer(params: Params, cfg: ModelConfig, tokenizer: Any, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy chat answers to prompts from (stacked, merged) parameters."""
    from gemmatune.generate import generate

    ids = [tokenizer.encode_chat([{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts]
    out = generate(unstack(params), cfg, ids, max_new_tokens=max_new_tokens,
                   stop_ids=(tokenizer.eos_id, tokenizer.end_of_turn_id))
    return [tokenizer.decode(o) for o in out]


def _private_dir() -> Path:
    """A directory of this process's own, removed at exit: what processes other than 0 write (their copy of the
    prepared data, their logs) never lands in the shared run directory."""
    path = Path(tempfile.mkdtemp(prefix=f"gemmatune-process{jax.process_index()}-"))
    atexit.register(shutil.rmtree, path, True)
    return path


@dataclasses.dataclass(frozen=True)
class Result:
    summary: dict[str, Any]  # as written to OUTPUT/summary.txt
    answers: list[tuple[str, str]]  # (prompt, answer) for each eval prompt, from the final weights


def run(tcfg: TrainConfig) -> Result:
    """Train as tcfg says (the Python API behind `gemmatune train`)."""
    from gemmatune.atomic import write_text
    from gemmatune.checkpoint import (
        config_digest,
        latest_checkpoint,
        load_checkpoint,
        prepare_run_dir,
        save_adapter,
        save_checkpoint,
    )
    from gemmatune.convert import load_model, model_config
    from gemmatune.data.loader import BatchIterator
    from gemmatune.data.pipeline import describe, prepare
    from gemmatune.metrics import MetricsLog, Progress, format_summary, plot_losses
    from gemmatune.settings import dump_yaml, to_dict
    from gemmatune.tokenizer import load_tokenizer

    distributed.initialize(tcfg)  # before anything touches the devices
    main = distributed.is_main()  # process 0 alone writes the run directory
    t_start = time.perf_counter()
    run_dir = Path(tcfg.output)
    if main:
        resume_from = prepare_run_dir(run_dir, config_digest(to_dict(tcfg)), resume=tcfg.resume,
                                      overwrite=tcfg.overwrite)
        write_text(run_dir / "config.yaml", dump_yaml(tcfg))
    distributed.barrier("run_dir")
    if not main:  # --output must be shared by all hosts for a resume: the others read process 0's checkpoint
        resume_from = latest_checkpoint(run_dir) if tcfg.resume else None
    mesh = sharding.make_mesh(tcfg.mesh, cfg=model_config(tcfg.model), batch_size=tcfg.batch_size)
    sharding.check_batch(mesh, tcfg.batch_size)
    print(f"mesh {sharding.describe(mesh)}: {jax.device_count()} {jax.devices()[0].platform} device(s) in "
          f"{jax.process_count()} process(es)", file=sys.stderr)
    tokenizer = load_tokenizer(tcfg.model)
    cfg, base = load_model(tcfg.model, dtype=tcfg.dtype, mesh=mesh)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise GemmatuneError(f"{tcfg.model}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                             f"{cfg.vocab_size} embedding rows; the tokenizer files belong to another model.")
    # Every process prepares the data (the same examples); the others into a private directory, so that hosts
    # need not share a filesystem and never write the same files.
    data = prepare(tcfg.data, tokenizer, run_dir / "data" if main else _private_dir())
    print(f"data: {describe(data.train.report)}", file=sys.stderr)
    seq_len, rows_per_step = tcfg.data.max_seq_len, tcfg.batch_size * tcfg.grad_accum
    shapes = Shapes(tcfg.grad_accum, tcfg.batch_size, seq_len)
    total = tcfg.max_steps  # (set from the data below when 0)
    opt = optimizer(tcfg, max(total, 1))  # only its structure matters for the shardings
    sh = step_shardings(cfg, tcfg, mesh, opt)
    mine = sharding.process_rows(sh.rows["inputs"], (tcfg.batch_size, seq_len), 0)  # this process's rows

    def batches(split: Any, batch_size: int, shuffle: bool, take: list[int]) -> BatchIterator:
        return BatchIterator(split.store, split.indices, seq_len=seq_len, batch_size=batch_size,
                             pad_id=tokenizer.pad_id, packing=tcfg.data.packing,
                             shuffle_buffer=tcfg.data.shuffle_buffer, seed=tcfg.data.seed, shuffle=shuffle,
                             take=take)

    train_it = batches(data.train, rows_per_step, True, shapes.take(mine))
    total = tcfg.max_steps or max(1, math.ceil(tcfg.epochs * train_it.epoch_rows() / rows_per_step))
    opt, lr_at = optimizer(tcfg, total), schedule(tcfg, total)
    init_key, train_key = jax.random.split(jax.random.key(tcfg.seed))
    trainable, frozen = split_trainable(base, cfg, tcfg, init_key)
    state = init_state(trainable, opt, train_key, sh.state)
    start, skipped, tokens_seen = 0, 0, 0
    if resume_from is not None:
        state, meta = load_checkpoint(resume_from, state)
        train_it.restore(meta["data"])
        start, skipped, tokens_seen = meta["step"], meta["skipped"], meta["tokens_seen"]
        print(f"resumed from step {start} ({resume_from})", file=sys.stderr)
    tokens_at_start = tokens_seen
    # start == total: killed after its last checkpoint but before the adapter and summary; finished below.
    if start > total:
        raise GemmatuneError(f"{run_dir}: the run already reached step {start} of {total}; raise --max-steps or "
                             "--epochs to train further, or choose another --output.")
    train_step, eval_step = make_train_step(cfg, tcfg, opt, mesh), make_eval_step(cfg, tcfg, mesh)

    def evaluate(step: int, record: bool = True) -> tuple[float | None, list[tuple[str, str]]]:
        """Validation loss (logged with perplexity) and the answers to the evaluation prompts (logged), unless
        record is False."""
        val_loss = None
        if data.val is not None:
            total_loss = count = 0.0
            for rows in batches(data.val, tcfg.batch_size, False, list(mine)):
                s, c = eval_step(state["params"], frozen, global_batch(rows, sh.rows, (tcfg.batch_size, seq_len)))
                total_loss, count = total_loss + float(s), count + float(c)
            val_loss = total_loss / max(count, 1.0)
            if record:
                log.log(step, val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50.0)))
        answers = []
        if tcfg.eval_prompts:
            params = state["params"] if tcfg.method == "full" else lora.merge(frozen, state["params"], tcfg.lora)
            texts = answer(params, cfg, tokenizer, list(tcfg.eval_prompts), tcfg.eval_max_new_tokens)
            answers = list(zip(tcfg.eval_prompts, texts))
            for prompt, text in answers if record else []:
                log.log_text(step, prompt, text)
        return val_loss, answers

    def checkpoint(step: int) -> None:
        # Gathered by every process, written by process 0; nobody continues until the checkpoint is complete.
        host = sharding.to_host(state)
        if main:
            save_checkpoint(run_dir, step, host, {"step": step, "skipped": skipped, "tokens_seen": tokens_seen,
                                                  "data": train_it.state()}, tcfg.keep)
        distributed.barrier(f"checkpoint-{step}")

    val_loss = loss = None
    answers: list[tuple[str, str]] = []
    log_dir = run_dir if main else _private_dir()  # the other processes' logs are their own, then discarded
    with MetricsLog(log_dir, start_step=start) as log, Progress(total, start_step=start) as progress:
        t_log, tokens_at_log = time.perf_counter(), tokens_seen
        if start == total:  # the final evaluation was logged before the final checkpoint: only recompute it
            val_loss, answers = evaluate(total, record=False)
        for step in range(start + 1, total + 1):
            rows = next(train_it)
            state, m = train_step(state, frozen, global_batch(rows, sh.batches, (tcfg.grad_accum, tcfg.batch_size,
                                                                                  seq_len)))
            m = jax.device_get(sharding.to_host(m))
            tokens_seen += int(m["seen"])
            if not m["finite"]:
                if tcfg.nonfinite == "stop":
                    last = latest_checkpoint(run_dir)
                    raise GemmatuneError(f"step {step}: the loss or gradients are not finite (NaN or inf); training "
                                         f"stopped. {NONFINITE_HELP} Last good checkpoint: {last or 'none yet'}.")
                skipped += 1
            else:
                loss = float(m["loss"])
            if step % tcfg.log_every == 0 or step == total:
                now = time.perf_counter()
                rate = (tokens_seen - tokens_at_log) / (now - t_log)
                t_log, tokens_at_log = now, tokens_seen
                log.log(step, loss=float(m["loss"]), lr=float(lr_at(step - 1)), tokens_per_s=rate,
                        grad_norm=float(m["grad_norm"]), trained_tokens=float(m["tokens"]), skipped=skipped)
                progress.update(step, loss=float(m["loss"]), lr=float(lr_at(step - 1)), tokens_per_s=rate)
            if (tcfg.eval_every and step % tcfg.eval_every == 0) or step == total:
                val_loss, answers = evaluate(step)
            if (tcfg.save_every and step % tcfg.save_every == 0) or step == total:
                checkpoint(step)
    adapter_dir = run_dir / "adapter"
    adapters = sharding.to_host(state["params"]) if tcfg.method == "lora" else None
    if main and adapters is not None:
        save_adapter(adapter_dir, jax.device_get(adapters), tcfg.lora, cfg, tcfg.model, force=True)
    distributed.barrier("adapter")
    plot = plot_losses(log_dir / "metrics.jsonl", log_dir / "loss.png")
    wall = time.perf_counter() - t_start
    summary = {"tokens_seen": tokens_seen, "steps": total, "wall_time_s": wall,
               "tokens_per_s": (tokens_seen - tokens_at_start) / wall,  # this process's work, after a resume too
               "train_loss": loss, "val_loss": val_loss, "skipped_steps": skipped,
               "adapter": str(adapter_dir) if tcfg.method == "lora" else str(latest_checkpoint(run_dir)),
               "metrics": str(run_dir / "metrics.jsonl"), "tensorboard": str(run_dir / "tensorboard"),
               "plot": str(plot)}
    summary = {k: v for k, v in summary.items() if v is not None}
    if main:
        write_text(run_dir / "summary.txt", format_summary(summary) + "\n")
        print(format_summary(summary), file=sys.stderr)
    return Result(summary, answers)
