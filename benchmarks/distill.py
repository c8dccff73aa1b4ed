"""Knowledge distillation (issue 15): a larger tiny-family teacher trained on a task, distilled into a smaller student,
against supervised fine-tuning of the same student for the same steps; and the memory and speed of a distillation
step against an SFT step.

    python benchmarks/distill.py [--only quality,memory] [--train-on model|all] [--steps 60] [--teacher-steps 150]
                                 [--batch 16] [--lr 2e-3] [--held-out 128] [--variant kd_temperature=2,...]
                                 [--memory-pairs gemma2-2b:gemma2-9b,...] [--memory-compiler tpu|cpu]
                                 [--json out.json]

quality  The task of benchmarks/tasks.py (an ISO date rewritten as day.month.year, "Date: 2024-03-15\\nDMY: " ->
         "15.03.2024"), tokenized by the embedded tiny model's tokenizer (digits split: 32 tokens per example with
         <bos> and <eos>); N_TRAIN training dates and --held-out others, disjoint (tasks.splits). --train-on model
         trains the answer and <eos> (the task as tasks.py defines it); all trains every token of the example too
         (the prompt's date is random, so its next-token distribution has entropy a teacher knows and a label does
         not carry).
         The teacher: the tiny model's config widened and deepened (TEACHER_FIELDS: hidden 256, 6 layers, 8 heads;
         about 4x the parameters), same tokenizer, random init, written as a Hugging Face checkpoint and trained with
         `gemmatune.train(TrainConfig(tune="full", ...))` for --teacher-steps. Its final weights are read back from
         the run's last checkpoint and written as a checkpoint again: the --teacher of the students.
         The students: the embedded tiny model (its random weights), each trained for --steps with the same data,
         order, lr, batch and schedule (full fine-tuning, float32, AdamW after clipping at 1.0, 5% warmup then
         cosine): sft; distill with the teacher in the step (STUDENTS: the default kd settings, forward KL at
         temperature 1 mixed half and half with the cross-entropy, and pure distillation, kd_alpha 1); distill
         from a teacher cache (top-64 log-probabilities computed once, --teacher-cache); and one more in-step
         distillation student per --variant (TrainConfig fields, e.g. kd_temperature=2,kd_alpha=0.9).
         Scored for each model: held-out cross-entropy of the trained tokens (gemmatune's own validation pass at
         the end of the run: val_loss for sft, val_ce, the cross-entropy part, for distill; the same tokens and
         weights either way), and held-out exact match (tasks.exact_match of greedy answers from tasks.
         gemmatune_answers on the final weights). Speed: training tokens/s over steps 2.. from each run's
         metrics.jsonl (every step has the same positions, so the ratio is the ratio of steps/s).
memory   XLA's memory_analysis of the compiled train step (step.abstract_step, as `gemmatune plan` and
         benchmarks/qlora.py compile it, from shapes) for an SFT step of a student, a
         distillation step with the teacher in it, and a distillation step from a teacher cache (top-64): for each
         --memory-pairs (default gemma2-9b -> gemma2-2b; seq 1024, batch 1, LoRA r=8, bfloat16, remat full) and
         the tiny pair of the quality part at its own shapes (full fine-tuning, float32, batch 16 x 32), compiled
         for one TPU v5p chip by XLA's TPU compiler (libtpu, no TPU needed; the stand-in `gemmatune plan` uses for
         GPUs), or --memory-compiler cpu (whose bfloat16 steps hold a float32 copy of every projection:
         BENCHMARKS.md, QLoRA section).

Quality runs in this process, memory in a child process (the compiler is fixed when JAX starts); the processor and
the load average are recorded with the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
import tasks  # noqa: E402
from common import cpu_name, finish  # noqa: E402

N_TRAIN = 2000
TEACHER_FIELDS = {"hidden_size": 256, "intermediate_size": 512, "num_layers": 6, "num_heads": 8, "num_kv_heads": 4,
                  "head_dim": 32, "query_pre_attn_scalar": 32}
# The students: (name, TrainConfig fields beyond the shared recipe). "teacher" and "teacher_cache" are filled in.
STUDENTS = (
    ("sft", {}),
    ("distill", {"method": "distill", "teacher": True}),
    ("distill, kd_alpha 1", {"method": "distill", "teacher": True, "kd_alpha": 1.0}),
    ("distill, teacher cache top-64", {"method": "distill", "teacher": True, "teacher_cache": True, "kd_topk": 64}),
)
MEMORY_PAIRS = "gemma2-2b:gemma2-9b"  # --memory-pairs default: student:teacher presets, comma-separated
PARTS = ("quality", "memory")
MiB = 2 ** 20


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What every student run shares (and the teacher, for its own number of steps)."""

    steps: int = 60
    teacher_steps: int = 150
    batch: int = 16
    seq: int = 32  # input positions per row: one 32-token example per row
    lr: float = 2e-3
    train_on: str = "model"

    def train_config(self, model: Path, output: Path, data: Path, val: Path, steps: int, **kw: Any):
        from gemmatune import DataConfig, TrainConfig

        return TrainConfig(model=str(model), output=str(output), tune="full", dtype="float32", max_steps=steps,
                           batch_size=self.batch, lr=self.lr, schedule="cosine", warmup_steps=max(steps // 20, 1),
                           clip_norm=1.0, weight_decay=0.0, log_every=1, report_to=("none",),
                           data=DataConfig(paths=(str(data),), val_paths=(str(val),), template=tasks.TEMPLATE,
                                           train_on=self.train_on, max_seq_len=self.seq, packing="pad"), **kw)


def teacher_config():
    from gemmatune.config import PRESETS

    return dataclasses.replace(PRESETS["tiny"], layer_types=(), **TEACHER_FIELDS)


def trained_weights(run_dir: Path) -> dict[str, Any]:
    """The weights of a full fine-tuning run (tune full) as its last checkpoint holds them: the train state's
    "params/..." entries, nested again."""
    import jax.numpy as jnp

    from gemmatune.checkpoint import STATE_FILE, latest_checkpoint
    from gemmatune.safetensors_io import SafetensorsReader

    out: dict[str, Any] = {}
    with SafetensorsReader(latest_checkpoint(run_dir) / STATE_FILE) as reader:
        for name in reader.tensors:
            head, *path = name.split("/")
            if head != "params":
                continue
            node = out
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = jnp.asarray(reader.read(name))
    return out


def run_scores(run_dir: Path, steps: int) -> dict[str, Any]:
    """Held-out cross-entropy (the final validation pass), training tokens/s over steps 2.. and the last training
    loss, from the run's metrics.jsonl."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [m for m in lines if "val_loss" in m][-1]
    rates = [m["tokens_per_s"] for m in lines if "tokens_per_s" in m]
    assert len(rates) == steps, (len(rates), steps)
    return {"val_ce": val.get("val_ce", val["val_loss"]), "val_objective": val["val_loss"],
            "tokens_per_s": (len(rates) - 1) / sum(1 / r for r in rates[1:]),
            "train_loss": [m["loss"] for m in lines if "loss" in m][-1]}


def variant(spec: str) -> tuple[str, dict[str, Any]]:
    """--variant "kd_temperature=2,kd_alpha=0.9" -> an extra student distilled with the teacher in the step."""
    fields: dict[str, Any] = {"method": "distill", "teacher": True}
    for item in spec.split(","):
        key, _, value = item.partition("=")
        key, value = key.strip(), value.strip()
        fields[key] = int(value) if key == "kd_topk" else value if key == "kd_loss" else float(value)
    return f"distill, {spec}", fields


def quality(recipe: Recipe, n_held_out: int, tmp: Path, students_: tuple[tuple[str, dict[str, Any]], ...] = STUDENTS
            ) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    import gemmatune
    from gemmatune.config import PRESETS
    from gemmatune.convert.hf import save_hf
    from gemmatune.hub import resolve_model
    from gemmatune.model import init_params
    from gemmatune.tokenizer import load_tokenizer

    tiny = resolve_model("tiny")
    tokenizer = load_tokenizer(tiny)
    train, held_out = tasks.splits(N_TRAIN, n_held_out)
    data, val = tasks.write_jsonl(train, tmp / "train.jsonl"), tasks.write_jsonl(held_out, tmp / "held_out.jsonl")

    def em(params: Any, cfg: Any) -> float:
        return tasks.exact_match(tasks.gemmatune_answers(params, cfg, tokenizer, held_out), held_out)

    tcfg = teacher_config()
    save_hf(tmp / "teacher-init", tcfg, init_params(tcfg, jax.random.key(1), jnp.float32, post_norm_mean=1.0),
            dtype="float32", tokenizer_dir=tiny)
    t0 = time.perf_counter()
    gemmatune.train(recipe.train_config(tmp / "teacher-init", tmp / "teacher-run", data, val, recipe.teacher_steps))
    train_s = time.perf_counter() - t0
    weights = trained_weights(tmp / "teacher-run")
    save_hf(tmp / "teacher", tcfg, weights, dtype="float32", tokenizer_dir=tiny)
    n_params = sum(a.size for a in jax.tree.leaves(weights))
    teacher = {"name": "teacher", "params": n_params, "train_s": train_s, "steps": recipe.teacher_steps,
               **run_scores(tmp / "teacher-run", recipe.teacher_steps), "em": em(weights, tcfg)}
    print(json.dumps(teacher), file=sys.stderr, flush=True)
    students = []
    for name, fields in students_:
        fields = {**fields, **({"teacher": str(tmp / "teacher")} if fields.get("teacher") else {}),
                  **({"teacher_cache": str(tmp / "cache")} if fields.get("teacher_cache") else {})}
        run = tmp / f"student-{len(students)}"
        t0 = time.perf_counter()
        gemmatune.train(recipe.train_config(tiny, run, data, val, recipe.steps, **fields))
        train_s = time.perf_counter() - t0
        weights = trained_weights(run)
        students.append({"name": name, "settings": {k: v for k, v in fields.items() if k not in ("teacher",
                                                                                                  "teacher_cache")},
                         "params": sum(a.size for a in jax.tree.leaves(weights)), "train_s": train_s,
                         **run_scores(run, recipe.steps), "em": em(weights, PRESETS["tiny"])})
        print(json.dumps(students[-1]), file=sys.stderr, flush=True)
    return {"teacher": teacher, "students": students}


def step_memory(cfg: Any, tcfg: Any, shapes: Any, devices: list[Any], teacher: Any = None) -> dict[str, Any]:
    """XLA's figures for the compiled train step on one device, the frozen weights' bytes among its arguments
    counted from shapes."""
    import jax.numpy as jnp

    from gemmatune import sharding
    from gemmatune.layout import nbytes, param_structs
    from gemmatune.step import abstract_step

    mesh = sharding.make_mesh(None, devices[:1], cfg)
    step, args = abstract_step(cfg, tcfg, mesh, shapes, teacher)
    t0 = time.perf_counter()
    stats = step.lower(*args).compile().memory_analysis()
    dtype = jnp.dtype(tcfg.dtype)
    student = 0 if tcfg.tune == "full" else nbytes(param_structs(cfg, dtype))
    return {"student_weights": student, "teacher_weights": nbytes(param_structs(teacher, dtype)) if teacher else 0,
            "arguments": stats.argument_size_in_bytes, "temporaries": stats.temp_size_in_bytes,
            "outputs": stats.output_size_in_bytes, "aliased": stats.alias_size_in_bytes,
            "total": stats.argument_size_in_bytes + stats.temp_size_in_bytes + stats.output_size_in_bytes
            - stats.alias_size_in_bytes, "compile_s": time.perf_counter() - t0}


def memory(recipe: Recipe, pairs: str, seq: int, batch: int, compiler: str) -> list[dict[str, Any]]:
    """SFT, in-step distillation and teacher-cache distillation steps of each pair, compiled for one device: a
    TPU v5p chip (XLA's TPU compiler, no TPU needed; the stand-in `gemmatune plan` uses for GPUs: bfloat16 native)
    or this machine's CPU."""
    import jax

    from gemmatune import DataConfig, TrainConfig
    from gemmatune.config import PRESETS
    from gemmatune.step import Shapes

    if compiler == "tpu":
        from jax.experimental import topologies

        devices = topologies.get_topology_desc(topology_name="v5p:1x1x1", platform="tpu",
                                               chips_per_host_bounds=(1, 1, 1)).devices
    else:
        devices = jax.devices()
    out = []
    cases = [(s, t, PRESETS[s], PRESETS[t], Shapes(1, batch, seq),
              TrainConfig(model=s, dtype="bfloat16", batch_size=batch, remat="full",
                          data=DataConfig(max_seq_len=seq)))
             for s, t in (pair.split(":") for pair in pairs.split(",") if pair)]
    tiny_tcfg = recipe.train_config(Path("tiny"), Path("unused"), Path("unused"), Path("unused"), recipe.steps)
    cases.append(("tiny", "tiny teacher", PRESETS["tiny"], teacher_config(), Shapes(1, recipe.batch, recipe.seq),
                  tiny_tcfg))
    for student, teacher, cfg, tcfg_t, shapes, tcfg in cases:
        kd = dataclasses.replace(tcfg, method="distill", teacher=teacher)
        row = {"student": student, "teacher": teacher, "shapes": dataclasses.asdict(shapes), "tune": tcfg.tune,
               "dtype": tcfg.dtype, "remat": tcfg.remat, "compiler": compiler, "kd_topk": kd.kd_topk,
               "sft": step_memory(cfg, tcfg, shapes, devices),
               "distill": step_memory(cfg, kd, shapes, devices, tcfg_t),
               "cache": step_memory(cfg, dataclasses.replace(kd, teacher_cache="cache"), shapes, devices)}
        out.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return out


def memory_child(a: argparse.Namespace, recipe: Recipe) -> list[dict[str, Any]]:
    """The memory part in a child process: the compiler is fixed when JAX starts. Environment as `gemmatune plan`
    sets it for libtpu off a TPU VM."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if a.memory_compiler == "tpu":
        env.update(TPU_SKIP_MDS_QUERY="1", TPU_ACCELERATOR_TYPE="v3-8", TPU_WORKER_HOSTNAMES="localhost",
                   ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    cmd = [sys.executable, __file__, "--child", "--memory-compiler", a.memory_compiler, "--memory-pairs",
           a.memory_pairs, "--memory-seq",
           str(a.memory_seq), "--memory-batch", str(a.memory_batch), "--steps", str(recipe.steps), "--batch",
           str(recipe.batch)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if p.returncode:
        raise SystemExit(f"memory failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def report_quality(q: dict[str, Any], recipe: Recipe, n_held_out: int) -> None:
    t, students = q["teacher"], q["students"]
    sft = students[0]
    print(f"\n  {'model':32}{'params':>9}{'steps':>7}{'held-out CE':>13}{'x SFT':>7}{'EM':>8}{'tokens/s':>10}"
          f"{'x SFT':>7}{'train s':>9}")
    for r in [t, *students]:
        ratio = "" if r is t else f"{r['val_ce'] / sft['val_ce']:7.3f}"
        speed = "" if r is t else f"{r['tokens_per_s'] / sft['tokens_per_s']:7.2f}"
        print(f"  {r['name']:32}{r['params']:9,}{r.get('steps', recipe.steps):7}{r['val_ce']:13.4f}{ratio:>7}"
              f"{r['em']:8.1%}{r['tokens_per_s']:10.0f}{speed:>7}{r['train_s']:9.1f}")
    print(f"  (held-out CE: mean cross-entropy of the trained tokens ({recipe.train_on}) of {n_held_out} held-out "
          "examples; EM: exact match of greedy answers; tokens/s: non-padding input positions per second over "
          "steps 2..; train s: the whole gemmatune.train call, data, teacher cache and final evaluation included)")


def report_memory(rows: list[dict[str, Any]]) -> None:
    print(f"\n  {'student <- teacher, step':40}{'weights MiB':>12}{'args MiB':>10}{'temp MiB':>10}{'total MiB':>11}"
          f"{'x SFT':>7}{'compile s':>10}")
    for r in rows:
        for kind in ("sft", "distill", "cache"):
            m = r[kind]
            label = f"{r['student']} <- {r['teacher']}, {kind}"
            print(f"  {label:40}{(m['student_weights'] + m['teacher_weights']) / MiB:12.1f}"
                  f"{m['arguments'] / MiB:10.1f}{m['temporaries'] / MiB:10.1f}{m['total'] / MiB:11.1f}"
                  f"{m['total'] / r['sft']['total']:7.2f}{m['compile_s']:10.1f}")
    print(f"  (compiler: {rows[0]['compiler']}; XLA's memory_analysis of the compiled step, one device; weights: "
          "the frozen student base and teacher, among the arguments; total: arguments + temporaries + outputs not "
          "aliased to donated inputs)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default = Recipe()
    ap.add_argument("--only", default=",".join(PARTS), help="comma-separated subset of " + ", ".join(PARTS))
    ap.add_argument("--steps", type=int, default=default.steps, help="each student's optimizer steps")
    ap.add_argument("--teacher-steps", type=int, default=default.teacher_steps)
    ap.add_argument("--batch", type=int, default=default.batch)
    ap.add_argument("--lr", type=float, default=default.lr)
    ap.add_argument("--train-on", choices=("model", "all"), default=default.train_on,
                    help="model: the answer and <eos> are trained and scored; all: every token of the example")
    ap.add_argument("--variant", action="append", default=[], help="an extra student distilled with the teacher "
                    "in the step, with these settings (e.g. kd_temperature=2,kd_alpha=0.9); repeatable")
    ap.add_argument("--held-out", type=int, default=128, help="held-out examples scored")
    ap.add_argument("--memory-pairs", default=MEMORY_PAIRS, help="student:teacher presets whose steps are compiled "
                    "(e.g. gemma2-2b:gemma2-9b,gemma3-1b:gemma3-4b), besides the tiny pair")
    ap.add_argument("--memory-seq", type=int, default=1024)
    ap.add_argument("--memory-batch", type=int, default=1)
    ap.add_argument("--memory-compiler", choices=("tpu", "cpu"), default="tpu",
                    help="tpu: XLA's TPU compiler for one v5p chip (libtpu, no TPU needed); cpu: this machine's")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    parts = a.only.split(",")
    if set(parts) - set(PARTS):
        raise SystemExit(f"unknown part: {', '.join(sorted(set(parts) - set(PARTS)))}")
    recipe = dataclasses.replace(default, steps=a.steps, teacher_steps=a.teacher_steps, batch=a.batch, lr=a.lr,
                                 train_on=a.train_on)
    if a.child:
        print(json.dumps(memory(recipe, a.memory_pairs, a.memory_seq, a.memory_batch, a.memory_compiler)))
        return
    t_start = time.perf_counter()
    print(f"processor {cpu_name()!r}, {len(os.sched_getaffinity(0))} CPUs, load average {os.getloadavg()[0]:.2f}; "
          f"{recipe}", flush=True)
    results: dict[str, Any] = {"cpu": cpu_name(), "cpus": len(os.sched_getaffinity(0)),
                               "load_before": os.getloadavg(), "recipe": dataclasses.asdict(recipe),
                               "n_train": N_TRAIN, "held_out": a.held_out, "teacher_fields": TEACHER_FIELDS}
    if "quality" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            results["quality"] = quality(recipe, a.held_out, Path(tmp), STUDENTS + tuple(map(variant, a.variant)))
        report_quality(results["quality"], recipe, a.held_out)
    if "memory" in parts:
        results["memory"] = memory_child(a, recipe)
        report_memory(results["memory"])
    finish(results, t_start, a.json)


if __name__ == "__main__":
    main()
