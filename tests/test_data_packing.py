"""Packing: best-fit decreasing against a plain reference implementation, row arrays that keep examples apart
(segment ids, positions restarting at 0, each example's own inputs/targets/weights), and the padding saved on
instruction-like lengths compared with one example per row."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemmatune.data.packing import assign_rows, build_rows, efficiency, pad_rows
from gemmatune.data.records import Example

BOS, PAD = 2, 0
ID = 1000  # example tokens are ID * (example + 1) + position, so every target names its example


def make_examples(lengths: list[int], mask_seed: int) -> list[Example]:
    """Examples of the given slot counts; random masks (never the <bos>)."""
    rng = np.random.default_rng(mask_seed)
    out = []
    for i, n in enumerate(lengths):
        tokens = np.concatenate([[BOS], ID * (i + 1) + np.arange(1, n + 1)]).astype(np.int32)  # [n + 1]
        mask = np.concatenate([[False], rng.random(n) < rng.random()])  # [n + 1]
        out.append(Example(tokens, mask))
    return out


def reference_bfd(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Best-fit decreasing written the obvious O(n * rows) way."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [r for r in range(len(rows)) if free[r] >= lengths[i]]
        if fits:
            r = min(fits, key=lambda r: (free[r], r))
            rows[r].append(i)
            free[r] -= lengths[i]
        else:
            rows.append([i])
            free.append(seq_len - lengths[i])
    return rows


@st.composite
def cases(draw: st.DrawFn) -> tuple[int, list[int]]:
    seq_len = draw(st.integers(1, 48))
    return seq_len, draw(st.lists(st.integers(1, seq_len), max_size=60))


def test_assign_rows_small_case() -> None:
    # sizes 6, 5, 4 open three rows; 3 fits row 1 exactly (free 3) rather than row 2 (free 4); 2 fills row 0.
    assert assign_rows([5, 3, 4, 2, 6], 8) == [[4, 3], [0, 1], [2]]
    assert pad_rows([5, 3, 4]) == [[0], [1], [2]]
    assert assign_rows([], 8) == []


@given(cases())
@settings(max_examples=300, deadline=None)
def test_assign_rows_is_best_fit_decreasing(case: tuple[int, list[int]]) -> None:
    seq_len, lengths = case
    rows = assign_rows(lengths, seq_len)
    assert rows == reference_bfd(lengths, seq_len)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))  # each example in exactly one row
    assert all(row and sum(lengths[i] for i in row) <= seq_len for row in rows)
    assert assign_rows(np.array(lengths), seq_len) == rows  # deterministic, numpy input too
    # Any-fit guarantee: a row is opened only when its first example fits in no earlier row, so no two rows are
    # both at most half full (which bounds the rows by 2 * total / seq_len + 1).
    fills = [sum(lengths[i] for i in row) for row in rows]
    assert sum(f <= seq_len / 2 for f in fills) <= 1


@pytest.mark.parametrize("lengths", [[0, 3], [3, 9]])
def test_assign_rows_rejects_lengths_that_cannot_fit(lengths: list[int]) -> None:
    with pytest.raises(ValueError, match="lengths must lie in"):
        assign_rows(lengths, 8)


def check_rows(arrays: dict[str, np.ndarray], examples: list[Example], rows: list[list[int]], seq_len: int) -> None:
    """Every invariant the model and the loss rely on."""
    assert {k: (v.shape, v.dtype) for k, v in arrays.items()} == {
        "inputs": ((len(rows), seq_len), np.int32), "targets": ((len(rows), seq_len), np.int32),
        "weights": ((len(rows), seq_len), np.float32), "segment_ids": ((len(rows), seq_len), np.int32),
        "positions": ((len(rows), seq_len), np.int32)}
    seg, pos = arrays["segment_ids"], arrays["positions"]
    for r, row in enumerate(rows):
        used = int((seg[r] > 0).sum())
        assert used == sum(examples[i].slots for i in row) <= seq_len
        # Segments 1, 2, ... are contiguous from the left and padding (0) only trails.
        assert np.all(seg[r, used:] == 0) and np.all(np.diff(seg[r, :used]) >= 0)
        assert np.array_equal(np.unique(seg[r, :used]), np.arange(1, len(row) + 1))
        for s, i in enumerate(row, 1):
            where = np.flatnonzero(seg[r] == s)
            ex = examples[i]
            assert np.array_equal(where, where[0] + np.arange(ex.slots))  # one contiguous run
            assert np.array_equal(pos[r, where], np.arange(ex.slots))  # positions restart at 0, step 1
            assert np.array_equal(arrays["inputs"][r, where], ex.tokens[:-1])
            assert np.array_equal(arrays["targets"][r, where], ex.tokens[1:])
            assert np.array_equal(arrays["weights"][r, where], ex.mask[1:].astype(np.float32))
            # No attention across examples: all slots of one segment come from one example (tokens name it).
            assert set((arrays["targets"][r, where] // ID).tolist()) == {i + 1}
        pad = seg[r] == 0
        assert np.all(pos[r, pad] == 0) and np.all(arrays["weights"][r, pad] == 0)
        assert np.all(arrays["inputs"][r, pad] == PAD) and np.all(arrays["targets"][r, pad] == PAD)
    # Every trained target of every example appears exactly once, with weight 1 (token values are unique).
    trained = np.sort(arrays["targets"][arrays["weights"] == 1])
    expected = np.sort(np.concatenate([e.tokens[1:][e.mask[1:]] for e in examples] + [np.zeros(0, np.int32)]))
    assert np.array_equal(trained, expected)
    assert set(np.unique(arrays["weights"])) <= {0.0, 1.0}


@given(cases(), st.integers(0, 2**32 - 1), st.sampled_from(["pack", "pad"]))
@settings(max_examples=150, deadline=None)
def test_build_rows_keeps_examples_apart(case: tuple[int, list[int]], mask_seed: int, packing: str) -> None:
    seq_len, lengths = case
    examples = make_examples(lengths, mask_seed)
    rows = assign_rows(lengths, seq_len) if packing == "pack" else pad_rows(lengths)
    arrays = build_rows(examples, rows, seq_len, PAD)
    check_rows(arrays, examples, rows, seq_len)
    if rows:
        assert efficiency(rows, lengths, seq_len) == pytest.approx((arrays["segment_ids"] != 0).mean())


def test_build_rows_rejects_an_overfull_row() -> None:
    examples = make_examples([5, 4], 0)
    with pytest.raises(ValueError, match="more than seq_len 8"):
        build_rows(examples, [[0, 1]], 8, PAD)


def dolly_like_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Slot counts shaped like databricks-dolly-15k under the Gemma chat template: log-normal around a median of
    150 tokens (5th..95th percentile about 45..510), a tail cut at 1024 (truncation at max_seq_len)."""
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(np.log(150), 0.75, n)), 16, 1024).astype(np.int64)


def test_packing_efficiency_on_dolly_like_lengths() -> None:
    seq_len, buffer = 1024, 4096
    lengths = dolly_like_lengths(15_000)
    assert 50 <= np.median(lengths) <= 400 and lengths.max() == 1024
    packed = [assign_rows(lengths[g:g + buffer], seq_len) for g in range(0, len(lengths), buffer)]
    rows = sum(map(len, packed))
    pack = lengths.sum() / (rows * seq_len)
    pad = efficiency(pad_rows(lengths), lengths, seq_len)
    print(f"\nDolly-like, seq_len {seq_len}, shuffle buffer {buffer}: best-fit decreasing fills {pack:.1%} of slots "
          f"in {rows} rows (lower bound {int(np.ceil(lengths.sum() / seq_len))}); one example per row fills "
          f"{pad:.1%} in {len(lengths)} rows")
    assert pack >= 0.95
    assert pad < 0.25
    for g, rows in enumerate(packed):
        group = lengths[g * buffer:(g + 1) * buffer]
        assert efficiency(rows, group, seq_len) >= 0.95
