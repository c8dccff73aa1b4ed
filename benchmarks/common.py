"""Helpers the side-by-side benchmark scripts share: timing and the random token data every tool gets."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def call_times(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of `repeats` calls, after `warmup` untimed calls (the first compiles)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls (after one warm-up call)."""
    return min(call_times(fn, repeats))


def random_tokens(vocab_size: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Token ids in [3, vocab): no pad, eos or bos, so no tool treats any position specially."""
    return np.random.RandomState(seed).randint(3, vocab_size, shape).astype(np.int32)


def cpu_name() -> str:
    """The processor's model name, recorded with every figure (CI machines differ)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def finish(results: dict[str, Any], t_start: float, json_path: str | None) -> None:
    """The end of a benchmark run: the load average and the wall time into `results` (printed), and `results` as
    JSON to json_path when given."""
    results["load_after"] = os.getloadavg()
    results["wall_s"] = time.perf_counter() - t_start
    print(f"\n  {results['wall_s']:.0f} s in all; load average {os.getloadavg()[0]:.2f}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
