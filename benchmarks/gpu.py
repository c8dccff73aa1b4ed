"""One LoRA fine-tuning step on this machine's GPU, side by side (issue 16): gemmatune (XLA attention and the fused
kernels) against transformers + PEFT (sdpa and eager attention), and the XLA settings that matter on a GPU.

    python benchmarks/gpu.py [--out benchmarks/gpu_results] [--budget 450] [--peak-tflops T] [--no-flags]
                             [--cases gemma2-9b@4096,...] [--runners "gemmatune flash,hf eager"] [--steps 3]
    python benchmarks/gpu.py --smoke --out /tmp/smoke     # CPU, tiny models, seconds: every code path

One command, nothing downloaded: a CUDA machine with JAX, PyTorch, transformers and peft. It writes OUT.json (after
every run, so a run killed midway leaves what was measured) and OUT.md (the table, the goals, the XLA flags). On the
device machine, write under $OUT to get them back: `python benchmarks/gpu.py --out $OUT/gpu_results`.

Cases: gemma2-9b, gemma2-2b and gemma3-1b (config.PRESETS: the released sizes, random weights in bfloat16) at seq
4096 and 1024; one row of 1 x seq real tokens (common.random_tokens, the same for every runner: inputs and next-token
targets, every position trained); LoRA rank 16, alpha 16, on q, k, v, o, gate, up, down; AdamW (lr 2e-4, no weight
decay) after clipping the gradients' global norm at 1.0. Runners, each in its own process (its own memory figures; a
crash, an out-of-memory or a refusal is recorded and the others go on):

  gemmatune xla / flash / cudnn   the step `gemmatune train` compiles (step.abstract_step, with TrainConfig's
                    defaults: bfloat16 base, float32 adapters and optimizer, remat block, loss_chunk 512) with
                    TrainConfig.attention forced (refused as `train` refuses it: attention.check_forced); cudnn only
                    for Gemma 3 (no soft-cap). The weights and adapters are random, drawn on the device after the
                    compile (one pool of normal draws tiled into every array: no host copy of a 9B model, nothing
                    the step's peak would not cover). Peak memory: the device's peak_bytes_in_use. Also the plan:
                    plan.plan_here, what `gemmatune plan --device gpu` computes (its child's function, run in the
                    same process before the step; the compile is shared through JAX's persistent compilation cache,
                    so the step's compile_s is small), against the measured peak; and once, the command itself
                    (`plan_cli` in the JSON: the same total, or not).
  hf sdpa / eager   transformers' Gemma2ForCausalLM / Gemma3ForCausalLM built from the same config directly on the
                    GPU in bfloat16 (random init), PEFT LoRA (adapters float32, as PEFT keeps them), the mean token
                    cross-entropy of the float32 logits; no gradient checkpointing (--hf-checkpointing turns it
                    on; a run out of memory without it is run again with it, as "+ckpt"). Peak memory:
                    torch.cuda.max_memory_allocated, reset after the model is built. transformers refuses sdpa for
                    Gemma 2 (no soft-cap in it): recorded as refused. `hf flex` (flex_attention, which has the
                    soft-cap) may be asked for with --runners.

Times: --warmup steps, then --steps timed steps, each waited for (block_until_ready / torch.cuda.synchronize);
tokens/s from the median step. A --budget of seconds covers everything: the jobs run most important first (the
goal's case, gemma2-9b at 4096, then the other 4096 cases, the XLA flags, the 1024 cases), each with a timeout of
what is left (and at most four times its expected length); a job that would not fit is recorded as
"skipped: time". A refusal (a kernel that does not take the config) is reused for the same runner on the same model
(gemmatune) or family (transformers) rather than asked again.

MFU: model FLOPs per token as benchmarks/compare.py counts them for a LoRA step (compare.flops_per_token, the same
for every runner): 4 N_base + 6 N_lora + 12 H E sum_layers(T_attn), i.e. frozen weights 2N forward and 2N backward
(the input gradient only), adapters 2N forward and 4N backward, attention's QK^T and PV 4 H E T_attn forward and
twice that backward, with T_attn the keys a query sees on average under the causal (and sliding-window) mask, about
(T + 1) / 2 (the masked half of the [T, T] products is not counted); recomputation is not counted. Divided by
the card's dense bfloat16 peak: H100 SXM and H200 989 TFLOP/s, H100 NVL 835, H100 PCIe 756, A100 312, L4 121,
found in the device's name; another card needs --peak-tflops (the JSON says which was used).

XLA flags (issue 16, point 5): gemma2-2b at 4096 with the kernel (flash, or the fastest gemmatune runner if flash
did not run), each setting in its own process: gemmatune's defaults (XLA_PYTHON_CLIENT_MEM_FRACTION=0.95, which
`gemmatune` sets when unset; the main run's figures), --xla_gpu_enable_latency_hiding_scheduler=true,
--xla_gpu_autotune_level=0 (the default is 4), XLA_PYTHON_CLIENT_MEM_FRACTION=0.75 (JAX's default) and
XLA_PYTHON_CLIENT_PREALLOCATE=false. Settings that change XLA_FLAGS compile without the persistent cache.

Goals (issue 16), set beside the figures: gemmatune >= 2x the tokens/s of transformers + PEFT and <= 0.5x its peak
memory at seq 4096 on gemma2-9b (the fastest runner of each); >= 40% MFU at seq 4096; the plan within 15% of the
measured peak.

Each run's JSON record also says how far its child got and when (`stage`, `<stage>_at_s`: seconds since the child
started), the compile and plan seconds, the loss (finite: the step really ran), and for a failure its status
(refused, oom, error, crash, timeout, skipped: time) and reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "src"))  # this checkout's gemmatune (the children get it in PYTHONPATH)
from common import call_times, finish, random_tokens  # noqa: E402
from compare import Workload, flops_per_token  # noqa: E402

from gemmatune.config import PRESETS, LoraConfig, ModelConfig, TrainConfig  # noqa: E402

RANK = 16
LR, CLIP = TrainConfig.lr, TrainConfig.clip_norm  # gemmatune's defaults, given to transformers too
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Runner:
    tool: str  # "gemmatune" or "hf"
    attention: str  # TrainConfig.attention, or transformers' attn_implementation
    families: tuple[str, ...] = ("gemma2", "gemma3")


RUNNERS = {
    "gemmatune flash": Runner("gemmatune", "flash"),
    "gemmatune cudnn": Runner("gemmatune", "cudnn", ("gemma3",)),  # cuDNN's kernel has no soft-cap
    "gemmatune xla": Runner("gemmatune", "xla"),
    "hf sdpa": Runner("hf", "sdpa"),
    "hf eager": Runner("hf", "eager"),
    "hf flex": Runner("hf", "flex_attention"),
}
DEFAULT_RUNNERS = ("gemmatune flash", "gemmatune cudnn", "gemmatune xla", "hf sdpa", "hf eager")
MODELS = ("gemma2-9b", "gemma2-2b", "gemma3-1b")
SEQS = (4096, 1024)
FLAG_CASE = ("gemma2-2b", 4096)
# (name, environment, what it is). XLA_FLAGS are added to any already set.
FLAGS = [
    ("default", {}, "gemmatune's defaults: XLA_PYTHON_CLIENT_MEM_FRACTION=0.95, no XLA_FLAGS"),
    ("latency hiding scheduler", {"XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=true"},
     "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true"),
    ("autotune level 0", {"XLA_FLAGS": "--xla_gpu_autotune_level=0"},
     "XLA_FLAGS=--xla_gpu_autotune_level=0 (no autotuning; the default is 4)"),
    ("memory fraction 0.75", {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.75"},
     "XLA_PYTHON_CLIENT_MEM_FRACTION=0.75 (JAX's own default)"),
    ("no preallocation", {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}, "XLA_PYTHON_CLIENT_PREALLOCATE=false"),
]
# Seconds a job is expected to take (process start, compile, weights, steps) on an H100, guessed: a job starts
# only with this much left, and is stopped at 4x it (or when the budget ends).
EXPECT = {("gemmatune", "gemma2-9b"): 60, ("gemmatune", "gemma2-2b"): 40, ("gemmatune", "gemma3-1b"): 35,
          ("hf", "gemma2-9b"): 45, ("hf", "gemma2-2b"): 30, ("hf", "gemma3-1b"): 30}
# Dense bfloat16 tensor-core peaks, TFLOP/s, by a pattern of the device's name (first match).
PEAKS = [(r"H200", 989.0, "H200"), (r"H100.*NVL", 835.0, "H100 NVL"), (r"H100.*PCIe", 756.0, "H100 PCIe"),
         (r"H100", 989.0, "H100 SXM"), (r"A100", 312.0, "A100"), (r"\bL4\b", 121.0, "L4")]
GOAL_SPEED, GOAL_MEMORY, GOAL_MFU, GOAL_PLAN = 2.0, 0.5, 0.40, 0.15

# --smoke: tiny models on the CPU, one short sequence; timings meaningless, every code path taken.
SMOKE_MODELS = {
    "small": PRESETS["small"],
    "small3": dataclasses.replace(PRESETS["small"], family="gemma3", num_layers=6, layer_types=(), sliding_window=16,
                                  attn_logit_softcap=None, final_logit_softcap=None, rope_theta=1_000_000.0),
}
SMOKE_SEQ = 128  # the flash kernel's tiles divide it (it runs in Pallas interpret mode on the CPU)
# Every code path once: a gemmatune run (flash; xla differs only in the attention it forces), cudnn refused on the
# CPU (the refusal path, which also records transformers' refusal of sdpa for Gemma 2: not run here, its process
# alone would add a third to the run), transformers on both families.
SMOKE_CASES = [("small", SMOKE_SEQ, ("gemmatune flash", "hf eager")),
               ("small3", SMOKE_SEQ, ("gemmatune cudnn", "hf sdpa"))]
SMOKE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"  # compile faster
SMOKE_FLAGS = ("default", "memory fraction 0.75")


def model_config(name: str) -> ModelConfig:
    return SMOKE_MODELS[name] if name in SMOKE_MODELS else PRESETS[name]


def train_config(seq: int, attention: str) -> TrainConfig:
    """The TrainConfig `gemmatune plan --seq-len seq --batch-size 1 --lora-rank 16 --attention A` builds: its other
    settings train's defaults, so that the plan and the measured step are one program."""
    base = TrainConfig()
    return dataclasses.replace(base, data=dataclasses.replace(base.data, max_seq_len=seq), lora=LoraConfig(rank=RANK),
                               batch_size=1, dtype="bfloat16", attention=attention)


def data(vocab: int, seq: int) -> tuple[Any, Any]:
    """One row: inputs and next-token targets, [1, seq] each, the same for every runner."""
    t = random_tokens(vocab, (1, seq + 1))
    return t[:, :-1], t[:, 1:]


# --- the children: one job each, reporting JSON lines on stdout --------------------------------------------------

OOM = re.compile(r"RESOURCE_EXHAUSTED|out of memory|OutOfMemory", re.IGNORECASE)
_SENT: dict[str, Any] = {}  # what this child has reported so far


_T0 = time.perf_counter()


def emit(**kw: Any) -> None:
    """One progress line to the parent (the last value of each key wins); stage: how far the job got, and
    `<stage>_at_s` when it got there (seconds since the child started)."""
    if "stage" in kw:
        kw[f"{kw['stage']}_at_s"] = round(time.perf_counter() - _T0, 2)
    _SENT.update(kw)
    print(json.dumps(kw), flush=True)


def gemmatune_child(job: dict[str, Any]) -> None:
    from gemmatune.platforms import configure_jax

    configure_jax()  # as the CLI: off a TPU VM, JAX does not try libtpu
    import jax
    import jax.numpy as jnp

    from gemmatune import sharding
    from gemmatune.attention import check_forced
    from gemmatune.plan import plan_here
    from gemmatune.step import Shapes, abstract_step

    cfg, seq = model_config(job["model"]), job["seq"]
    tcfg = train_config(seq, job["attention"])
    device = jax.devices()[0]
    emit(device=device.device_kind, platform=device.platform, stage="plan")
    if not (job["smoke"] and tcfg.attention == "flash"):  # --smoke runs the kernel in Pallas interpret mode
        check_forced(tcfg.attention, jax.default_backend(), cfg, seq)  # as `gemmatune train` refuses a kernel
    if job["plan"]:
        t0 = time.perf_counter()
        p = plan_here(cfg, tcfg)
        emit(plan_bytes=p.bytes["total"], plan_parts=p.bytes, capacity_bytes=p.capacity,
             plan_s=time.perf_counter() - t0)
    emit(stage="compile")
    mesh = sharding.make_mesh(None, jax.devices()[:1], cfg, 1)
    step, (state_s, frozen_s, batch_s) = abstract_step(cfg, tcfg, mesh, Shapes(1, 1, seq))
    t0 = time.perf_counter()
    compiled = step.lower(state_s, frozen_s, batch_s).compile()
    emit(compile_s=time.perf_counter() - t0, stage="init")

    def placed(tree: Any) -> Any:
        return jax.tree.map(lambda s: s.sharding, tree)

    # Random weights drawn on the device: one pool of normal(0, 0.02) draws, a prime count of them, tiled into every
    # weight and adapter (rows do not repeat in step; the adapters' B is not zero, the same work as a trained
    # adapter's); Adam's moments and the counters zero, as optax starts them. Nothing but the arguments themselves
    # is allocated, and it compiles in a fraction of a second, where a draw per array takes seconds.
    def fill(key: jax.Array) -> Any:
        pool = 0.02 * jax.random.normal(key, (1_000_003,))

        def like(path: tuple[Any, ...], s: jax.ShapeDtypeStruct) -> jax.Array:
            if jax.dtypes.issubdtype(s.dtype, jax.dtypes.prng_key):
                return jax.random.key(1)
            if getattr(path[0], "idx", None) == 1 or getattr(path[1], "key", None) == "params":  # frozen, adapters
                return jnp.resize(pool.astype(s.dtype), s.shape)
            return jnp.zeros(s.shape, s.dtype)

        return jax.tree_util.tree_map_with_path(like, (state_s, frozen_s))

    state, frozen = jax.jit(fill, out_shardings=placed((state_s, frozen_s)))(jax.random.key(0))
    x, y = data(cfg.vocab_size, seq)
    ones = jnp.ones(x.shape, jnp.int32)
    rows = {"inputs": x, "targets": y, "weights": ones.astype(jnp.float32), "segment_ids": ones,
            "positions": jnp.arange(seq, dtype=jnp.int32)[None]}
    batch = jax.device_put(Shapes(1, 1, seq).stack(rows), placed(batch_s))
    jax.block_until_ready((state, frozen, batch))
    emit(stage="steps")
    last: dict[str, Any] = {}

    def one() -> None:
        nonlocal state
        state, last["metrics"] = compiled(state, frozen, batch)
        jax.block_until_ready((state, last["metrics"]))

    times = call_times(one, job["steps"], job["warmup"])
    stats = device.memory_stats() or {}  # a CPU device has none
    emit(status="ok", stage="done", step_times=times, peak_bytes=stats.get("peak_bytes_in_use"),
         loss=float(last["metrics"]["loss"]), capacity_bytes=stats.get("bytes_limit"))


def hf_child(job: dict[str, Any]) -> None:
    import numpy as np
    import torch
    import transformers

    cfg, seq = model_config(job["model"]), job["seq"]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    emit(device=torch.cuda.get_device_name() if cuda else "cpu", platform=device.type, stage="build")
    config_class, model_class = {"gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
                                 "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM)}[cfg.family]
    d = {k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "model_type")}
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # the base built in bfloat16, on the device: no float32 or host copy
    try:
        with device:
            model = model_class(config_class(**d, attn_implementation=job["attention"]))
    finally:
        torch.set_default_dtype(default)
    from peft import LoraConfig as PeftLoraConfig  # after the build: a refused model does not wait for peft's import
    from peft import get_peft_model

    lora = LoraConfig(rank=RANK)
    model = get_peft_model(model, PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0,
                                                 target_modules=HF_TARGETS))
    if job["hf_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    x, y = (torch.from_numpy(a.astype(np.int64)).to(device) for a in data(cfg.vocab_size, seq))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()  # the peak from here: weights, adapters, optimizer, one step
    emit(stage="steps", adapter_dtype=str(params[0].dtype).removeprefix("torch."),
         base_dtype=str(model.get_base_model().model.embed_tokens.weight.dtype).removeprefix("torch."))
    last: dict[str, float] = {}

    def one() -> None:
        logits = model(input_ids=x, use_cache=False).logits  # the final soft-cap applied
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        last["loss"] = loss.item()

    times = call_times(one, job["steps"], job["warmup"])
    emit(status="ok", stage="done", step_times=times, loss=last["loss"],
         peak_bytes=torch.cuda.max_memory_allocated() if cuda else None)


def child(job: dict[str, Any]) -> None:
    """Run one job; every failure is reported as a status and a reason (exit 0): oom; refused (the library refused
    the configuration while building or tracing, before computing anything: a kernel that does not take it); error."""
    from gemmatune.errors import GemmatuneError

    try:
        (gemmatune_child if job["tool"] == "gemmatune" else hf_child)(job)
    except Exception as e:  # a report, not a crash: the parent records it and goes on
        text = f"{type(e).__name__}: {e}".strip()
        stage = _SENT.get("stage", "start")
        if OOM.search(text):
            status = "oom"
        elif isinstance(e, ValueError | NotImplementedError | GemmatuneError) and stage in ("plan", "compile", "build"):
            status = "refused"
        else:
            status = "error"
        emit(status=status, reason=text.splitlines()[0][:400], detail=text[:3000], failed_at=stage)


# --- the parent: the jobs in order, within the budget ------------------------------------------------------------

def card_peak(name: str | None, override: float | None) -> tuple[float | None, str]:
    """(dense bfloat16 TFLOP/s, where it came from) of the card called `name`."""
    if override:
        return override, "--peak-tflops"
    for pattern, tflops, label in PEAKS:
        if name and re.search(pattern, name):
            return tflops, f"table: {label}"
    return None, f"unknown card {name!r}: pass --peak-tflops"


def start_process(cmd: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[str], float]:
    """The process, in its own session (stopping it stops whatever it started), and when it started."""
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True), time.perf_counter()


def run_process(cmd: list[str], env: dict[str, str], timeout: float,
                started: tuple[subprocess.Popen[str], float] | None = None) -> tuple[str, str, int | None, float]:
    """(stdout, stderr, exit status or None when stopped at `timeout`, seconds) of `cmd`, or of the process
    `started` for it earlier."""
    proc, t0 = started or start_process(cmd, env)
    try:
        out, err = proc.communicate(timeout=max(timeout, 1.0))
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        rc = None
    return out, err, rc, time.perf_counter() - t0


def last_lines(err: str, n: int = 3) -> str:
    """The last n lines of a child's stderr that are not absl/XLA log lines."""
    lines = [ln.strip() for ln in err.splitlines() if ln.strip() and not re.match(r"^[WIEF]\d{4} ", ln.strip())]
    return " | ".join(lines[-n:])[-600:]


def median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def versions() -> dict[str, str | None]:
    import importlib.metadata

    out: dict[str, str | None] = {}
    for name in ("jax", "jaxlib", "torch", "transformers", "peft"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    try:
        out["gemmatune commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                                 capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        out["gemmatune commit"] = None
    return out


def figures(rec: dict[str, Any], peak_tflops: float | None) -> None:
    """A run's tokens/s (median step), model FLOPs utilisation against its card's peak (peak_tflops: the
    --peak-tflops override) and plan / measured peak, from the figures its child reported."""
    if rec.get("step_times"):
        rec["step_s"] = median(rec["step_times"])
        rec["tokens_per_s"] = rec["seq"] / rec["step_s"]
        rec["flops_per_token"] = flops_per_token(Workload(model_config(rec["model"]), 1, rec["seq"]), RANK)
        peak, _ = card_peak(rec.get("device"), peak_tflops)
        rec["mfu"] = rec["flops_per_token"] * rec["tokens_per_s"] / (peak * 1e12) if peak else None
    if rec.get("plan_bytes") and rec.get("peak_bytes"):
        rec["plan_over_measured"] = rec["plan_bytes"] / rec["peak_bytes"]


def goals(all_runs: list[dict[str, Any]], goal_case: str, long_seq: int) -> list[dict[str, Any]]:
    """Issue 16's goals against the runs: gemmatune's fastest run over transformers + PEFT's fastest in goal_case
    (tokens/s and peak memory), the best MFU of each case at long_seq, and every plan / measured peak."""
    runs = [r for r in all_runs if r["status"] == "ok" and r.get("tokens_per_s")]

    def best(case: str, tool: str, key: str = "tokens_per_s") -> dict[str, Any] | None:
        mine = [r for r in runs if r["case"] == case and r["tool"] == tool and r.get(key) is not None]
        return max(mine, key=lambda r: r[key]) if mine else None

    out = []
    ours, theirs = best(goal_case, "gemmatune"), best(goal_case, "hf")
    compared = (f"{ours['runner']} vs {theirs['runner']}" if ours and theirs else
                "not measured: " + ("no gemmatune run" if not ours else "no transformers + PEFT run"))
    speed = ours["tokens_per_s"] / theirs["tokens_per_s"] if ours and theirs else None
    memory = (ours["peak_bytes"] / theirs["peak_bytes"] if ours and theirs and ours.get("peak_bytes")
              and theirs.get("peak_bytes") else None)
    out.append({"goal": f"tokens/s over transformers + PEFT's, {goal_case}", "target": f">= {GOAL_SPEED}x",
                "measured": speed, "met": None if speed is None else speed >= GOAL_SPEED, "compared": compared})
    out.append({"goal": f"peak memory over transformers + PEFT's, {goal_case}",
                "target": f"<= {GOAL_MEMORY}x", "measured": memory,
                "met": None if memory is None else memory <= GOAL_MEMORY, "compared": compared})
    for case in dict.fromkeys(r["case"] for r in all_runs if r["seq"] == long_seq):
        top = best(case, "gemmatune", "mfu")
        out.append({"goal": f"MFU, {case}", "target": f">= {GOAL_MFU:.0%}",
                    "measured": top["mfu"] if top else None,
                    "met": None if top is None else top["mfu"] >= GOAL_MFU,
                    "compared": top["runner"] if top else "not measured"})
    for r in runs:
        if r.get("plan_over_measured"):
            ratio = r["plan_over_measured"]
            out.append({"goal": f"plan / measured peak, {r['case']} {r['runner']}",
                        "target": f"{1 - GOAL_PLAN:.2f}-{1 + GOAL_PLAN:.2f}", "measured": ratio,
                        "met": abs(ratio - 1) <= GOAL_PLAN, "compared": "plan.plan_here (= plan --device gpu)"})
    return out


class Bench:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.t_start = time.perf_counter()
        self.deadline = self.t_start + a.budget
        base = re.sub(r"\.(json|md)$", "", a.out)
        self.json_path, self.md_path = Path(base + ".json"), Path(base + ".md")
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        self.cache = tempfile.mkdtemp(prefix="gemmatune-gpu-cache-")
        self.started: dict[str, tuple[subprocess.Popen[str], float]] = {}  # job -> its process, started early
        self.goal_case = f"small@{SMOKE_SEQ}" if a.smoke else "gemma2-9b@4096"
        self.long_seq = SMOKE_SEQ if a.smoke else 4096
        self.results: dict[str, Any] = {
            "title": "gemmatune vs transformers + PEFT: one LoRA step on this machine's GPU (benchmarks/gpu.py)",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": {"jax": None, "torch": None, "peak_tflops": None, "peak_source": None},
            "versions": versions(),
            "settings": {"smoke": a.smoke, "batch": 1, "lora_rank": RANK, "lora_alpha": LoraConfig().alpha,
                         "lora_targets": HF_TARGETS, "dtype": "bfloat16 base, float32 adapters and optimizer",
                         "warmup_steps": a.warmup, "timed_steps": a.steps, "budget_s": a.budget,
                         "hf_gradient_checkpointing": a.hf_checkpointing,
                         "xla_mem_fraction": self.env()["XLA_PYTHON_CLIENT_MEM_FRACTION"],
                         "flops": "compare.flops_per_token: 4 N_base + 6 N_lora + 12 H E sum(T_attn), causal "
                                  "T_attn ~ (T+1)/2, no recomputation (module docstring)"},
            "goals": [], "runs": [], "plan_cli": None, "flags": []}

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def env(self, extra: dict[str, str] | None = None, cache: bool = True) -> dict[str, str]:
        """A child's environment: the repository's src importable, gemmatune's memory fraction (the CLI's default),
        the shared compilation cache, and `extra` (XLA_FLAGS appended to any set)."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
        if not self.a.smoke and env.get("JAX_PLATFORMS") == "cpu":  # a CPU habit would measure the CPU
            del env["JAX_PLATFORMS"]
        if self.a.smoke:  # the CPU only, even on a GPU machine; torch on one thread beside the JAX jobs
            env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
                       XLA_FLAGS=f"{env.get('XLA_FLAGS', '')} {SMOKE_XLA_FLAGS}".strip())
        if cache:
            env.update(JAX_COMPILATION_CACHE_DIR=self.cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
        for k, v in (extra or {}).items():
            env[k] = f"{env.get(k, '')} {v}".strip() if k == "XLA_FLAGS" else v
        return env

    # --- jobs -----------------------------------------------------------------------------------------------

    def child_command(self, tool: str, attention: str, model: str, seq: int, plan: bool,
                      checkpointing: bool = False) -> list[str]:
        job = {"tool": tool, "attention": attention, "model": model, "seq": seq, "steps": self.a.steps,
               "warmup": self.a.warmup, "plan": plan, "hf_checkpointing": checkpointing, "smoke": self.a.smoke}
        return [sys.executable, __file__, "--child", json.dumps(job)]

    def job(self, rec: dict[str, Any], expect: float, env: dict[str, str], plan: bool) -> None:
        """Run one runner's job (or record why not) into rec."""
        if self.left() < max(expect, 5.0):
            rec.update(status="skipped: time", reason=f"{max(self.left(), 0):.0f} s of the budget left, about "
                                                      f"{expect:.0f} s needed")
            return
        timeout = self.left() if self.a.smoke else min(self.left(), 4 * expect)
        cmd = self.child_command(rec["tool"], rec["attention"], rec["model"], rec["seq"], plan,
                                 rec.get("hf_checkpointing", False))
        out, err, rc, wall = run_process(cmd, env, timeout, self.started.pop(" ".join(cmd), None))
        for line in out.splitlines():
            try:
                d = json.loads(line)
            except ValueError:
                continue  # a library's own print
            if isinstance(d, dict):
                rec.update(d)
        rec["wall_s"] = wall
        if rc is None:
            rec.update(status="timeout", reason=f"stopped after {wall:.0f} s (the budget), while at "
                                                f"{rec.get('stage', 'start')}")
        elif "status" not in rec:
            rec.update(status="crash", reason=f"exit status {rc}: {last_lines(err)}")
        self.derive(rec)

    def derive(self, rec: dict[str, Any]) -> None:
        """The card's name and peak into results (the first that reports them), the run's figures into rec."""
        dev = self.results["device"]
        key = "jax" if rec["tool"] == "gemmatune" else "torch"
        if rec.get("device") and dev[key] is None:
            dev[key] = rec["device"]
        if dev["peak_tflops"] is None and (dev["jax"] or dev["torch"] or self.a.peak_tflops):
            dev["peak_tflops"], dev["peak_source"] = card_peak(dev["jax"] or dev["torch"], self.a.peak_tflops)
        figures(rec, self.a.peak_tflops)

    def reused_refusal(self, runner: Runner, name: str, model: str) -> dict[str, Any] | None:
        """An earlier refusal of this runner that holds here too: gemmatune's on the same model (its kernels
        refuse a config), transformers' on the same family (its model classes refuse an attention)."""
        family = model_config(model).family
        for r in self.results["runs"]:
            same = r["model"] == model if runner.tool == "gemmatune" else model_config(r["model"]).family == family
            if r["runner"] == name and same and r["status"] == "refused" and "reused_from" not in r:
                return r
        return None

    def case(self, model: str, seq: int, names: tuple[str, ...]) -> None:
        cfg = model_config(model)
        for name in names:
            runner = RUNNERS[name]
            if cfg.family not in runner.families:
                continue
            rec: dict[str, Any] = {"case": f"{model}@{seq}", "model": model, "seq": seq, "runner": name,
                                   "tool": runner.tool, "attention": runner.attention}
            if runner.tool == "hf":
                rec["hf_checkpointing"] = self.a.hf_checkpointing
            earlier = self.reused_refusal(runner, name, model)
            expect = 0.0 if self.a.smoke else EXPECT[(runner.tool, model)]
            if earlier:
                rec.update(status="refused", reason=earlier["reason"], reused_from=earlier["case"])
            else:
                self.job(rec, expect, self.env(), plan=runner.tool == "gemmatune")
            self.results["runs"].append(rec)
            self.report(rec, rec["case"], name)
            self.save()
            if rec["status"] == "oom" and rec.get("hf_checkpointing") is False:
                # transformers' usual remedy for a long sequence (and gemmatune recomputes too: remat block), so
                # that the goal's case has a baseline to compare with.
                again = {**{k: rec[k] for k in ("case", "model", "seq", "tool", "attention")},
                         "runner": f"{name} +ckpt", "hf_checkpointing": True}
                self.job(again, expect, self.env(), plan=False)
                self.results["runs"].append(again)
                self.report(again, again["case"], again["runner"])
                self.save()

    def plan_cli(self) -> None:
        """`gemmatune plan --device gpu --json` (cpu in --smoke) for the first measured gemmatune run: the command
        end to end, whose total must be the in-process plan's."""
        run = next((r for r in self.results["runs"] if r["tool"] == "gemmatune" and r.get("plan_bytes")
                    and r["model"] in PRESETS), None)
        rec: dict[str, Any] = {"status": "skipped", "reason": "no gemmatune run was planned before"}
        if run is not None:
            device = "gpu" if run.get("platform") == "gpu" else "cpu"
            args = ["plan", "--model", run["model"], "--device", device, "--seq-len", str(run["seq"]),
                    "--batch-size", "1", "--lora-rank", str(RANK), "--attention", run["attention"], "--json"]
            rec = {"command": "gemmatune " + " ".join(args), "for": f"{run['case']} {run['runner']}",
                   "in_process_bytes": run["plan_bytes"]}
            if self.left() < 10:
                rec.update(status="skipped: time", reason=f"{max(self.left(), 0):.0f} s of the budget left")
            else:
                out, err, rc, wall = run_process([sys.executable, "-m", "gemmatune.cli", *args], self.env(),
                                                 min(self.left(), 120))
                rec["wall_s"] = wall
                try:
                    p = json.loads(out)
                    rec.update(status="ok", total_bytes=p["bytes"]["total"], capacity_bytes=p["capacity"],
                               note=p["note"], same=p["bytes"]["total"] == run["plan_bytes"])
                except (ValueError, KeyError, TypeError):
                    rec.update(status="timeout" if rc is None else "error",
                               reason=f"exit status {rc}: {last_lines(err)}")
        self.results["plan_cli"] = rec
        print(f"  plan CLI: {rec['status']}" + (f", total {rec['total_bytes'] / GiB:.2f} GiB, the same as in "
                                                f"process: {rec['same']}" if rec.get("total_bytes") else
                                                f" ({rec.get('reason')})"), flush=True)
        self.save()

    def flags(self) -> None:
        model, seq = ("small", SMOKE_SEQ) if self.a.smoke else FLAG_CASE
        case = f"{model}@{seq}"
        measured = [r for r in self.results["runs"] if r["case"] == case and r["tool"] == "gemmatune"
                    and r["status"] == "ok"]
        base = next((r for r in measured if r["attention"] == "flash"), None) or (
            max(measured, key=lambda r: r["tokens_per_s"]) if measured else None)
        attention = base["attention"] if base else "flash"
        for variant, extra, what in FLAGS:
            if self.a.smoke and variant not in SMOKE_FLAGS:
                continue
            rec: dict[str, Any] = {"variant": variant, "setting": what, "case": case, "model": model, "seq": seq,
                                   "runner": f"gemmatune {attention}", "tool": "gemmatune", "attention": attention}
            if variant == "default" and base is not None:  # the main run is this setting
                rec.update({k: base[k] for k in ("status", "device", "platform", "step_times", "step_s",
                                                 "tokens_per_s", "peak_bytes", "mfu", "loss") if k in base},
                           reused_from=f"{base['case']} {base['runner']}",
                           compile_s=base.get("plan_s", base.get("compile_s")))  # its fresh compile: the plan's
            else:
                expect = 0.0 if self.a.smoke else EXPECT[("gemmatune", model)]
                # A changed XLA_FLAGS compiles afresh (no cached program or autotuning results of another setting);
                # the others take the default's program from the cache.
                rec["compile_cached"] = "XLA_FLAGS" not in extra
                self.job(rec, expect, self.env(extra, cache=rec["compile_cached"]), plan=False)
            self.results["flags"].append(rec)
            self.report(rec, f"flags {case}", variant)
            self.save()

    # --- output ---------------------------------------------------------------------------------------------

    def report(self, rec: dict[str, Any], where: str, what: str) -> None:
        figures = ""
        if rec.get("tokens_per_s"):
            figures = f": {rec['tokens_per_s']:.0f} tokens/s"
            if rec.get("peak_bytes"):
                figures += f", peak {rec['peak_bytes'] / GiB:.2f} GiB"
            if rec.get("mfu") is not None:
                figures += f", MFU {rec['mfu']:.1%}"
            if rec.get("plan_over_measured"):
                figures += f", plan / peak {rec['plan_over_measured']:.2f}"
        elif rec.get("reason"):
            figures = f": {rec['reason'][:160]}"
        print(f"  {where:18} {what:26} {rec['status']}{figures} ({rec.get('wall_s', 0):.0f} s; "
              f"{max(self.left(), 0):.0f} s left)", flush=True)

    def save(self) -> None:
        from gemmatune.atomic import write_text

        self.results["goals"] = goals(self.results["runs"], self.goal_case, self.long_seq)
        self.results["elapsed_s"] = time.perf_counter() - self.t_start
        write_text(self.json_path, json.dumps(self.results, indent=1) + "\n")
        write_text(self.md_path, markdown(self.results))

    def run(self) -> None:
        a = self.a
        names = tuple(n for n in (a.runners.split(",") if a.runners else DEFAULT_RUNNERS))
        if a.smoke:
            order: list[Any] = [(m, s, r) for m, s, r in SMOKE_CASES]
            order[1:1] = ["plan_cli"]
            order.append("flags")
            # Timings mean nothing here: the transformers jobs start now, beside the JAX ones (two cores' worth).
            for model, seq, runners in SMOKE_CASES:
                for name in runners:
                    if RUNNERS[name].tool == "hf":
                        cmd = self.child_command("hf", RUNNERS[name].attention, model, seq, False,
                                                 self.a.hf_checkpointing)
                        self.started[" ".join(cmd)] = start_process(cmd, self.env())
        else:
            wanted = a.cases.split(",") if a.cases else [f"{m}@{s}" for s in SEQS for m in MODELS]
            cases = [(m, s, names) for s in SEQS for m in MODELS if f"{m}@{s}" in wanted]
            order = cases[:1] + ["plan_cli"] * bool(cases) + [c for c in cases[1:] if c[1] == SEQS[0]]
            order += [] if a.no_flags else ["flags"]
            order += [c for c in cases[1:] if c[1] != SEQS[0]]
        print(f"benchmarks/gpu.py: {a.budget:.0f} s budget; writing {self.json_path} and {self.md_path}", flush=True)
        try:
            for item in order:
                if item == "plan_cli":
                    self.plan_cli()
                elif item == "flags":
                    self.flags()
                else:
                    self.case(*item)
        finally:
            for proc, _ in self.started.values():  # started early, never asked for (a stop midway)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            shutil.rmtree(self.cache, ignore_errors=True)
            finish(self.results, self.t_start, None)
            self.save()


# --- the table ---------------------------------------------------------------------------------------------------

def _gib(b: Any) -> str:
    return f"{b / GiB:.2f}" if b else "-"


def _cell(text: Any) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def _status(r: dict[str, Any]) -> str:
    if r["status"] == "ok":
        return "ok"
    reason = _cell(r.get("reason") or "")[:140]
    return f"{r['status']}: {reason}" + (f" (as {r['reused_from']})" if r.get("reused_from") else "")


def markdown(res: dict[str, Any]) -> str:
    dev, s, v = res["device"], res["settings"], res["versions"]
    card = dev["jax"] or dev["torch"] or "no card measured"
    peak = f"{dev['peak_tflops']:.0f} TFLOP/s ({dev['peak_source']})" if dev["peak_tflops"] else (
        dev["peak_source"] or "unknown")
    lines = [f"## One LoRA step on {card}{' (--smoke: CPU, tiny models)' if s['smoke'] else ''}", "",
             f"JAX device: {dev['jax']}; torch device: {dev['torch']}; bfloat16 dense peak {peak}. {res['date']}; "
             + ", ".join(f"{k} {val}" for k, val in v.items() if val) + ".",
             "", f"Batch 1 x seq (random tokens, every position trained); LoRA r{s['lora_rank']} alpha "
                 f"{s['lora_alpha']:g} on q,k,v,o,gate,up,down; {s['dtype']}; random weights; {s['warmup_steps']} "
                 f"warm-up + {s['timed_steps']} timed steps (median); transformers + PEFT "
                 f"{'with' if s['hf_gradient_checkpointing'] else 'without'} gradient checkpointing; gemmatune with "
                 f"train's defaults (remat block, loss_chunk 512), XLA_PYTHON_CLIENT_MEM_FRACTION "
                 f"{s['xla_mem_fraction']}. MFU: {s['flops']}. Plan: `gemmatune plan --device gpu`'s total "
                 f"(plan.plan_here in the run's process) over the measured peak.",
             "", "| case | runner | tokens/s | peak GiB | MFU | plan GiB | plan / peak | x HF tokens/s | x HF memory | "
                 "status |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    ok = [r for r in res["runs"] if r["status"] == "ok" and r.get("tokens_per_s")]
    for r in res["runs"]:
        hf = [h for h in ok if h["case"] == r["case"] and h["tool"] == "hf"]
        ref = max(hf, key=lambda h: h["tokens_per_s"]) if hf and r["tool"] == "gemmatune" else None
        speed = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref and r.get("tokens_per_s") else "-"
        memory = (f"{r['peak_bytes'] / ref['peak_bytes']:.2f}x" if ref and r.get("peak_bytes") and ref.get("peak_bytes")
                  else "-")
        lines.append(f"| {r['case']} | {r['runner']} | {r['tokens_per_s']:.0f} | " if r.get("tokens_per_s") else
                     f"| {r['case']} | {r['runner']} | - | ")
        lines[-1] += (f"{_gib(r.get('peak_bytes'))} | {'-' if r.get('mfu') is None else format(r['mfu'], '.1%')} | "
                      f"{_gib(r.get('plan_bytes'))} | "
                      f"{format(r['plan_over_measured'], '.2f') if r.get('plan_over_measured') else '-'} | "
                      f"{speed} | {memory} | {_status(r)} |")
    lines += ["", "(x HF: gemmatune's figure over the fastest transformers + PEFT run of the same case.)", "",
              "### Goals (issue 16)", "", "| goal | target | measured | met | compared |", "|---|---|---:|---|---|"]
    for g in res["goals"]:
        m = g["measured"]
        shown = "-" if m is None else (f"{m:.1%}" if g["goal"].startswith("MFU") else f"{m:.2f}")
        met = {True: "yes", False: "NO", None: "-"}[g["met"]]
        lines.append(f"| {g['goal']} | {g['target']} | {shown} | {met} | {_cell(g['compared'])} |")
    pc = res["plan_cli"]
    if pc:
        lines += ["", f"`{pc['command']}`: " + (f"total {_gib(pc['total_bytes'])} GiB of {_gib(pc['capacity_bytes'])}, "
                                                f"{'the same as' if pc['same'] else 'NOT the same as'} in the run's "
                                                f"process ({_gib(pc['in_process_bytes'])})"
                                                if pc["status"] == "ok" else _status(pc))
                  if pc.get("command") else "`gemmatune plan --device gpu`: " + _status(pc)]
    if res["flags"]:
        default = next((f for f in res["flags"] if f["variant"] == "default" and f.get("tokens_per_s")), None)
        lines += ["", f"### XLA settings ({res['flags'][0]['case']}, {res['flags'][0]['runner']})", "",
                  "| setting | tokens/s | x default | peak GiB | compile s | status |", "|---|---:|---:|---:|---:|---|"]
        for f in res["flags"]:
            tps = f.get("tokens_per_s")
            vs = f"{tps / default['tokens_per_s']:.3f}" if tps and default else "-"
            compile_s = ("cached" if f.get("compile_cached") else f"{f['compile_s']:.0f}"
                         if f.get("compile_s") is not None else "-")
            lines.append(f"| {_cell(f['setting'])} | {f'{tps:.0f}' if tps else '-'} | {vs} | "
                         f"{_gib(f.get('peak_bytes'))} | {compile_s} | {_status(f)} |")
    lines += ["", f"{res.get('elapsed_s', 0):.0f} s in all (budget {s['budget_s']:.0f} s)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "gpu_results"),
                    help="writes OUT.json and OUT.md (default: benchmarks/gpu_results)")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for everything (default: 450)")
    ap.add_argument("--cases", default="", help="comma-separated MODEL@SEQ subset of "
                    + ",".join(f"{m}@{s}" for s in SEQS for m in MODELS) + "; none: only the XLA settings")
    ap.add_argument("--runners", default="", help=f"comma-separated subset of {', '.join(RUNNERS)} (default: "
                                                  f"{', '.join(DEFAULT_RUNNERS)})")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (default: 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (default: 1)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bfloat16 peak, when the "
                                                                    "table does not know it")
    ap.add_argument("--no-flags", action="store_true", help="skip the XLA settings")
    ap.add_argument("--hf-checkpointing", action="store_true", help="transformers with gradient checkpointing")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny models, 1 timed step: every code path, seconds")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(json.loads(a.child))
    unknown = [r for r in a.runners.split(",") if r and r not in RUNNERS] + [
        c for c in a.cases.split(",") if c and c not in {"none", *(f"{m}@{s}" for s in SEQS for m in MODELS)}]
    if unknown:
        raise SystemExit(f"unknown runner or case: {', '.join(unknown)}")
    if a.smoke:
        a.steps, a.warmup = 1, 1
    Bench(a).run()


if __name__ == "__main__":
    main()
