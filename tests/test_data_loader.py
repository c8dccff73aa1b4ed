"""The example store (bit-exact round trip, atomic writes, clear errors on damage, bounded memory on a large store),
the train/validation split, and the batch stream: every example once per epoch, seeded order, bit-exact resume
across group and epoch boundaries, refusal to resume on changed data or settings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemmatune.data.loader import (
    BatchIterator,
    ExampleStore,
    StoreWriter,
    split_indices,
)
from gemmatune.data.records import Example
from gemmatune.errors import GemmatuneError

BOS, PAD = 2, 0
ID = 100  # example tokens are ID * (example + 1) + position, so every target names its example
SEQ_LEN, BATCH, BUFFER = 48, 4, 32


def numbered_example(i: int, slots: int, rng: np.random.Generator) -> Example:
    tokens = np.concatenate([[BOS], ID * (i + 1) + np.arange(1, slots + 1)]).astype(np.int32)  # [slots + 1]
    return Example(tokens, np.concatenate([[False], rng.random(slots) < 0.7]))


def write_store(path: Path, n: int, seed: int = 0, max_slots: int = 40) -> tuple[ExampleStore, list[Example]]:
    rng = np.random.default_rng(seed)
    examples = [numbered_example(i, int(rng.integers(1, max_slots + 1)), rng) for i in range(n)]
    with StoreWriter(path) as w:
        for e in examples:
            w.append(e)
    return ExampleStore(path), examples


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[ExampleStore, list[Example]]:
    """150 examples of 1..40 slots: about 5 groups and 17 batches per epoch at the settings above."""
    return write_store(tmp_path_factory.mktemp("store") / "train", 150)


def iterator(store: ExampleStore, indices: np.ndarray | None = None, **kw) -> BatchIterator:
    settings_ = {"seq_len": SEQ_LEN, "batch_size": BATCH, "pad_id": PAD, "shuffle_buffer": BUFFER, "seed": 0} | kw
    return BatchIterator(store, np.arange(len(store)) if indices is None else indices, **settings_)


def row_examples(batches: list[dict]) -> list[list[int]]:
    """For every row of the batches, the examples in it (by the ids in their targets), checking each segment
    holds one example."""
    out = []
    for b in batches:
        for targets, seg in zip(b["targets"], b["segment_ids"]):
            row = []
            for s in range(1, seg.max() + 1):
                ids = set((targets[seg == s] // ID - 1).tolist())
                assert len(ids) == 1, f"segment {s} mixes examples {ids}"
                row.append(ids.pop())
            out.append(row)
    return out


# ---------------------------------------------------------------- the store


@given(st.lists(st.integers(2, 30), max_size=25), st.integers(0, 2**32 - 1), st.integers(1, 64))
@settings(max_examples=40, deadline=None)
def test_store_round_trip_is_bit_exact(sizes: list[int], seed: int, buffer_tokens: int) -> None:
    rng = np.random.default_rng(seed)
    examples = [Example(rng.integers(-2**31, 2**31, n, dtype=np.int64).astype(np.int32), rng.random(n) < 0.5,
                        bool(rng.integers(2))) for n in sizes]
    with tempfile.TemporaryDirectory() as tmp:
        with StoreWriter(Path(tmp) / "s", buffer_tokens=buffer_tokens) as w:  # small buffers: many flushes
            for e in examples:
                w.append(e)
        store = ExampleStore(Path(tmp) / "s")
        assert len(store) == len(examples)
        assert np.array_equal(store.lengths(), [n - 1 for n in sizes])
        order = rng.integers(0, len(examples), 2 * len(examples))  # shuffled, with repeats
        for got, i in zip([store[i] for i in range(len(store))] + store.get_many(order),
                          list(range(len(examples))) + order.tolist()):
            want = examples[i]
            assert got.tokens.dtype == np.int32 and got.mask.dtype == bool
            assert np.array_equal(got.tokens, want.tokens) and np.array_equal(got.mask, want.mask)
            assert got.truncated == want.truncated
        # The digest (the resume fingerprint) depends on the contents only, not on where buffers were flushed.
        with StoreWriter(Path(tmp) / "t", buffer_tokens=1 << 20) as w:
            for e in examples:
                w.append(e)
        assert ExampleStore(Path(tmp) / "t").digest == store.digest


def test_failed_write_leaves_nothing(tmp_path: Path, data: tuple[ExampleStore, list[Example]]) -> None:
    _, examples = data
    with pytest.raises(RuntimeError, match="boom"):
        with StoreWriter(tmp_path / "s", buffer_tokens=16) as w:
            for e in examples[:50]:
                w.append(e)
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    # A failed rewrite leaves the existing store whole; a successful one replaces it without leftovers.
    store, _ = write_store(tmp_path / "s", 10)
    with pytest.raises(RuntimeError):
        with StoreWriter(tmp_path / "s") as w:
            w.append(examples[0])
            raise RuntimeError
    assert ExampleStore(tmp_path / "s").digest == store.digest and len(ExampleStore(tmp_path / "s")) == 10
    write_store(tmp_path / "s", 3)
    assert len(ExampleStore(tmp_path / "s")) == 3 and [p.name for p in tmp_path.iterdir()] == ["s"]


KILLED_WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from gemmatune.data.loader import StoreWriter
    from gemmatune.data.records import Example

    w = StoreWriter(sys.argv[1], buffer_tokens=1000)
    for i in range(200):  # 200 k tokens flushed to disk: a writer killed well into its data
        w.append(Example(np.arange(1000, dtype=np.int32) + i, np.ones(1000, bool)))
    print("written", flush=True)
    sys.stdin.read()  # wait to be killed
""")


def test_a_killed_writers_leftover_is_removed_by_the_next_writer(tmp_path: Path) -> None:
    """SIGKILL gives the writer no chance to clean up: its hidden staging directory stays, as large as the data
    written so far, until the next preparation of the same store removes it."""
    old, _ = write_store(tmp_path / "s", 5)
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path / "s")], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "written\n"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    leftovers = [p for p in tmp_path.iterdir() if p.name != "s"]
    assert [p.name for p in leftovers] == [f".s.partial-{child.pid}"]
    assert (leftovers[0] / "tokens.bin").stat().st_size >= 199_000 * 4
    assert ExampleStore(tmp_path / "s").digest == old.digest  # the killed writer did not touch the store
    (tmp_path / ".other.partial-1").mkdir()  # another store's leftover is not this writer's to remove
    new, examples = write_store(tmp_path / "s", 7, seed=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.partial-1", "s"]
    assert len(new) == 7 and new[6].tokens.tolist() == examples[6].tokens.tolist()


def test_writer_refuses_to_replace_a_directory_that_is_not_a_store(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(GemmatuneError, match="is not an example store; refusing to overwrite"):
        StoreWriter(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def _truncate(path: Path, name: str) -> None:
    with open(path / name, "r+b") as f:
        f.truncate(os.path.getsize(path / name) - 1)


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing": (lambda p: os.rename(p, p.with_name("elsewhere")), "not an example store .no such directory"),
    "no meta": (lambda p: (p / "meta.json").unlink(), "not an example store .no meta.json"),
    "bad meta": (lambda p: (p / "meta.json").write_text("{"), "meta.json is not an example store"),
    "version": (lambda p: (p / "meta.json").write_text(json.dumps(
        {**json.loads((p / "meta.json").read_text()), "version": 99})), "format version 99"),
    "tokens": (lambda p: _truncate(p, "tokens.bin"), "tokens.bin is .* bytes, expected"),
    "mask": (lambda p: (p / "mask.bin").unlink(), "mask.bin is missing"),
    "offsets": (lambda p: np.save(p / "offsets.npy", np.zeros(3, np.int64)), "offsets.npy holds"),
    "garbled offsets": (lambda p: (p / "offsets.npy").write_bytes(b"junk"), "offsets.npy cannot be read"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_store_is_named_in_the_error(tmp_path: Path, damage: str) -> None:
    write_store(tmp_path / "s", 5)
    harm, message = DAMAGE[damage]
    harm(tmp_path / "s")
    with pytest.raises(GemmatuneError, match=message) as e:
        ExampleStore(tmp_path / "s")
    assert str(e.value).startswith(str(tmp_path / "s"))


MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import numpy as np
    from gemmatune.data.loader import ExampleStore, StoreWriter
    from gemmatune.data.records import Example

    def hwm_mb():  # the process's peak resident memory so far
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024

    path = Path(sys.argv[1])
    tokens = np.arange(20_001, dtype=np.int32)  # 80 kB per example
    mask = tokens % 3 == 0
    start = hwm_mb()
    with StoreWriter(path) as w:
        for i in range(1_250):  # 25 M tokens: 100 MB of tokens.bin plus 25 MB of mask.bin
            w.append(Example(tokens + i, mask))
    written = hwm_mb()
    store = ExampleStore(path)
    got = store.get_many(np.random.default_rng(0).choice(len(store), 16, replace=False)) + [store[7]]
    assert got[-1].tokens[1] == 8
    read = hwm_mb()
    whole = np.fromfile(path / "tokens.bin", np.int32)  # the control: what reading everything costs
    control = hwm_mb()
    print(json.dumps({"size_mb": whole.nbytes / 2**20, "write": written - start, "read": read - written,
                      "control": control - read}))
""")


def test_store_memory_stays_bounded_on_a_large_store(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / "big")], capture_output=True,
                         text=True, check=True)
    growth = json.loads(out.stdout)
    print(growth)
    assert growth["size_mb"] > 90
    assert growth["control"] > 80  # the measurement sees a whole-file read
    assert growth["write"] < 40  # streaming: the write buffer, not the dataset
    assert growth["read"] < 8  # a few examples, not the file


# ---------------------------------------------------------------- the split


@pytest.mark.parametrize(("n", "fraction", "val"), [(100, 0.1, 10), (10, 0.01, 1), (2, 0.5, 1), (2, 0.9, 1),
                                                     (1, 0.5, 0), (50, 0.0, 0), (7, 0.3, 2), (0, 0.1, 0)])
def test_split_sizes_and_disjointness(n: int, fraction: float, val: int) -> None:
    train, valid = split_indices(n, fraction, seed=3)
    assert len(valid) == val and len(train) == n - val
    assert np.array_equal(np.sort(np.concatenate([train, valid])), np.arange(n))
    a, b = split_indices(n, fraction, seed=3)
    assert np.array_equal(a, train) and np.array_equal(b, valid)


def test_split_depends_on_the_seed() -> None:
    assert not np.array_equal(split_indices(1000, 0.1, 0)[1], split_indices(1000, 0.1, 1)[1])


# ---------------------------------------------------------------- the batch stream


def test_each_epoch_holds_every_example_once(data: tuple[ExampleStore, list[Example]]) -> None:
    store, examples = data
    indices = np.arange(0, len(store), 2)  # a subset, as after a split
    it = iterator(store, indices)
    epochs = [it.epoch_rows(e) for e in range(3)]
    batches = [next(it) for _ in range(-(-sum(epochs) // BATCH))]
    for b in batches:
        assert {k: (v.shape, v.dtype) for k, v in b.items() if k != "epoch"} == {
            "inputs": ((BATCH, SEQ_LEN), np.int32), "targets": ((BATCH, SEQ_LEN), np.int32),
            "weights": ((BATCH, SEQ_LEN), np.float32), "segment_ids": ((BATCH, SEQ_LEN), np.int32),
            "positions": ((BATCH, SEQ_LEN), np.int32)}
    rows = row_examples(batches)
    keys = ("inputs", "targets", "weights", "positions")
    flat = {k: np.concatenate([b[k] for b in batches]) for k in (*keys, "segment_ids")}  # [rows, SEQ_LEN]
    start = 0
    for count in epochs:
        assert sorted(i for row in rows[start:start + count] for i in row) == indices.tolist()
        for r in range(start, start + count):
            for s, i in enumerate(rows[r], 1):  # each segment is exactly its example, positions from 0
                ex, at = examples[i], flat["segment_ids"][r] == s
                want = (ex.tokens[:-1], ex.tokens[1:], ex.mask[1:], np.arange(ex.slots))
                assert all(np.array_equal(flat[k][r, at], w) for k, w in zip(keys, want))
        start += count
    row_epoch = np.repeat(np.arange(len(epochs)), epochs)  # [rows]
    assert [b["epoch"] for b in batches] == row_epoch[::BATCH].tolist()  # the epoch of each batch's first row
    assert sum((b["segment_ids"] > 0).sum() for b in batches) >= 0.9 * len(batches) * BATCH * SEQ_LEN


def test_same_seed_same_batches_other_seed_or_epoch_other_order(data: tuple[ExampleStore, list[Example]]) -> None:
    store, _ = data

    def first(n: int, **kw) -> list[dict]:
        it = iterator(store, **kw)
        return [next(it) for _ in range(n)]

    a, b, c = first(40), first(40), first(40, seed=1)
    assert all(_equal(x, y) for x, y in zip(a, b))
    assert row_examples(a) != row_examples(c)
    it = iterator(store)
    rows = row_examples([next(it) for _ in range(40)])
    e0, e1 = it.epoch_rows(0), it.epoch_rows(1)
    # Another epoch groups the examples differently (not only another row order): the rows' contents differ.
    assert {frozenset(r) for r in rows[:e0]} != {frozenset(r) for r in rows[e0:e0 + e1]}


def _equal(x: dict, y: dict) -> bool:
    return x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) and np.asarray(x[k]).dtype ==
                                        np.asarray(y[k]).dtype for k in x)


RESUME_BATCHES = 90  # about five epochs: resuming at any k below crosses group and epoch boundaries


@pytest.fixture(scope="module")
def reference(data: tuple[ExampleStore, list[Example]]) -> tuple[list[dict], list[dict]]:
    """An uninterrupted run: its batches and its state before each batch."""
    it = iterator(data[0], packing="pack")
    states, batches = [], []
    for _ in range(RESUME_BATCHES):
        states.append(json.loads(json.dumps(it.state())))  # through JSON, as a checkpoint stores it
        batches.append(next(it))
    assert batches[-1]["epoch"] >= 4
    return batches, states


@given(st.integers(0, RESUME_BATCHES - 25))
@settings(max_examples=40, deadline=None)
def test_resume_continues_bit_for_bit(data: tuple[ExampleStore, list[Example]],
                                      reference: tuple[list[dict], list[dict]], k: int) -> None:
    batches, states = reference
    resumed = iterator(data[0], state=states[k])
    assert all(_equal(next(resumed), batches[k + j]) for j in range(25))
    # restore() on an iterator that is elsewhere in the stream does the same.
    other = iterator(data[0])
    next(other)
    other.restore(states[k])
    assert _equal(next(other), batches[k])


def test_states_are_small(reference: tuple[list[dict], list[dict]]) -> None:
    assert max(len(json.dumps(s)) for s in reference[1]) < 400


@pytest.mark.parametrize(("change", "named"), [({"seed": 1}, "seed 0 -> 1"), ({"seq_len": 40}, "seq_len 48 -> 40"),
                                               ({"shuffle_buffer": 16}, "shuffle_buffer"),
                                               ({"packing": "pad"}, "packing"),
                                               ({"indices": np.arange(149)}, "indices")])
def test_resume_refuses_changed_settings(data: tuple[ExampleStore, list[Example]],
                                         reference: tuple[list[dict], list[dict]], change: dict, named: str) -> None:
    with pytest.raises(GemmatuneError, match=f"data or data settings changed since the checkpoint .*{named}"):
        iterator(data[0], state=reference[1][20], **change)


def test_resume_refuses_changed_data(tmp_path: Path, data: tuple[ExampleStore, list[Example]],
                                     reference: tuple[list[dict], list[dict]]) -> None:
    _, examples = data
    changed = [*examples[:-1], Example(examples[-1].tokens, ~examples[-1].mask & (np.arange(len(
        examples[-1].mask)) > 0))]  # same lengths, one example's mask differs
    with StoreWriter(tmp_path / "s") as w:
        for e in changed:
            w.append(e)
    with pytest.raises(GemmatuneError, match="data or data settings changed since the checkpoint .*store"):
        iterator(ExampleStore(tmp_path / "s"), state=reference[1][20])
    with pytest.raises(GemmatuneError, match="malformed"):
        iterator(data[0], state={"epoch": 1})


def test_validation_is_one_ordered_pass(data: tuple[ExampleStore, list[Example]]) -> None:
    store, _ = data
    indices = np.arange(10, 110)
    for packing in ("pack", "pad"):
        it = iterator(store, indices, shuffle=False, packing=packing)
        batches = list(it)
        rows = row_examples(batches)
        assert sorted(i for row in rows for i in row) == indices.tolist()
        assert batches == [] or all(b["epoch"] == 0 for b in batches)
        assert len(batches) == -(-it.epoch_rows() // BATCH) and next(it, None) is None
        # The last batch is topped up with padding rows that carry no weight.
        assert len(rows) == len(batches) * BATCH
        tail = len(batches) * BATCH - it.epoch_rows()
        if tail:
            last = batches[-1]
            assert not last["segment_ids"][-tail:].any() and not last["weights"][-tail:].any()
        if packing == "pad":
            assert [row for row in rows if row] == [[i] for i in indices.tolist()]
        else:  # groups are consecutive runs of the indices
            group_of = {i: g for g in range(-(-len(indices) // BUFFER)) for i in indices[g * BUFFER:(g + 1) * BUFFER]}
            seen = [group_of[i] for row in rows for i in row]
            assert seen == sorted(seen)


def test_pad_mode_has_one_example_per_row(data: tuple[ExampleStore, list[Example]]) -> None:
    it = iterator(data[0], packing="pad")
    rows = row_examples([next(it) for _ in range(-(-len(data[0]) // BATCH))])
    assert it.epoch_rows() == len(data[0]) and all(len(row) == 1 for row in rows)
    assert sorted(row[0] for row in rows[:len(data[0])]) == list(range(len(data[0])))


def test_only_one_group_is_read_at_a_time(data: tuple[ExampleStore, list[Example]],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    store = data[0]
    reads: list[int] = []
    real = store.get_many
    monkeypatch.setattr(store, "get_many", lambda idx: reads.append(len(idx)) or real(idx))
    it = iterator(store)
    for _ in range(30):
        next(it)
    assert reads and max(reads) <= BUFFER


def test_examples_longer_than_the_rows_are_refused(data: tuple[ExampleStore, list[Example]]) -> None:
    with pytest.raises(GemmatuneError, match="up to 40 positions long but seq_len is 30"):
        iterator(data[0], seq_len=30)


def test_processes_read_only_their_rows_and_together_make_the_batch(
        data: tuple[ExampleStore, list[Example]], monkeypatch: pytest.MonkeyPatch) -> None:
    store, _ = data
    kw = {"seq_len": 64, "batch_size": 6, "pad_id": 0, "shuffle_buffer": 40, "seed": 3}
    whole = BatchIterator(store, np.arange(len(store)), **kw)
    parts = [BatchIterator(store, np.arange(len(store)), take=take, **kw) for take in ([0, 1, 2], [3, 4, 5])]
    read: list[int] = []
    real = store.get_many
    monkeypatch.setattr(store, "get_many", lambda idx: read.append(len(idx)) or real(idx))

    def reading(it: BatchIterator) -> tuple[dict, int]:
        read.clear()
        return next(it), sum(read)

    for _ in range(12):  # across group and epoch boundaries
        (want, n), got = reading(whole), [reading(p) for p in parts]
        for k in ("inputs", "targets", "weights", "segment_ids", "positions"):
            np.testing.assert_array_equal(np.concatenate([g[k] for g, _ in got]), want[k])
        assert sum(m for _, m in got) == n  # each process read the examples of its own rows, no others
        assert [p.state() for p in parts] == [whole.state()] * 2  # and every process keeps the same position


@pytest.mark.parametrize(("shuffle", "packing"), [(True, "pack"), (True, "pad"), (False, "pack")])
def test_row_plan_is_what_the_batches_hold(data: tuple[ExampleStore, list[Example]], shuffle: bool,
                                           packing: str) -> None:
    """row_plan (what `data inspect` measures packing on) lists exactly the rows the batches then carry."""
    store, _ = data
    indices = np.arange(1, len(store), 3)
    for epoch in (0, 1) if shuffle else (0,):
        it = iterator(store, indices, seed=5, shuffle=shuffle, packing=packing)
        plan = it.row_plan(epoch)
        assert len(plan) == it.epoch_rows(epoch)
        skip = sum(it.epoch_rows(e) for e in range(epoch))  # the rows of earlier epochs
        batches = [next(it) for _ in range(-(-(skip + len(plan)) // BATCH))]
        assert row_examples(batches)[skip:skip + len(plan)] == [row.tolist() for row in plan]
