"""A training run (`gemmatune train`, `gemmatune.train(config)`): `setup` builds a `Run`, `train_loop` drives the
compiled step (step.py) and calls the hooks that are due after each step (log, evaluate, checkpoint), `finish`
writes the adapter and the summary.

A start that fails leaves --output as it found it (or absent): `setup` reads and checks everything the user's input
can break (the output directory, model, tokenizer, mesh and batch, data, adapter, the checkpoint to resume from)
before it claims the directory. The data is prepared into a hidden staging directory, `OUTPUT/.data.partial-PID`,
that becomes OUTPUT/data only once the directory is claimed (with --overwrite, the old run is deleted only then).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import optax
from jax.sharding import Mesh

from gemmatune import distributed, sharding
from gemmatune.atomic import provisional_dir, staged_dir, write_text
from gemmatune.attention import check_forced
from gemmatune.checkpoint import (
    check_run_dir,
    claim_run_dir,
    config_digest,
    latest_checkpoint,
    load_checkpoint,
    save_adapter,
    save_checkpoint,
)
from gemmatune.config import LoraConfig, ModelConfig, TrainConfig
from gemmatune.convert import checkpoint_quantization, load_model, model_config
from gemmatune.convert.peft import load_adapter_for
from gemmatune.data.loader import BatchIterator
from gemmatune.data.pipeline import Prepared, Split, describe, prepare
from gemmatune.data.teacher_cache import TeacherCache, ensure_cache
from gemmatune.errors import GemmatuneError
from gemmatune.evaluation import Case, answer_and_score, generation_cases
from gemmatune.generate import generate
from gemmatune.hub import resolve_model
from gemmatune.layout import Params
from gemmatune.lora import make_bank
from gemmatune.metrics import MetricsLog, Progress, format_summary, plot_losses
from gemmatune.model import unstack
from gemmatune.settings import dump_yaml, to_dict
from gemmatune.step import (
    Batch,
    Shapes,
    State,
    StepShardings,
    frozen_base,
    global_batch,
    has_reference,
    init_state,
    make_eval_step,
    make_train_step,
    optimizer,
    schedule,
    split_trainable,
    step_shardings,
)
from gemmatune.tokenizer import Tokenizer, load_tokenizer

NONFINITE_HELP = ("Likely causes: a learning rate too high for this model (lower --lr or add warmup), float16 "
                  "weights (Gemma 2 overflows in float16: use bfloat16 or float32), or corrupt data or weights. "
                  "Pass --nonfinite skip to drop such steps and count them instead.")
DATA_DIR = "data"

# A train step's metrics on the host: STEP_METRICS, then the objective's own (DPO's rewards, distillation's kd and
# ce), of which SHOWN are on the progress line too.
StepMetrics = dict[str, Any]
STEP_METRICS = ("loss", "tokens", "grad_norm", "finite", "seen")
SHOWN = {"dpo": ("reward_accuracy", "reward_margin"), "distill": ("kd", "ce")}


@dataclasses.dataclass(frozen=True)
class Result:
    summary: dict[str, Any]  # as written to OUTPUT/summary.txt
    answers: list[tuple[str, str]]  # (prompt, answer) for each eval prompt, from the final weights


@dataclasses.dataclass
class Run:
    """A run as `setup` leaves it: what it trains and on what, its compiled steps, where it writes, and where it
    stands (updated by the loop and its hooks). Closing it closes its writers."""

    tcfg: TrainConfig
    run_dir: Path
    log_dir: Path  # run_dir in process 0; the other processes' logs are their own, then discarded
    main: bool  # whether this process writes the run directory (process 0)
    mesh: Mesh
    cfg: ModelConfig
    tokenizer: Tokenizer
    data: Prepared
    shapes: Shapes
    shardings: StepShardings
    mine: range  # this process's rows of each [B, T] batch
    total: int  # the run's last step
    lr_at: optax.Schedule
    train_step: Callable[[State, Params, Batch], tuple[State, dict[str, jax.Array]]]
    eval_step: Callable[[Params, Params, Batch], tuple[jax.Array, jax.Array, dict[str, jax.Array]]]
    frozen: Params  # the base, and the frozen models the objective needs (step.FROZEN_EXTRAS)
    state: State
    train_it: BatchIterator
    log: MetricsLog
    progress: Progress
    started: float  # time.perf_counter() at the start
    start: int  # the step the run continues after: 0, or the resumed checkpoint's
    skipped: int  # non-finite steps skipped
    tokens_seen: int  # non-padding input positions of this process's rows, over the whole run
    tokens_at_start: int
    loss: float | None = None  # the last finite training loss
    val_loss: float | None = None
    answers: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # from the last evaluation
    val_cases: list[Case] = dataclasses.field(default_factory=list)  # eval_generate: the validation prompts
    teacher_cache: TeacherCache | None = None  # method distill with a teacher cache: batches carry its top-k

    def next_batch(self) -> Batch:
        """The step's [k, B, T] global batch, of which this process supplies its rows."""
        shape = (self.shapes.grad_accum, self.shapes.batch_size, self.shapes.seq_len)
        return global_batch(next(self.train_it), self.shardings.batches, shape)

    def close(self) -> None:
        self.progress.close()
        self.log.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclasses.dataclass(frozen=True)
class Hook:
    """fn(run, step, metrics) after every `every`-th step and after the last one (every 0: the last one only)."""

    fn: Callable[[Run, int, StepMetrics], None]
    every: int

    def due(self, step: int, total: int) -> bool:
        return step == total or (self.every > 0 and step % self.every == 0)


def _private_dir() -> Path:
    """A directory of this process's own, removed at exit: what processes other than 0 write (their copy of the
    prepared data, their logs) never lands in the shared run directory."""
    path = Path(tempfile.mkdtemp(prefix=f"gemmatune-process{jax.process_index()}-"))
    atexit.register(shutil.rmtree, path, True)
    return path


def _batches(tcfg: TrainConfig, tokenizer: Tokenizer, split: Split, batch_size: int, shuffle: bool,
             take: Sequence[int], teacher: TeacherCache | None) -> BatchIterator:
    return BatchIterator(split.store, split.indices, seq_len=tcfg.data.max_seq_len, batch_size=batch_size,
                         pad_id=tokenizer.pad_id, packing=tcfg.data.packing, shuffle_buffer=tcfg.data.shuffle_buffer,
                         seed=tcfg.data.seed, shuffle=shuffle, take=take, pairs=split.pairs, teacher=teacher)


def _check_data(tcfg: TrainConfig, data: Prepared) -> None:
    """DPO learns from preference pairs, and only DPO does."""
    paths = ", ".join(tcfg.data.paths)
    if tcfg.method == "dpo" and not data.pairs:
        raise GemmatuneError(f"{paths}: method dpo learns from preference pairs, but the rows have no chosen and "
                             "rejected columns; give rows {prompt, chosen, rejected} (or chosen and rejected "
                             "conversations), or train with --method sft.")
    if tcfg.method != "dpo" and data.pairs:
        raise GemmatuneError(f"{paths}: the rows are preference pairs (chosen and rejected), which method "
                             f"{tcfg.method} cannot learn from; pass --method dpo.")


def _check_teacher(tcfg: TrainConfig, cfg: ModelConfig, tokenizer: Tokenizer, teacher_dir: Path
                   ) -> tuple[ModelConfig, int]:
    """(the teacher's config, the vocabulary distilled over): the teacher must tokenise as the student does; the
    distributions are compared on the ids both models have (said when their embeddings differ in size)."""
    teacher_cfg = model_config(teacher_dir)
    theirs = load_tokenizer(teacher_dir)
    probe = "<start_of_turn>user\nDistil: the café's naïve résumé, 12345, 深度学习.<end_of_turn>\n"
    mine = (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, tokenizer.encode(probe))
    if (theirs.vocab_size, theirs.bos_id, theirs.eos_id, theirs.encode(probe)) != mine:
        raise GemmatuneError(f"{tcfg.teacher}: the teacher's tokenizer differs from the student's ({tcfg.model}); "
                             "distillation compares next-token distributions id by id, so teacher and student must "
                             "share one tokenizer (Gemma 2 9B -> 2B, Gemma 3 4B -> 1B or 270M).")
    vocab = min(cfg.vocab_size, teacher_cfg.vocab_size)
    if cfg.vocab_size != teacher_cfg.vocab_size:
        print(f"distill: the teacher has {teacher_cfg.vocab_size} embedding rows, the student {cfg.vocab_size}; "
              f"their distributions are compared on the {vocab} ids they share (the tokenizer has "
              f"{tokenizer.vocab_size})", file=sys.stderr)
    if tokenizer.vocab_size > vocab:
        raise GemmatuneError(f"{tcfg.teacher}: the teacher has {teacher_cfg.vocab_size} embedding rows but the "
                             f"tokenizer {tokenizer.vocab_size} tokens; the teacher's weights belong to another "
                             "model.")
    return teacher_cfg, vocab


def setup(tcfg: TrainConfig) -> Run:
    """Everything a run needs, checked before anything is written; then the run directory is claimed (process 0:
    the previous run deleted with --overwrite, run.json and config.yaml written, the prepared data moved in) and
    the metrics log opened."""
    distributed.initialize(tcfg)  # before anything touches the devices
    started = time.perf_counter()
    main = distributed.is_main()  # process 0 alone writes the run directory
    run_dir = Path(tcfg.output)
    digest = config_digest(to_dict(tcfg))
    if main:
        resume_from = check_run_dir(run_dir, digest, resume=tcfg.resume, overwrite=tcfg.overwrite)
    else:  # --output must be shared by all hosts for a resume: the others read process 0's checkpoint
        resume_from = latest_checkpoint(run_dir) if tcfg.resume else None
    model_dir = resolve_model(tcfg.model)  # the one place where the --model the user gave becomes a directory
    cfg = model_config(model_dir)
    stored = checkpoint_quantization(model_dir)  # a bitsandbytes 4-bit checkpoint: loads with its own codes
    if stored is not None and tcfg.quantization() is None:
        tcfg = dataclasses.replace(tcfg, quantize=stored.kind, quantize_block=stored.block, double_quant=stored.double)
        print(f"{tcfg.model} is stored quantized ({stored.describe()}): training QLoRA on it", file=sys.stderr)
    mesh = sharding.make_mesh(tcfg.mesh, cfg=cfg, batch_size=tcfg.batch_size)
    sharding.check_batch(mesh, tcfg.batch_size)
    print(f"mesh {sharding.describe(mesh)}: {jax.device_count()} {jax.devices()[0].platform} device(s) in "
          f"{jax.process_count()} process(es)", file=sys.stderr)
    tokenizer = load_tokenizer(model_dir)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise GemmatuneError(f"{tcfg.model}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                             f"{cfg.vocab_size} embedding rows; the tokenizer files belong to another model.")
    teacher_dir = resolve_model(tcfg.teacher) if tcfg.method == "distill" else None
    teacher_cfg, vocab = _check_teacher(tcfg, cfg, tokenizer, teacher_dir) if teacher_dir else (None, 0)
    for model in (cfg, teacher_cfg) if teacher_cfg else (cfg,):
        check_forced(tcfg.attention, jax.default_backend(), model, tcfg.data.max_seq_len)
    with contextlib.ExitStack() as staging:
        # Every process prepares the data (the same examples): process 0 into a staging directory that becomes
        # OUTPUT/data once the run is claimed, the others into a private directory, so that hosts need not share
        # a filesystem and never write the same files. A failure removes the staging directory, and --output
        # too when this start created it.
        if main:
            staging.enter_context(provisional_dir(run_dir))
            workdir = staging.enter_context(staged_dir(run_dir / DATA_DIR))
        else:
            workdir = _private_dir()
        data = prepare(tcfg.data, tokenizer, workdir)
        print(f"data: {describe(data.train.report)}", file=sys.stderr)
        _check_data(tcfg, data)
        # Checked now (plain-text rows have no prompt to answer), not at the first evaluation after many steps.
        # Preference pairs are answered once, their chosen response the reference (the even indices).
        val_cases = generation_cases(data.val.store, data.val.indices[::2 if data.pairs else 1]
                                     [:tcfg.eval_generate_examples], tokenizer) \
            if tcfg.eval_generate and data.val is not None else []
        cache = None
        if teacher_dir is not None and tcfg.teacher_cache:  # the teacher alone on the devices, before the student
            stores = [data.train.store] + ([data.val.store] if data.val is not None else [])
            cache = ensure_cache(tcfg.teacher_cache, teacher_dir, stores, k=tcfg.kd_topk,
                                 temperature=tcfg.kd_temperature, vocab=vocab, dtype=tcfg.dtype,
                                 quant=tcfg.quantization(), mesh=mesh, batch_size=tcfg.batch_size,
                                 seq_len=tcfg.data.max_seq_len, pad_id=tokenizer.pad_id, chunk=tcfg.loss_chunk)
        in_step = teacher_cfg if teacher_dir is not None and cache is None else None  # a teacher run in the step
        # The weights last: the slowest to read. Quantized (QLoRA) as they stream in when tcfg.quantize says so.
        cfg, base = load_model(model_dir, dtype=tcfg.dtype, mesh=mesh, quant=tcfg.quantization())
        seq_len, rows_per_step = tcfg.data.max_seq_len, tcfg.batch_size * tcfg.grad_accum
        shapes = Shapes(tcfg.grad_accum, tcfg.batch_size, seq_len)
        # Only the optimizer's structure matters for the shardings: the step count is set from the data below.
        sh = step_shardings(cfg, tcfg, mesh, optimizer(tcfg, max(tcfg.max_steps, 1)), in_step)
        mine = sharding.process_rows(sh.rows["inputs"], (tcfg.batch_size, seq_len), 0)
        train_it = _batches(tcfg, tokenizer, data.train, rows_per_step, True, shapes.take(mine), cache)
        total = tcfg.max_steps or max(1, math.ceil(tcfg.epochs * train_it.epoch_rows() / rows_per_step))
        opt = optimizer(tcfg, total)
        init_key, train_key = jax.random.split(jax.random.key(tcfg.seed))
        # Refused when the adapter is already merged into the model: its update would count twice.
        adapter = load_adapter_for(model_dir, tcfg.adapter, cfg) if tcfg.adapter and tcfg.tune == "lora" else None
        trainable, frozen = split_trainable(base, cfg, tcfg, init_key, adapter)
        if has_reference(tcfg):  # DPO's reference: the adapter the run starts from, frozen (its own copy)
            frozen = {**frozen, "reference": sharding.put(trainable, sh.frozen["reference"])}
        if in_step is not None:  # after the student's: a teacher that does not fit beside it fails last
            in_step, teacher = load_model(teacher_dir, dtype=tcfg.dtype, mesh=mesh, quant=tcfg.quantization())
            frozen = {**frozen, "teacher": teacher}
        state = init_state(trainable, opt, train_key, sh.state)
        start, skipped, tokens_seen = 0, 0, 0
        if resume_from is not None:
            state, meta = load_checkpoint(resume_from, state)
            train_it.restore(meta["data"])
            start, skipped, tokens_seen = meta["step"], meta["skipped"], meta["tokens_seen"]
        # start == total: killed after its last checkpoint but before the adapter and summary; finished by train.
        if start > total:
            raise GemmatuneError(f"{run_dir}: the run already reached step {start} of {total}; raise --max-steps or "
                                 "--epochs to train further, or choose another --output.")
        if main:
            claim_run_dir(run_dir, digest, overwrite=tcfg.overwrite, keep={workdir.name})
            write_text(run_dir / "config.yaml", dump_yaml(tcfg))
    if main:  # staged_dir has renamed the staging directory
        data.moved(workdir, run_dir / DATA_DIR)
    distributed.barrier("run_dir")
    if resume_from is not None:
        print(f"resumed from step {start} ({resume_from})", file=sys.stderr)
    log_dir = run_dir if main else _private_dir()
    # Only process 0 reports to experiment trackers; the progress bar is made after them, so that their start-up
    # messages print before it.
    log = MetricsLog(log_dir, start_step=start, report_to=tcfg.report_to if main else (), config=to_dict(tcfg))
    progress = Progress(total, start_step=start, every=tcfg.log_every)
    return Run(tcfg=tcfg, run_dir=run_dir, log_dir=log_dir, main=main, mesh=mesh, cfg=cfg, tokenizer=tokenizer,
               data=data, shapes=shapes, shardings=sh, mine=mine, total=total, lr_at=schedule(tcfg, total),
               train_step=make_train_step(cfg, tcfg, opt, mesh, teacher=in_step),
               eval_step=make_eval_step(cfg, tcfg, mesh, teacher=in_step),
               frozen=frozen, state=state, train_it=train_it, log=log, progress=progress,
               started=started, start=start, skipped=skipped, tokens_seen=tokens_seen, tokens_at_start=tokens_seen,
               val_cases=val_cases, teacher_cache=cache)


def answer(base: Params, cfg: ModelConfig, adapter: tuple[Params, LoraConfig] | None, tokenizer: Tokenizer,
           prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy chat answers to prompts from the (stacked) base with the adapter applied unmerged, as `generate`
    and `serve` apply it."""
    ids = [tokenizer.encode_chat([{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts]
    out = generate(unstack(base), cfg, ids, max_new_tokens=max_new_tokens,
                   stop_ids=(tokenizer.eos_id, tokenizer.end_of_turn_id),
                   bank=make_bank([adapter]) if adapter is not None else None)
    return [tokenizer.decode(o) for o in out]


# --- hooks -----------------------------------------------------------------------------------------------------


class LogStep:
    """Hook: the step's metrics to the metrics log (and the experiment trackers), with the token rate since the
    last call (or since the hook was made)."""

    def __init__(self, run: Run) -> None:
        self.time, self.tokens = time.perf_counter(), run.tokens_seen

    def __call__(self, run: Run, step: int, m: StepMetrics) -> None:
        now = time.perf_counter()
        rate = (run.tokens_seen - self.tokens) / (now - self.time)
        self.time, self.tokens = now, run.tokens_seen
        lr = float(run.lr_at(step - 1))
        counted = "pairs" if run.tcfg.method == "dpo" else "trained_tokens"  # what the loss is a mean over
        run.log.log(step, loss=float(m["loss"]), lr=lr, tokens_per_s=rate, grad_norm=float(m["grad_norm"]),
                    **{counted: float(m["tokens"])}, skipped=run.skipped, **objective_metrics(m))


def objective_metrics(m: StepMetrics) -> dict[str, float]:
    """The objective's own metrics of a step (DPO's rewards, distillation's divergence), as floats."""
    return {k: float(v) for k, v in m.items() if k not in STEP_METRICS}


def evaluate(run: Run, step: int, record: bool = True) -> None:
    """Validation loss (logged with perplexity), with eval_generate the validation examples' answer metrics
    (logged), and the answers to the evaluation prompts (logged), into run, logged unless record is False."""
    tcfg = run.tcfg
    # Answers apply the adapter unmerged, from a bank built on the host: every process gathers the adapters (small),
    # which are split over the devices of several hosts on a mesh.
    base, adapter = (run.state["params"], None) if tcfg.tune == "full" else \
        (frozen_base(run.frozen), (sharding.to_host(run.state["params"]), tcfg.lora))
    if run.data.val is not None:
        total = count = 0.0
        sums: dict[str, float] = {}
        for rows in _batches(tcfg, run.tokenizer, run.data.val, tcfg.batch_size, False, list(run.mine),
                             run.teacher_cache):
            s, c, more = run.eval_step(run.state["params"], run.frozen, global_batch(
                rows, run.shardings.rows, (tcfg.batch_size, tcfg.data.max_seq_len)))
            total, count = total + float(s), count + float(c)
            sums = {k: sums.get(k, 0.0) + float(v) for k, v in more.items()}
        run.val_loss = total / max(count, 1.0)
        if record:
            values = {"val_loss": run.val_loss, **{f"val_{k}": v / max(count, 1.0) for k, v in sums.items()}}
            if tcfg.method == "sft":  # a perplexity is of the next-token loss alone
                values["val_ppl"] = math.exp(min(run.val_loss, 50.0))
            if run.val_cases:  # greedy answers to validation prompts, scored as `gemmatune eval` scores them
                scored = answer_and_score(base, run.cfg, adapter, run.val_cases, run.tokenizer)
                values.update({f"val_{name}": value for name, value in scored.means.items()})
            run.log.log(step, **values)
    if tcfg.eval_prompts:
        texts = answer(base, run.cfg, adapter, run.tokenizer, tcfg.eval_prompts, tcfg.eval_max_new_tokens)
        run.answers = list(zip(tcfg.eval_prompts, texts))
        for prompt, text in run.answers if record else []:
            run.log.log_text(step, prompt, text)


def checkpoint(run: Run, step: int, m: StepMetrics) -> None:
    """Hook: the train state and the data position, gathered by every process and written by process 0; nobody
    continues until the checkpoint is complete."""
    host = sharding.to_host(run.state)
    if run.main:
        save_checkpoint(run.run_dir, step, host, {"step": step, "skipped": run.skipped, "tokens_seen": run.tokens_seen,
                                                  "data": run.train_it.state()}, run.tcfg.keep)
    distributed.barrier(f"checkpoint-{step}")


def default_hooks(run: Run) -> list[Hook]:
    """Log, then evaluate, then save: the final evaluation is logged before the final checkpoint, so a run killed
    after that checkpoint does not log it twice."""
    return [Hook(LogStep(run), run.tcfg.log_every),
            Hook(lambda run, step, _: evaluate(run, step), run.tcfg.eval_every),
            Hook(checkpoint, run.tcfg.save_every)]


# --- the loop --------------------------------------------------------------------------------------------------


def train_loop(run: Run, hooks: Sequence[Hook]) -> None:
    """Steps run.start + 1 .. run.total, each followed by the hooks that are due, in order."""
    for step in range(run.start + 1, run.total + 1):
        run.state, m = run.train_step(run.state, run.frozen, run.next_batch())
        m = jax.device_get(sharding.to_host(m))
        run.tokens_seen += int(m["seen"])
        # Every step: the bar redraws in place (a terminal); plain lines appear every log_every steps.
        run.progress.update(step, loss=float(m["loss"]), lr=float(run.lr_at(step - 1)), tokens=run.tokens_seen,
                            shown={k: float(m[k]) for k in SHOWN.get(run.tcfg.method, ())})
        if not m["finite"]:
            if run.tcfg.nonfinite == "stop":
                last = latest_checkpoint(run.run_dir)
                raise GemmatuneError(f"step {step}: the loss or gradients are not finite (NaN or inf); training "
                                     f"stopped. {NONFINITE_HELP} Last good checkpoint: {last or 'none yet'}.")
            run.skipped += 1
        else:
            run.loss = float(m["loss"])
        for hook in hooks:
            if hook.due(step, run.total):
                hook.fn(run, step, m)


def finish(run: Run) -> Result:
    """The adapter (LoRA), the loss plot and the summary, after the last step."""
    tcfg = run.tcfg
    adapter_dir = run.run_dir / "adapter"
    adapters = sharding.to_host(run.state["params"]) if tcfg.tune == "lora" else None
    if run.main and adapters is not None:
        save_adapter(adapter_dir, jax.device_get(adapters), tcfg.lora, run.cfg, tcfg.model, force=True,
                     quant=tcfg.quantization())
    distributed.barrier("adapter")
    plot = plot_losses(run.log_dir / "metrics.jsonl", run.log_dir / "loss.png")
    wall = time.perf_counter() - run.started
    summary = {"method": tcfg.method, "tokens_seen": run.tokens_seen, "steps": run.total, "wall_time_s": wall,
               # this process's work, after a resume too
               "tokens_per_s": (run.tokens_seen - run.tokens_at_start) / wall,
               "train_loss": run.loss, "val_loss": run.val_loss, "skipped_steps": run.skipped,
               "adapter": str(adapter_dir) if tcfg.tune == "lora" else str(latest_checkpoint(run.run_dir)),
               "metrics": str(run.run_dir / "metrics.jsonl"), **run.log.where, "plot": str(plot)}
    summary = {k: v for k, v in summary.items() if v is not None}
    if run.main:
        write_text(run.run_dir / "summary.txt", format_summary(summary) + "\n")
        print(format_summary(summary), file=sys.stderr)
    return Result(summary, run.answers)


def train(tcfg: TrainConfig) -> Result:
    """Train as tcfg says (the Python API behind `gemmatune train`)."""
    with setup(tcfg) as run:
        if run.start == run.total:  # the final evaluation was logged before the final checkpoint: only recompute it
            evaluate(run, run.total, record=False)
        train_loop(run, default_hooks(run))
    return finish(run)
