"""What `gemmatune data inspect` reports: the detected layout, what happened to every row, token length statistics,
how full packed rows are, and one example with its trained tokens marked."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from gemmatune.config import DataConfig
from gemmatune.data.packing import assign_rows
from gemmatune.data.pipeline import Prepared
from gemmatune.data.records import Example
from gemmatune.tokenizer import Tokenizer

TRAINED_OPEN, TRAINED_CLOSE = "«", "»"  # visible in a terminal and in a pipe alike


def packed_fill(lengths: np.ndarray, cfg: DataConfig) -> float:
    """Fraction of row slots holding example tokens when lengths (slots per example) are packed as training
    packs them: shuffled with the seed, best-fit decreasing within each shuffle buffer."""
    order = np.random.default_rng(cfg.seed).permutation(len(lengths))
    rows = 0
    for lo in range(0, len(order), cfg.shuffle_buffer):
        rows += len(assign_rows(lengths[order[lo:lo + cfg.shuffle_buffer]].tolist(), cfg.max_seq_len))
    return float(lengths.sum()) / (rows * cfg.max_seq_len)


def render_marked(example: Example, tokenizer: Tokenizer) -> str:
    """The example's text with special tokens shown and trained spans between « and »."""
    out, start = [], 0
    for i in range(1, len(example.tokens) + 1):
        if i == len(example.tokens) or example.mask[i] != example.mask[start]:
            text = tokenizer.decode(example.tokens[start:i].tolist(), skip_special_tokens=False)
            out.append(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if example.mask[start] else text)
            start = i
    return "".join(out)


def summarize(prepared: Prepared, cfg: DataConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """Figures over every example read from data.paths (validation ones included, as the row counts are)."""
    store, report = prepared.train.store, prepared.train.report
    lengths = store.lengths() + 1  # tokens per example ([n]); slots + 1
    edges = np.linspace(0, cfg.max_seq_len + 1, 11).round().astype(int)
    counts, _ = np.histogram(lengths, bins=edges)
    slots = lengths - 1
    return {
        "format": dataclasses.asdict(prepared.layout),
        "rows": report.to_dict(),
        "validation_examples": 0 if prepared.val is None else len(prepared.val.indices),
        "tokens": {"examples": int(len(lengths)), "total": report.tokens, "trained": report.trained,
                   "min": int(lengths.min()), "mean": float(lengths.mean()), "median": float(np.median(lengths)),
                   "p95": float(np.percentile(lengths, 95)), "max": int(lengths.max())},
        "histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
        "packing": {"max_seq_len": cfg.max_seq_len, "mode": cfg.packing,
                    "packed_fill": packed_fill(slots, cfg),
                    "padded_fill": float(slots.sum()) / (len(slots) * cfg.max_seq_len)},
        "example": render_marked(store[0], tokenizer),
    }
