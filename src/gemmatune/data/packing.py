"""Packing examples into fixed-length rows: which examples share a row (best-fit decreasing bin packing) and the
row arrays that the model and the loss read.

A row has seq_len input positions. An example of n tokens takes n - 1 of them (inputs tokens[:-1], targets
tokens[1:], weights mask[1:]), so every target is predicted from tokens of its own example: the first target of a
segment is the example's second token, predicted from the example's own <bos>. Segment ids keep attention inside
each example and positions restart at 0 per example (trl #1230, axolotl #1718); padding is segment 0, weight 0.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

from gemmatune.data.records import Example


def assign_rows(lengths: Sequence[int] | np.ndarray, seq_len: int) -> list[list[int]]:
    """Best-fit decreasing: longest example first, each into the open row whose free space fits it most tightly,
    a new row when none fits. Returns rows in the order they were opened, each listing example indices in the
    order they were placed. Ties (equal lengths, equal free space) go to the lower index, so the result depends
    on the lengths alone. `lengths` are slot counts (Example.slots), each in [1, seq_len].

    BFD needs at most 11/9 of the optimal number of rows (+ 6/9); on many short examples it lands within a row
    or two of ceil(sum(lengths) / seq_len). O(n log n) comparisons (plus the list insertions' memmove)."""
    sizes = np.asarray(lengths, dtype=np.int64)  # [n]
    if sizes.size and (sizes.min() < 1 or sizes.max() > seq_len):
        raise ValueError(f"example lengths must lie in [1, {seq_len}], got {sizes.min()}..{sizes.max()}")
    rows: list[list[int]] = []
    # Rows that still have room, as (free slots, row number), kept sorted: bisect finds the tightest fit, and
    # among rows with equal room the one opened first. Full rows leave the list.
    open_rows: list[tuple[int, int]] = []
    for i in np.argsort(-sizes, kind="stable").tolist():  # longest first, lower index first among equals
        size = int(sizes[i])
        k = bisect.bisect_left(open_rows, (size, -1))
        if k == len(open_rows):
            r, free = len(rows), seq_len - size
            rows.append([i])
        else:
            room, r = open_rows.pop(k)
            free = room - size
            rows[r].append(i)
        if free:
            bisect.insort(open_rows, (free, r))
    return rows


def pad_rows(lengths: Sequence[int] | np.ndarray) -> list[list[int]]:
    """One example per row, the original notebooks' padding layout."""
    return [[i] for i in range(len(lengths))]


def build_rows(examples: Sequence[Example], rows: Sequence[Sequence[int]], seq_len: int,
               pad_id: int) -> dict[str, np.ndarray]:
    """The row arrays, each [len(rows), seq_len]: inputs, targets (int32; pad_id on padding), weights (float32,
    1.0 on trained targets), segment_ids (int32; 1, 2, ... per example in its row, 0 on padding) and positions
    (int32; 0, 1, ... restarting per example, 0 on padding). rows[r] lists indices into `examples`, placed left
    to right; padding is trailing. An empty row is all padding."""
    shape = (len(rows), seq_len)
    inputs = np.full(shape, pad_id, np.int32)
    targets = np.full(shape, pad_id, np.int32)
    weights = np.zeros(shape, np.float32)
    segment_ids = np.zeros(shape, np.int32)
    positions = np.zeros(shape, np.int32)
    count = np.arange(seq_len, dtype=np.int32)  # [seq_len]
    for r, row in enumerate(rows):
        start = 0
        for segment, i in enumerate(row, 1):
            ex = examples[i]
            end = start + ex.slots
            if end > seq_len:
                raise ValueError(f"row {r} holds {end} slots or more, more than seq_len {seq_len}")
            inputs[r, start:end] = ex.tokens[:-1]
            targets[r, start:end] = ex.tokens[1:]
            weights[r, start:end] = ex.mask[1:]
            segment_ids[r, start:end] = segment
            positions[r, start:end] = count[:end - start]
            start = end
    return {"inputs": inputs, "targets": targets, "weights": weights, "segment_ids": segment_ids,
            "positions": positions}


def efficiency(rows: Sequence[Sequence[int]], lengths: Sequence[int] | np.ndarray, seq_len: int) -> float:
    """Fraction of the rows' slots that hold an example token rather than padding; computed from the layout alone,
    so a whole epoch can be measured without building its arrays. (For built arrays it is
    `(segment_ids != 0).mean()`.)"""
    sizes = np.asarray(lengths, dtype=np.int64)  # [n]
    used = sum(int(sizes[list(row)].sum()) for row in rows)
    return used / (len(rows) * seq_len) if rows else 0.0
