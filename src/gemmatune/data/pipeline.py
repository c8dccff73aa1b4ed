"""From the user's files to tokenised example stores: read rows, detect the layout, format, fit to length,
and store, counting every skip, truncation and drop. Memory stays bounded: rows stream through, and examples go
straight to an on-disk store that training reads a shuffle buffer at a time.

Preference data (format preference) are stored as pairs: row i's chosen example at store index 2i, its rejected one
at 2i + 1. From here on the pair is the unit: it is fitted to one packed row as a whole, the validation split takes
whole pairs, and BatchIterator(pairs=True) shuffles and packs whole pairs. A run reads one kind of data: preference
files mixed with others are refused, naming one file of each."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gemmatune.config import DataConfig
from gemmatune.data.formats import PREFERENCE, Formatter, Layout, detect_layout, fit, fit_pair
from gemmatune.data.loader import ExampleStore, StoreWriter, split_indices
from gemmatune.data.records import BadRow, DataError, Location, Report, RowError
from gemmatune.data.sources import iter_rows
from gemmatune.errors import GemmatuneError
from gemmatune.tokenizer import Tokenizer


@dataclasses.dataclass
class Split:
    """One side of the data: the store holding its examples, which of them belong to it, the layout detected for
    each source it was read from, and what happened to the rows read for it. With `pairs` (preference data) the
    indices hold whole pairs, each pair's chosen (even) index and its rejected partner right after it, and the
    store's example 2i + 1 is example 2i's rejected partner."""

    store: ExampleStore
    indices: np.ndarray  # [n] int64, example indices into the store (both of a pair's, in order, when pairs)
    layouts: dict[str, Layout]  # source (file path or "hub:name", as in row locations) -> its layout, reading order
    report: Report
    pairs: bool = False


@dataclasses.dataclass
class Prepared:
    train: Split
    val: Split | None

    @property
    def pairs(self) -> bool:
        """Preference data: every Split holds (chosen, rejected) pairs; iterate with BatchIterator(pairs=True)."""
        return self.train.pairs

    def moved(self, old: str | Path, new: str | Path) -> None:
        """Read the stores from `new` from now on: the directory `prepare` wrote them into, `old`, was renamed
        there (files and contents unchanged)."""
        stores = {id(split.store): split.store for split in (self.train, self.val) if split is not None}
        for store in stores.values():
            store.path = Path(new) / store.path.relative_to(old)


def _tokenise(paths: Sequence[str], cfg: DataConfig, tokenizer: Tokenizer, out: Path,
              known: dict[str, Layout] | None = None) -> tuple[dict[str, Layout], ExampleStore, Report]:
    """Stream rows from paths into a store at out. Each source file's layout is detected from its first readable
    row: `--data chat.jsonl dolly.jsonl` mixes layouts, and a directory may hold files of several. `known`: the
    layouts of the training files, which validation files must match in kind (pairs or not)."""
    report = Report()
    layouts: dict[str, Layout] = {}
    source, formatter = "", None  # the file being read and its Formatter; rows arrive file by file

    def bad(where: Location, reason: str, detail: str) -> None:
        if not cfg.skip_bad_rows:
            raise DataError(where, reason, detail)
        report.skipped[reason] += 1
        report.first_bad.setdefault(reason, str(where))

    with StoreWriter(out) as writer:
        for item in iter_rows(paths, split=cfg.split):
            report.read += 1
            if isinstance(item, BadRow):
                bad(item.where, item.reason, item.detail)
                continue
            if formatter is None or item.where.path != source:
                source = item.where.path
                if source not in layouts:
                    try:
                        layouts[source] = detect_layout(item.data.keys(), cfg)
                    except GemmatuneError as e:
                        raise GemmatuneError(f"{item.where}: {e}") from None
                    _one_kind({**(known or {}), **layouts}, source)
                    report.pairs = layouts[source].kind == PREFERENCE
                formatter = Formatter(cfg, tokenizer, layouts[source])
            try:
                encoded = formatter.encode_pair(item.data) if report.pairs else formatter.encode(item.data)
            except RowError as e:
                bad(item.where, e.reason, e.detail)
                continue
            if report.pairs:
                fitted, reason = fit_pair(encoded, cfg.max_seq_len, cfg.overflow)
                examples = [] if fitted is None else [fitted.chosen, fitted.rejected]
            else:
                fitted, reason = fit(encoded, cfg.max_seq_len, cfg.overflow)
                examples = [] if fitted is None else [fitted]
            if fitted is None:
                report.dropped[reason] += 1
                report.first_bad.setdefault(reason, str(item.where))
                continue
            report.used += 1
            report.truncated += fitted.truncated
            report.prompt += fitted.prompt if report.pairs else 0
            for example in examples:  # a pair's chosen at store index 2i, its rejected at 2i + 1
                report.tokens += len(example.tokens)
                report.trained += example.trained
                writer.append(example)
    if report.used == 0:
        raise GemmatuneError(f"{', '.join(paths)}: no usable rows ({describe(report)}). "
                             + _hint(report))
    return layouts, ExampleStore(out), report


def _one_kind(layouts: dict[str, Layout], source: str) -> None:
    """Refuse preference files mixed with others (`source` is the file just detected): a run trains on one
    objective, and a pair store holds nothing but pairs."""
    pairs = layouts[source].kind == PREFERENCE
    other = next((s for s, layout in layouts.items() if (layout.kind == PREFERENCE) != pairs), None)
    if other is not None:
        preference, rest = (source, other) if pairs else (other, source)
        raise GemmatuneError(f"{preference} holds preference pairs (chosen/rejected) but {rest} holds "
                             f"{layouts[rest].name} rows (format {layouts[rest].kind}); one run reads one kind of "
                             "data: pass only preference files for DPO (validation files included), or only "
                             "others for supervised training.")


def _hint(report: Report) -> str:
    if report.read == 0:
        return "The files hold no rows; check the paths."
    if report.dropped:
        return ("Every example was dropped; raise --max-seq-len, or use overflow 'truncate' to keep the start of "
                "long examples" + (" (of a preference pair: the whole prompt and the start of each reply)."
                                   if report.pairs else "."))
    return "Every row was bad; the first of each kind: " + "; ".join(
        f"{reason} at {where}" for reason, where in report.first_bad.items()) + "."


def describe(report: Report) -> str:
    """One line: read, used, skipped and dropped counts by reason, truncated."""
    parts = [f"{report.read} read", f"{report.used} used"]
    parts += [f"{n} skipped ({reason})" for reason, n in sorted(report.skipped.items())]
    parts += [f"{n} dropped ({reason})" for reason, n in sorted(report.dropped.items())]
    if report.truncated:
        parts.append(f"{report.truncated} truncated")
    return ", ".join(parts)


def prepare(cfg: DataConfig, tokenizer: Tokenizer, workdir: str | Path) -> Prepared:
    """Tokenise cfg.paths (and cfg.val_paths) into stores under workdir and split off validation examples (whole
    pairs, for preference data)."""
    if not cfg.paths:
        raise GemmatuneError("data.paths is empty: pass --data with a file, glob, directory or Hub dataset name.")
    workdir = Path(workdir)
    layouts, store, report = _tokenise(cfg.paths, cfg, tokenizer, workdir / "train")
    pairs = report.pairs
    if cfg.val_paths:  # detected on their own: validation files need not share the training files' layout
        val_layouts, val_store, val_report = _tokenise(cfg.val_paths, cfg, tokenizer, workdir / "val", layouts)
        val = Split(val_store, np.arange(len(val_store)), val_layouts, val_report, pairs)
        return Prepared(Split(store, np.arange(len(store)), layouts, report, pairs), val)
    width = 2 if pairs else 1  # store examples per row
    train_idx, val_idx = (_examples(rows, width) for rows in split_indices(len(store) // width, cfg.val_fraction,
                                                                            cfg.seed))
    val = Split(store, val_idx, layouts, Report(pairs=pairs), pairs) if len(val_idx) else None
    return Prepared(Split(store, train_idx, layouts, report, pairs), val)


def _examples(rows: np.ndarray, width: int) -> np.ndarray:
    """The store indices [len(rows) * width] of rows' examples: row i's are width * i, ..., width * i + width - 1."""
    return (rows[:, None] * width + np.arange(width)).reshape(-1)
