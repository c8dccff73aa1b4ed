"""What `gemmatune data inspect` reports: the layout detected for each file, what happened to every row, token length
statistics, how full packed rows are, and one example with its trained tokens marked. Preference data are shown as
pairs: length statistics of the prompts, the chosen and the rejected examples, a histogram of whole pairs (what must
fit one row), and the first pair's two examples."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from gemmatune.config import DataConfig
from gemmatune.data.loader import BatchIterator, ExampleStore
from gemmatune.data.packing import efficiency
from gemmatune.data.pipeline import Prepared, Split
from gemmatune.data.records import Example
from gemmatune.tokenizer import Tokenizer

TRAINED_OPEN, TRAINED_CLOSE = "«", "»"  # visible in a terminal and in a pipe alike


def packed_fill(split: Split, cfg: DataConfig, packing: str) -> float:
    """Fraction of row slots holding example tokens in training's first epoch over `split`, with packing "pack" or
    "pad": the rows are the training loader's own (BatchIterator.row_plan), so the figure is exactly training's."""
    rows = BatchIterator(split.store, split.indices, seq_len=cfg.max_seq_len, batch_size=1, pad_id=0,
                         packing=packing, shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed,
                         pairs=split.pairs).row_plan(0)
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


def _stats(lengths: np.ndarray) -> dict[str, Any]:
    return {"min": int(lengths.min()), "mean": float(lengths.mean()), "median": float(np.median(lengths)),
            "p95": float(np.percentile(lengths, 95)), "max": int(lengths.max())}


def prompt_lengths(store: ExampleStore, chunk: int = 4096) -> np.ndarray:
    """Tokens [pairs] of each pair's prompt (<bos> included): those before the chosen example's first trained
    token, as a reply's first token is trained (formats.Formatter.encode_pair). Reads a chunk of examples at a
    time, so memory stays bounded."""
    out = []
    for start in range(0, len(store), chunk):
        chosen = store.get_many(range(start, min(start + chunk, len(store)), 2))
        out += [int(np.argmax(example.mask)) for example in chosen]
    return np.array(out, np.int64)


def summarize(prepared: Prepared, cfg: DataConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """Row counts and token figures over every example read from data.paths (validation ones included, as the row
    counts are); packing over the training split, as training packs it. "formats" lists each source's layout.
    For preference data ("pairs": true) "tokens" has statistics of the prompts, the chosen and the rejected
    examples, the histogram is of pairs (chosen + rejected tokens), and "example" shows the first pair: chosen, then
    rejected."""
    store, report = prepared.train.store, prepared.train.report
    lengths = store.lengths() + 1  # tokens per example ([n]); slots + 1
    pairs = prepared.pairs
    top = cfg.max_seq_len + (2 if pairs else 1)  # the most tokens an example (a pair) can have
    edges = np.linspace(0, top, 11).round().astype(int)
    counts, _ = np.histogram(lengths[0::2] + lengths[1::2] if pairs else lengths, bins=edges)
    splits = [("train", prepared.train)]
    if prepared.val is not None and prepared.val.store is not store:  # validation files of their own
        splits.append(("validation", prepared.val))
    tokens = {"examples": int(len(lengths)), "total": report.tokens, "trained": report.trained, **_stats(lengths)}
    if pairs:
        tokens |= {"pairs": int(len(lengths) // 2), "prompt": _stats(prompt_lengths(store)),
                   "chosen": _stats(lengths[0::2]), "rejected": _stats(lengths[1::2])}
    example = render_marked(store[0], tokenizer)
    if pairs:
        example = {"chosen": example, "rejected": render_marked(store[1], tokenizer)}
    return {
        "formats": [{"split": name, "source": source, **dataclasses.asdict(layout)}
                    for name, split in splits for source, layout in split.layouts.items()],
        "pairs": pairs,
        "rows": report.to_dict(),
        "validation_examples": 0 if prepared.val is None else len(prepared.val.indices),
        "tokens": tokens,
        "histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
        "packing": {"max_seq_len": cfg.max_seq_len, "mode": cfg.packing,
                    "training_examples": len(prepared.train.indices),
                    "packed_fill": packed_fill(prepared.train, cfg, "pack"),
                    "padded_fill": packed_fill(prepared.train, cfg, "pad")},
        "example": example,
    }
