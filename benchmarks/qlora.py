"""QLoRA on this machine: a 4-bit or 8-bit frozen base against LoRA on a bfloat16 or float32 one, on the real Gemma 3
270M (issue 14), side by side with transformers + PEFT + bitsandbytes NF4.

    python benchmarks/qlora.py [--only memory,train,bnb] [--configs f32,bf16,nf4,...] [--threads 2] [--json out.json]

Three parts, each in its own subprocesses pinned to the same `--threads` CPUs (as benchmarks/compare.py):

  memory  one child loads the 270M (scripts/gemma3_270m.py's GGUF) under each storage in MEMORY (float32, bfloat16,
          NF4, NF4 + double quantization, int8; the quantized ones with the embedding and norms in bfloat16,
          and NF4 also in float32) with `convert.load_model(..., quant=)`, sums the .nbytes of the arrays it returned
          (all of them, and the seven projections alone) and checks both against `layout.param_structs`' count from
          shapes. Then it compiles the train step of benchmarks/tasks.Recipe (batch 8 x 32 positions) for each, from
          shapes (step.abstract_step, as `gemmatune plan` does), and reads XLA's memory_analysis(): the arguments,
          the temporaries (activations, gradients, and any dequantized weights XLA keeps), the outputs not aliased
          to inputs; and the seconds the compile took.
  train   one child per configuration in TRAIN runs benchmarks/quality.py's gemmatune job (tasks.Recipe: LoRA r=8 on
          the seven projections, 16 steps of 8 date-rewriting examples) with `train --quantize ...`: final training
          loss, held-out exact match (--held-out dates, 64) before and after (the adapter applied unmerged onto
          the quantized base, as `generate --adapter` does), training tokens/s (steps 2..16) and the child's peak
          RSS after training (model load + data + training).
  bnb     the same job in transformers + PEFT with the base's linear layers bitsandbytes NF4 (block 64, compute
          float32; quality.bnb_nf4 says how it is loaded), the base model's answers skipped (bitsandbytes' CPU
          kernels make the 64 answers take minutes).

The figures are printed as tables with ratios; --json keeps them all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
import quality  # noqa: E402
import tasks  # noqa: E402
from common import cpu_name, finish  # noqa: E402
from compare import THREADS, pinned_cpus  # noqa: E402

from gemmatune.config import Quantization  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Setup:
    """One way to hold the base: the compute dtype (the embedding and norms are stored in it) and the projections'
    quantization (None: stored in the compute dtype, plain LoRA)."""

    dtype: str
    quant: Quantization | None = None

    @property
    def label(self) -> str:
        if self.quant is None:
            return f"{self.dtype} LoRA"
        return (f"{self.quant.kind}{' + double quant' if self.quant.double else ''}, "
                f"{self.dtype} compute")


NF4, INT8 = Quantization("nf4"), Quantization("int8")
SETUPS = {
    "f32": Setup("float32"), "bf16": Setup("bfloat16"),
    "nf4": Setup("float32", NF4), "nf4dq": Setup("float32", Quantization("nf4", double=True)),
    "int8": Setup("float32", INT8), "int4": Setup("float32", Quantization("int4")),
    "nf4-bf16": Setup("bfloat16", NF4), "nf4dq-bf16": Setup("bfloat16", Quantization("nf4", double=True)),
    "int8-bf16": Setup("bfloat16", INT8), "int4-bf16": Setup("bfloat16", Quantization("int4")),
}
MEMORY = ("f32", "bf16", "nf4-bf16", "nf4dq-bf16", "int8-bf16", "nf4")
TRAIN = ("f32", "nf4", "int8", "bf16", "nf4-bf16")
PARTS = ("memory", "train", "bnb")
MiB = 2 ** 20


# --- children ----------------------------------------------------------------------------------------------------

def memory_child(names: list[str], recipe: tasks.Recipe) -> list[dict[str, Any]]:
    """Bytes of the loaded base under each setup (checked against the count from shapes), and the compiled train
    step's memory."""
    import jax
    import jax.numpy as jnp
    from gemma3_270m import gemma3_270m

    from gemmatune import sharding
    from gemmatune.convert import load_model
    from gemmatune.layout import PROJECTIONS, nbytes, param_structs
    from gemmatune.step import Shapes, abstract_step

    gguf = gemma3_270m()
    out = []
    for name in names:
        s = SETUPS[name]
        t0 = time.perf_counter()
        cfg, params = load_model(gguf, dtype=s.dtype, quant=s.quant)
        jax.block_until_ready(params)
        load_s = time.perf_counter() - t0
        loaded = sum(a.nbytes for a in jax.tree.leaves(params))
        loaded_proj = sum(a.nbytes for p in PROJECTIONS for a in jax.tree.leaves(params["layers"][p]))
        del params
        structs = param_structs(cfg, jnp.dtype(s.dtype), s.quant)
        counted, counted_proj = nbytes(structs), sum(nbytes(structs["layers"][p]) for p in PROJECTIONS)
        # The projections as the step computes with them (dequantized into the compute dtype): what a step that
        # kept every layer's dequantized weight would hold on top.
        dense_proj = sum(nbytes(param_structs(cfg, jnp.dtype(s.dtype))["layers"][p]) for p in PROJECTIONS)
        tcfg = dataclasses.replace(recipe, dtype=s.dtype).train_config(str(gguf), gguf, gguf,
                                                                       **quality.quant_settings(s.quant))
        mesh = sharding.make_mesh(None, jax.devices()[:1], cfg)
        step, args = abstract_step(cfg, tcfg, mesh, Shapes(1, recipe.batch, recipe.seq))
        t0 = time.perf_counter()
        stats = step.lower(*args).compile().memory_analysis()
        compile_s = time.perf_counter() - t0
        out.append({"setup": name, "label": s.label, "loaded_bytes": loaded, "loaded_proj_bytes": loaded_proj,
                    "counted_bytes": counted, "counted_proj_bytes": counted_proj, "dense_proj_bytes": dense_proj,
                    "layers": cfg.num_layers, "load_s": load_s, "compile_s": compile_s,
                    "argument_bytes": stats.argument_size_in_bytes, "temp_bytes": stats.temp_size_in_bytes,
                    "output_bytes": stats.output_size_in_bytes, "alias_bytes": stats.alias_size_in_bytes,
                    "generated_code_bytes": stats.generated_code_size_in_bytes})
        print(json.dumps(out[-1]), file=sys.stderr, flush=True)
    return out


def child(a: argparse.Namespace) -> None:
    recipe = tasks.Recipe()
    if a.child == "memory":
        out: Any = memory_child(a.configs.split(","), recipe)
    elif a.child == "bnb":
        out = quality.run_transformers(recipe, a.held_out, a.threads, nf4=True, before=False)
    else:
        s = SETUPS[a.child]
        out = quality.run_gemmatune(dataclasses.replace(recipe, dtype=s.dtype), a.held_out, quant=s.quant)
    if a.child != "memory":
        _, held_out = tasks.splits(quality.N_TRAIN, a.held_out)
        out.update(em_before=None if out["before"] is None else tasks.exact_match(out["before"], held_out),
                   em_after=tasks.exact_match(out["after"], held_out), cpus=sorted(os.sched_getaffinity(0)))
    print(json.dumps(out))


def run_child(which: str, a: argparse.Namespace, cpus: list[int], configs: str = "") -> Any:
    n = str(len(cpus))
    env = {**os.environ, "PJRT_NPROC": n, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, __file__, "--child", which, "--held-out", str(a.held_out), "--threads", n,
           "--configs", configs or a.configs or ""]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False,
                       preexec_fn=lambda: os.sched_setaffinity(0, cpus))
    if p.returncode:
        raise SystemExit(f"{which} failed:\n{p.stderr[-4000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    print(f"  ({which}: {time.perf_counter() - t0:.0f} s)", flush=True)
    return out


# --- the parent --------------------------------------------------------------------------------------------------

def report_memory(rows: list[dict[str, Any]]) -> None:
    ref = next((r for r in rows if r["setup"] == "bf16"), rows[0])
    print(f"\n  {'base':34}{'weights MiB':>12}{'x bf16':>8}{'projections MiB':>16}{'x bf16':>8}{'= shapes':>9}"
          f"{'step args MiB':>14}{'step temp MiB':>14}{'compile s':>10}")
    for r in rows:
        same = r["loaded_bytes"] == r["counted_bytes"] and r["loaded_proj_bytes"] == r["counted_proj_bytes"]
        print(f"  {r['label']:34}{r['loaded_bytes'] / MiB:12.1f}{r['loaded_bytes'] / ref['loaded_bytes']:8.3f}"
              f"{r['loaded_proj_bytes'] / MiB:16.1f}{r['loaded_proj_bytes'] / ref['loaded_proj_bytes']:8.3f}"
              f"{'yes' if same else 'NO':>9}{r['argument_bytes'] / MiB:14.1f}{r['temp_bytes'] / MiB:14.1f}"
              f"{r['compile_s']:10.1f}")
    print("  (weights: sum of .nbytes of what load_model returned; = shapes: equal to layout.param_structs' count, "
          "total and projections; step: XLA's memory_analysis of the compiled train step, batch 8 x 32)")
    for r in rows:
        plain = next((p for p in rows if p["setup"] == ("f32" if r["label"].endswith("float32 compute") else "bf16")),
                     None)
        if plain and plain is not r and "compute" in r["label"]:
            extra = r["temp_bytes"] - plain["temp_bytes"]
            print(f"  {r['label']}: step temporaries {extra / MiB:+.1f} MiB against {plain['label']}; one layer's "
                  f"projections dequantized: {r['dense_proj_bytes'] / r['layers'] / MiB:.1f} MiB, all "
                  f"{r['layers']} layers': {r['dense_proj_bytes'] / MiB:.1f} MiB")


def report_train(rows: list[dict[str, Any]], held_out: int) -> None:
    print(f"\n  {'run':38}{'EM before':>10}{'EM after':>10}{'loss':>9}{'tokens/s':>10}{'peak RSS':>10}"
          f"{'train s':>9}{'eval s':>8}")
    for r in rows:
        before = "-" if r["em_before"] is None else f"{r['em_before']:.1%}"
        print(f"  {r['label']:38}{before:>10}{r['em_after']:10.1%}{r['final_loss']:9.4f}{r['tokens_per_s']:10.1f}"
              f"{r['peak_rss_gb']:8.2f}GB{r['train_s']:9.1f}{r['eval_s']:8.1f}")
    print(f"  (EM: held-out exact match of {held_out} dates; tokens/s: non-padding input positions per second over "
          "steps 2..; peak RSS and train s: model load + data + training; eval s: the held-out answers after training)")
    for r in rows:
        ref = next((p for p in rows if p["setup"] == ("bf16" if "bfloat16" in r["label"] else "f32")), None)
        if ref and ref is not r:
            print(f"  {r['label']} / {ref['label']}: tokens/s {r['tokens_per_s'] / ref['tokens_per_s']:.2f}x, "
                  f"peak RSS {r['peak_rss_gb'] / ref['peak_rss_gb']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=",".join(PARTS), help="comma-separated subset of " + ", ".join(PARTS))
    ap.add_argument("--configs", default="", help="comma-separated setups for memory and train (default: "
                    f"memory {','.join(MEMORY)}; train {','.join(TRAIN)}); any of {', '.join(SETUPS)}")
    ap.add_argument("--held-out", type=int, default=64, help="held-out examples scored")
    ap.add_argument("--threads", type=int, default=THREADS, help="CPUs (and threads) each child gets; the same ones")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)
    parts = a.only.split(",")
    unknown = [p for p in parts if p not in PARTS] + [c for c in a.configs.split(",") if c and c not in SETUPS]
    if unknown:
        raise SystemExit(f"unknown part or setup: {', '.join(unknown)}")
    cpus = pinned_cpus(a.threads)
    t_start = time.perf_counter()
    recipe = tasks.Recipe()
    print(f"Gemma 3 270M (GGUF Q4_K_M dequantized, then stored as each setup says); processor {cpu_name()!r}; "
          f"{len(cpus)} threads on CPUs {','.join(map(str, cpus))}; load average {os.getloadavg()[0]:.2f}; "
          f"recipe {recipe}", flush=True)
    results: dict[str, Any] = {"cpu": cpu_name(), "cpus": cpus, "load_before": os.getloadavg(),
                               "recipe": dataclasses.asdict(recipe)}
    if "memory" in parts:
        results["memory"] = run_child("memory", a, cpus, a.configs or ",".join(MEMORY))
        report_memory(results["memory"])
    train = []
    if "train" in parts:
        for name in (a.configs.split(",") if a.configs else TRAIN):
            r = run_child(name, a, cpus)
            train.append({**r, "setup": name, "label": SETUPS[name].label})
    if "bnb" in parts:
        r = run_child("bnb", a, cpus)
        train.append({**r, "setup": "bnb", "label": "transformers + PEFT + bnb NF4, f32"})
    if train:
        results["train"] = train
        report_train(train, a.held_out)
    finish(results, t_start, a.json)


if __name__ == "__main__":
    main()
