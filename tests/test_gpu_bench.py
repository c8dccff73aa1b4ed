"""benchmarks/gpu.py, the prepared GPU benchmark: its --smoke run on the CPU (every runner in its own process,
the plan command, an XLA setting; JSON and table written), and its figures, goals and table from what the
children report on a GPU (hand-computed)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu  # noqa: E402 (benchmarks/ is not a package)

GiB = 2 ** 30


def test_smoke_runs_every_runner_and_records_numbers_or_a_reason(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--out",
                        str(tmp_path / "out"), "--peak-tflops", "1"], capture_output=True, text=True, env=env,
                       timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "out.json").read_text())
    assert {"device", "versions", "settings", "goals", "runs", "plan_cli", "flags", "wall_s"} <= set(res)
    assert res["device"] == {"jax": "cpu", "torch": "cpu", "peak_tflops": 1.0, "peak_source": "--peak-tflops"}
    assert [(x["case"], x["runner"]) for x in res["runs"]] == [
        (f"{m}@{s}", name) for m, s, names in gpu.SMOKE_CASES for name in names]
    for x in res["runs"] + res["flags"]:
        if x["status"] == "ok":
            assert len(x["step_times"]) == 1 and x["tokens_per_s"] > 0 and x["mfu"] > 0 and math.isfinite(x["loss"])
        else:
            assert x["status"] in ("refused", "error", "oom", "timeout", "crash") and x["reason"], x
    runs = {(x["model"], x["runner"]): x for x in res["runs"]}
    assert runs["small", "gemmatune flash"]["status"] == runs["small", "hf eager"]["status"] == "ok"
    assert runs["small3", "hf sdpa"]["status"] == "ok"  # Gemma 2's sdpa: refused by transformers 5 (or run)
    # The plan is the step's own, computed in the run's process: every part counted, the weights' exact.
    flash = runs["small", "gemmatune flash"]
    parts = flash["plan_parts"]
    assert flash["plan_bytes"] == parts["total"] == sum(v for k, v in parts.items() if k != "total")
    cudnn = runs["small3", "gemmatune cudnn"]
    assert cudnn["status"] == "refused" and "runs on GPUs" in cudnn["reason"]
    # `gemmatune plan --json`, the command, gives the same total for the same settings.
    assert res["plan_cli"]["status"] == "ok" and res["plan_cli"]["same"] is True, res["plan_cli"]
    assert [f["variant"] for f in res["flags"]] == list(gpu.SMOKE_FLAGS)
    assert res["flags"][0]["reused_from"].startswith(f"small@{gpu.SMOKE_SEQ} gemmatune")
    table = (tmp_path / "out.md").read_text()
    assert "### Goals (issue 16)" in table and "### XLA settings" in table
    assert all(f"| {case} | {runner} |" in table for case, runner in [(x["case"], x["runner"]) for x in res["runs"]])


def test_figures_goals_and_table_from_a_gpus_reports() -> None:
    """What the children report on an H100 -> tokens/s of the median step, MFU against 989 TFLOP/s with the
    model FLOPs counted by hand, plan / peak, the goals met or not, and the table's row."""
    def run(runner: str, tool: str, times: list[float] | None, **kw: object) -> dict:
        rec = {"case": "gemma2-9b@4096", "model": "gemma2-9b", "seq": 4096, "runner": runner, "tool": tool,
               "attention": runner.split()[1], "status": "ok" if times else "refused",
               "device": "NVIDIA H100 80GB HBM3", **({"step_times": times} if times else {}), **kw}
        gpu.figures(rec, None)
        return rec

    ours = run("gemmatune flash", "gemmatune", [0.6, 0.5, 0.4], peak_bytes=30 * GiB, plan_bytes=27 * GiB)
    theirs = run("hf eager", "hf", [1.2, 0.9, 1.0], peak_bytes=70 * GiB)
    refused = run("hf sdpa", "hf", None, reason="ValueError: no sdpa")
    # gemma2-9b by hand: (in, out) of q, k, v, o, gate, up, down; the tied output projection; LoRA r16 on all seven;
    # every layer's keys per query (T + 1) / 2 (its window, 4096, is the whole row).
    D, L, V, r = 3584, 42, 256000, 16
    shapes = [(D, 4096), (D, 2048), (D, 2048), (4096, D), (D, 14336), (D, 14336), (14336, D)]
    flops = (4 * (L * sum(i * o for i, o in shapes) + D * V) + 6 * L * sum(r * (i + o) for i, o in shapes)
             + 12 * 16 * 256 * (4096 + 1) / 2 * L)
    assert math.isclose(ours["flops_per_token"], flops, rel_tol=1e-9)
    assert ours["tokens_per_s"] == 4096 / 0.5 and theirs["tokens_per_s"] == 4096 / 1.0
    assert math.isclose(ours["mfu"], flops * 8192 / 989e12) and math.isclose(ours["plan_over_measured"], 0.9)
    goals = {g["goal"]: g for g in gpu.goals([ours, theirs, refused], "gemma2-9b@4096", 4096)}
    speed = goals["tokens/s over transformers + PEFT's, gemma2-9b@4096"]
    memory = goals["peak memory over transformers + PEFT's, gemma2-9b@4096"]
    assert speed["measured"] == 2.0 and speed["met"] is True and speed["compared"] == "gemmatune flash vs hf eager"
    assert math.isclose(memory["measured"], 30 / 70) and memory["met"] is True
    assert goals["MFU, gemma2-9b@4096"]["met"] is (ours["mfu"] >= 0.4)
    assert goals["plan / measured peak, gemma2-9b@4096 gemmatune flash"]["met"] is True
    assert gpu.card_peak("NVIDIA H100 PCIe", None) == (756.0, "table: H100 PCIe")
    assert gpu.card_peak("NVIDIA H200", None)[0] == 989.0 and gpu.card_peak("NVIDIA L4", None)[0] == 121.0
    assert gpu.card_peak("NVIDIA L40S", None)[0] is None and gpu.card_peak("NVIDIA L40S", 362.0)[0] == 362.0
    res = {"device": {"jax": "NVIDIA H100 80GB HBM3", "torch": "NVIDIA H100 80GB HBM3", "peak_tflops": 989.0,
                      "peak_source": "table: H100 SXM"}, "versions": {"jax": "0.11"}, "date": "today",
           "settings": {"smoke": False, "lora_rank": 16, "lora_alpha": 16.0, "dtype": "bfloat16",
                        "warmup_steps": 1, "timed_steps": 3, "hf_gradient_checkpointing": False,
                        "xla_mem_fraction": "0.95", "flops": "...", "budget_s": 450.0},
           "runs": [ours, theirs, refused], "goals": list(goals.values()), "plan_cli": None, "flags": []}
    table = gpu.markdown(res)
    assert (f"| gemma2-9b@4096 | gemmatune flash | 8192 | 30.00 | {ours['mfu']:.1%} | 27.00 | 0.90 | 2.00x | 0.43x "
            "| ok |") in table
    assert "| gemma2-9b@4096 | hf sdpa | - | - | - | - | - | - | - | refused: ValueError: no sdpa |" in table
    assert "## One LoRA step on NVIDIA H100 80GB HBM3" in table


def test_a_refusal_is_reused_and_an_out_of_memory_retried_with_checkpointing(tmp_path: Path, monkeypatch) -> None:
    """The parent's bookkeeping, its jobs stood in for: transformers' refusal of sdpa for Gemma 2 holds for every
    Gemma 2 (asked once); an out-of-memory without gradient checkpointing is run again with it, as "+ckpt"."""
    import argparse
    import shutil

    asked = []

    def job(self, rec: dict, expect: float, env: dict, plan: bool) -> None:
        asked.append((rec["case"], rec["runner"], rec.get("hf_checkpointing")))
        if rec["runner"] == "hf sdpa":
            rec.update(status="refused", reason="ValueError: no sdpa")
        elif rec["runner"] == "hf eager" and not rec["hf_checkpointing"]:
            rec.update(status="oom", reason="OutOfMemoryError: CUDA out of memory")
        else:
            rec.update(status="ok", device="NVIDIA H200", step_times=[1.0], peak_bytes=GiB)
            gpu.figures(rec, None)

    monkeypatch.setattr(gpu.Bench, "job", job)
    a = argparse.Namespace(out=str(tmp_path / "r"), budget=100.0, smoke=False, warmup=1, steps=1,
                           hf_checkpointing=False, peak_tflops=None)
    bench = gpu.Bench(a)
    try:
        bench.case("gemma2-9b", 4096, ("hf sdpa", "hf eager"))
        bench.case("gemma2-2b", 4096, ("hf sdpa",))
    finally:
        shutil.rmtree(bench.cache)
    assert asked == [("gemma2-9b@4096", "hf sdpa", False), ("gemma2-9b@4096", "hf eager", False),
                     ("gemma2-9b@4096", "hf eager +ckpt", True)]
    runs = json.loads((tmp_path / "r.json").read_text())["runs"]
    assert [(r["runner"], r["status"]) for r in runs] == [("hf sdpa", "refused"), ("hf eager", "oom"),
                                                         ("hf eager +ckpt", "ok"), ("hf sdpa", "refused")]
    assert runs[-1]["reused_from"] == "gemma2-9b@4096" and runs[2]["tokens_per_s"] == 4096.0
