"""Helpers the side-by-side benchmark scripts share: timing and the random token data every tool gets."""

from __future__ import annotations

import time
from collections.abc import Callable

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
