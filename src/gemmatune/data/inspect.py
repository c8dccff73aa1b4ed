"""What `gemmatune data inspect` reports: the layout detected for each file, what happened to every row, token length
statistics, how full packed rows are, and one example with its trained tokens marked."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from gemmatune.config import DataConfig
from gemmatune.data.loader import BatchIterator
from gemmatune.data.packing import efficiency
from gemmatune.data.pipeline import Prepared, Split
from gemmatune.data.records import Example
from gemmatune.tokenizer import Tokenizer

TRAINED_OPEN, TRAINED_CLOSE = "«", "»"  # visible in a terminal and in a pipe alike


def packed_fill(split: Split, cfg: DataConfig, packing: str) -> float:
    """Fraction of row slots holding example tokens in training's first epoch over `split`, with packing "pack" or
    "pad": the rows are the training loader's own (BatchIterator.row_plan), so the figure is exactly training's."""
    rows = BatchIterator(split.store, split.indices, seq_len=cfg.max_seq_len, batch_size=1, pad_id=0,
                         packing=packing, shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed).row_plan(0)
    return efficiency(rows, split.store.lengths(), cfg.max_seq_len)


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
    """Row counts and token figures over every example read from data.paths (validation ones included, as the row
    counts are); packing over the training split, as training packs it. "formats" lists each source's layout."""
    store, report = prepared.train.store, prepared.train.report
    lengths = store.lengths() + 1  # tokens per example ([n]); slots + 1
    edges = np.linspace(0, cfg.max_seq_len + 1, 11).round().astype(int)
    counts, _ = np.histogram(lengths, bins=edges)
    splits = [("train", prepared.train)]
    if prepared.val is not None and prepared.val.store is not store:  # validation files of their own
        splits.append(("validation", prepared.val))
    return {
        "formats": [{"split": name, "source": source, **dataclasses.asdict(layout)}
                    for name, split in splits for source, layout in split.layouts.items()],
        "rows": report.to_dict(),
        "validation_examples": 0 if prepared.val is None else len(prepared.val.indices),
        "tokens": {"examples": int(len(lengths)), "total": report.tokens, "trained": report.trained,
                   "min": int(lengths.min()), "mean": float(lengths.mean()), "median": float(np.median(lengths)),
                   "p95": float(np.percentile(lengths, 95)), "max": int(lengths.max())},
        "histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
        "packing": {"max_seq_len": cfg.max_seq_len, "mode": cfg.packing,
                    "training_examples": len(prepared.train.indices),
                    "packed_fill": packed_fill(prepared.train, cfg, "pack"),
                    "padded_fill": packed_fill(prepared.train, cfg, "pad")},
        "example": render_marked(store[0], tokenizer),
    }
