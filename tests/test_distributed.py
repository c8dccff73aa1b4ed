"""Two processes on CPU (gloo collectives), joined by jax.distributed like the hosts of a TPU pod slice: the same
losses as one process over the same global batch, every file written once by process 0, and a resume that
continues where the two processes stopped."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import gemmatune
from gemmatune.cli import SAMPLE

ARGS = ["train", "--data", str(SAMPLE / "chat.jsonl"), "--seq-len", "64", "--batch-size", "2", "--dtype", "float32",
        "--lr", "1e-3", "--lora-rank", "4", "--save-every", "1", "--eval_prompts"]


def _env() -> dict[str, str]:
    src = str(Path(gemmatune.__file__).parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
            "JAX_PLATFORMS": "cpu"}


def _train(out: Path, *extra: str, processes: int = 1) -> None:
    """`gemmatune train` in `processes` processes (one CPU device each), waiting for all of them."""
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = [[] if processes == 1 else ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes",
                                        str(processes), "--process-id", str(i)] for i in range(processes)]
    procs = [subprocess.Popen([sys.executable, "-m", "gemmatune.cli", *ARGS, "--output", str(out), *extra, *f],
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for f in flags]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]


def _losses(out: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["trained_tokens"]) for r in rows if "loss" in r]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    _train(one, "--max-steps", "2")
    _train(two, "--max-steps", "1", processes=2)  # each process reads one of the two rows of every batch
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-00000001"]  # written once, whole
    _train(two, "--max-steps", "2", "--resume", processes=2)
    # Same global batch, same numbers: the losses, and the tokens trained on, as one process computes them.
    got, want = _losses(two), _losses(one)
    assert [s for s, _, _ in got] == [1, 2] and [t for _, _, t in got] == [t for _, _, t in want]
    assert all(abs(a - b) <= 1e-5 for (_, a, _), (_, b, _) in zip(got, want)), (got, want)
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]
    assert (two / "adapter" / "adapter.safetensors").is_file() and (two / "summary.txt").is_file()
    # Process 1 wrote nothing into the run directory (no leftovers of a second writer).
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
