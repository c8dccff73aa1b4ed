"""What flows through the data pipeline: rows read from files, tokenised examples, and the report of what was
skipped, truncated or dropped (nothing is dropped silently).

sources (files -> Row | BadRow) -> formats (Row -> Example) -> length (fit to max_seq_len) -> store/packing
(Examples -> batches of inputs, targets, weights, segment ids, positions).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import numpy as np

from gemmatune.errors import GemmatuneError


@dataclasses.dataclass(frozen=True)
class Location:
    """Where a row came from: 1-based line number for line-oriented files (JSONL, CSV, TSV), 1-based row number
    otherwise (JSON array element, Parquet/Arrow row, Hub dataset row)."""

    path: str
    number: int
    unit: str = "line"  # "line" or "row"

    def __str__(self) -> str:
        return f"{self.path}:{self.number}" if self.unit == "line" else f"{self.path} row {self.number}"


@dataclasses.dataclass(frozen=True)
class Row:
    where: Location
    data: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class BadRow:
    """A row that could not be read (e.g. malformed JSON on one line). `reason` is a short fixed category used to
    count skips ("malformed JSON", "invalid UTF-8", ...); `detail` says what exactly is wrong and how to fix it."""

    where: Location
    reason: str
    detail: str


class RowError(GemmatuneError):
    """Raised by a formatter for a row it cannot use; the pipeline adds the location and skips or stops."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class DataError(GemmatuneError):
    """A bad row or file, with its location, stopping the run (the default without --skip-bad-rows)."""

    def __init__(self, where: Location | str, reason: str, detail: str) -> None:
        super().__init__(f"{where}: {reason}: {detail} (pass --skip-bad-rows to skip such rows and count them)"
                         if isinstance(where, Location) else f"{where}: {reason}: {detail}")
        self.where, self.reason = where, reason


@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenised example: tokens [n] int32, exactly one <bos> first; mask [n] bool, True where the token is a
    trained target (predicted from the tokens before it). mask[0] (the <bos>) is never True."""

    tokens: np.ndarray
    mask: np.ndarray
    truncated: bool = False

    def __post_init__(self) -> None:
        assert self.tokens.shape == self.mask.shape and self.tokens.ndim == 1, (self.tokens.shape, self.mask.shape)

    @property
    def slots(self) -> int:
        """Positions it takes in a packed row: inputs are tokens[:-1], targets tokens[1:]."""
        return len(self.tokens) - 1

    @property
    def trained(self) -> int:
        return int(self.mask[1:].sum())


@dataclasses.dataclass(frozen=True)
class Pair:
    """One preference row: the chosen and the rejected reply to the same prompt, each a whole Example (<bos>, the
    prompt's tokens, the reply's, <eos>). Both begin with the same `prompt` tokens (<bos> included), never trained;
    the store keeps chosen at index 2i and rejected at 2i + 1."""

    chosen: Example
    rejected: Example
    prompt: int  # the shared leading tokens, <bos> included

    def __post_init__(self) -> None:
        assert 0 < self.prompt <= min(len(self.chosen.tokens), len(self.rejected.tokens)), self.prompt

    @property
    def truncated(self) -> bool:
        return self.chosen.truncated or self.rejected.truncated


@dataclasses.dataclass
class Report:
    """Counts of what happened to the rows; every row read ends in exactly one of used / skipped / dropped. For
    preference data (`pairs`) a row is a pair of examples: used, truncated and dropped count pairs, tokens and trained
    both of their examples, and prompt the prompt's tokens once per pair (<bos> included)."""

    read: int = 0
    used: int = 0
    truncated: int = 0
    tokens: int = 0  # in the used examples, after fitting to length
    trained: int = 0  # of those, trained targets
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # reason -> rows
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # reason -> rows
    first_bad: dict[str, str] = dataclasses.field(default_factory=dict)  # reason -> first location, for messages
    pairs: bool = False
    prompt: int = 0  # pairs only: the used pairs' prompt tokens, each counted once

    def to_dict(self) -> dict[str, Any]:
        return {"read": self.read, "used": self.used, "truncated": self.truncated, "tokens": self.tokens,
                "trained": self.trained, "pairs": self.pairs, "prompt": self.prompt,
                "skipped": dict(self.skipped), "dropped": dict(self.dropped), "first_bad": dict(self.first_bad)}
