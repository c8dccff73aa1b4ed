"""Tokenised examples on disk, and the resumable stream of packed batches read from them.

The store is a directory written once by `StoreWriter` and read by `ExampleStore`:
  tokens.bin     int32 little-endian, every example's tokens concatenated
  mask.bin       uint8 (0/1), the loss mask, aligned with tokens.bin
  truncated.bin  uint8 (0/1), one per example: Example.truncated
  offsets.npy    int64 [n + 1], example i is tokens[offsets[i]:offsets[i + 1]]
  meta.json      format, version, count, total tokens, truncated count, and a digest of the contents
Examples are read with seek + readinto into fresh arrays, never through a memory map of the whole file: mapped pages
that were read count in the process's RSS, and the pipeline must stay within bounded memory for any dataset size.

`BatchIterator` turns a store into an endless stream of [batch_size, seq_len] batches: each epoch permutes the
examples, packs them one shuffle buffer ("group") at a time, shuffles that group's rows, and streams rows into
batches across group and epoch boundaries. Its position is (epoch, group, row), so `state()` is a few numbers and a
restored iterator continues bit for bit.

With `pairs` (preference data: store examples 2i and 2i + 1 are a pair's chosen and rejected) the unit that is
shuffled, grouped and packed is the pair, of size chosen.slots + rejected.slots, and a row places each pair's chosen
immediately before its rejected: in every row segment ids 2j - 1 and 2j (j = 1, 2, ...) are the chosen and the
rejected of one pair. Both are separate segments, so neither attends to the other, and each restarts its positions
at 0 (each sees its own copy of the prompt, as TRL's padding-free DPO does). Batch sizes stay in rows: a row holds
one pair or more (exactly one with packing "pad").
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn, Protocol

import numpy as np

from gemmatune.atomic import begin_dir, commit_dir
from gemmatune.data.packing import assign_rows, build_rows, pad_rows
from gemmatune.data.records import Example
from gemmatune.errors import GemmatuneError

FORMAT, VERSION = "gemmatune-example-store", 1
TOKENS, MASK, TRUNCATED, OFFSETS, META = "tokens.bin", "mask.bin", "truncated.bin", "offsets.npy", "meta.json"
_DATA_FILES = (TOKENS, MASK, TRUNCATED)
_TOKEN = np.dtype("<i4")  # explicit little-endian: the files are the same on every host
_OFFSET = np.dtype("<i8")
_REBUILD = "delete the directory and prepare the data again"
STATE_VERSION = 1


class StoreWriter:
    """Writes an ExampleStore at `path`, streaming: examples are buffered up to `buffer_tokens` tokens and then
    appended to the files, so memory stays bounded whatever the dataset size. Everything goes into a hidden sibling
    (".NAME.partial-PID", `atomic.begin_dir`) that replaces `path` only in `close()`; `abort()` (or an exception
    inside a `with` block) removes it, so a failed write never leaves a half-written store and never harms an
    existing one. What a killed writer left (as large as the data) is removed by the next writer of `path`."""

    def __init__(self, path: str | Path, *, buffer_tokens: int = 1 << 20) -> None:
        self.path = Path(path)
        if self.path.exists() and not (self.path / META).is_file():
            # Replacing is only safe for our own store; never delete a directory a user pointed at by mistake.
            raise GemmatuneError(f"{self.path}: exists and is not an example store; refusing to overwrite it. "
                                 "Choose an empty or new directory.")
        self._tmp = begin_dir(self.path)
        # offsets.npy needs its length in the header, unknown until close: stream the raw int64s now and put the
        # header in front at close (offsets are 8 bytes per example, cheap to copy once).
        self._offsets_raw = self._tmp / (OFFSETS + ".raw")
        self._files = {name: open(self._tmp / name, "wb") for name in _DATA_FILES}
        self._files[OFFSETS] = open(self._offsets_raw, "wb")
        # One hash per file, so the digest does not depend on where the buffer was flushed.
        self._hashes = {name: hashlib.blake2b(digest_size=16) for name in self._files}
        self._write(OFFSETS, np.zeros(1, _OFFSET))
        self._pending: list[Example] = []
        self._pending_tokens = 0
        self._buffer_tokens = buffer_tokens
        self.count = self.total = self.truncated = 0
        self._done = False

    def append(self, example: Example) -> None:
        if self._done:
            raise ValueError("append to a closed StoreWriter")
        if len(example.tokens) < 2:
            # The pipeline drops (and reports) examples without targets before storing them.
            raise ValueError("an example needs <bos> and at least one more token")
        self._pending.append(example)
        self._pending_tokens += len(example.tokens)
        if self._pending_tokens >= self._buffer_tokens:
            self._flush()

    def _write(self, name: str, array: np.ndarray) -> None:
        data = array.tobytes()
        self._files[name].write(data)
        self._hashes[name].update(data)

    def _flush(self) -> None:
        if not self._pending:
            return
        sizes = np.array([len(e.tokens) for e in self._pending], _OFFSET)  # [k]
        self._write(TOKENS, np.concatenate([np.asarray(e.tokens, _TOKEN) for e in self._pending]))  # [sum sizes]
        self._write(MASK, np.concatenate([np.asarray(e.mask, bool) for e in self._pending]).view(np.uint8))
        self._write(TRUNCATED, np.array([e.truncated for e in self._pending], np.uint8))  # [k]
        self._write(OFFSETS, self.total + np.cumsum(sizes))  # [k]
        self.count += len(self._pending)
        self.total += int(sizes.sum())
        self.truncated += sum(e.truncated for e in self._pending)
        self._pending, self._pending_tokens = [], 0

    def close(self) -> ExampleStore:
        """Finish the files and move the store into place (replacing an older store at the same path)."""
        if self._done:
            raise ValueError("StoreWriter closed twice")
        try:
            self._finish()
        except BaseException:
            self.abort()  # e.g. a full disk: no half-written store
            raise
        self._done = True
        return ExampleStore(self.path)

    def _finish(self) -> None:
        self._flush()
        for f in self._files.values():
            f.flush()
            os.fsync(f.fileno())  # the data must be on disk before the rename makes the store visible
            f.close()
        with open(self._tmp / OFFSETS, "wb") as out, open(self._offsets_raw, "rb") as raw:
            np.lib.format.write_array_header_1_0(
                out, {"descr": _OFFSET.str, "fortran_order": False, "shape": (self.count + 1,)})
            shutil.copyfileobj(raw, out)
            out.flush()
            os.fsync(out.fileno())
        self._offsets_raw.unlink()
        digest = hashlib.blake2b(b"".join(self._hashes[n].digest() for n in sorted(self._hashes)), digest_size=16)
        meta = {"format": FORMAT, "version": VERSION, "count": self.count, "tokens": self.total,
                "truncated": self.truncated, "digest": digest.hexdigest()}
        (self._tmp / META).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        commit_dir(self._tmp, self.path)  # replaces an older store at `path`

    def abort(self) -> None:
        """Discard everything written; `path` is left as it was."""
        if self._done:
            return
        self._done = True
        for f in self._files.values():
            f.close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


class ExampleStore:
    """Read access to a store written by StoreWriter. Only the offsets (8 bytes per example) are held in memory;
    examples are read on demand."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_path = self.path / META
        if not meta_path.is_file():
            what = "no such directory" if not self.path.exists() else f"no {META} in it"
            raise GemmatuneError(f"{self.path}: not an example store ({what}). Prepare the data first.")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            ok = meta.get("format") == FORMAT and all(isinstance(meta.get(k), int)
                                                      for k in ("version", "count", "tokens"))
        except (ValueError, AttributeError):
            ok = False
        if not ok:
            self._corrupt(f"{META} is not an example store's metadata")
        if meta["version"] != VERSION:
            raise GemmatuneError(f"{self.path}: example store format version {meta['version']}, but this gemmatune "
                                 f"reads version {VERSION}; {_REBUILD}.")
        self.count, self.total, self.digest = meta["count"], meta["tokens"], str(meta.get("digest"))
        try:
            offsets = np.load(self.path / OFFSETS, allow_pickle=False)  # [count + 1]
        except (OSError, ValueError) as e:
            self._corrupt(f"{OFFSETS} cannot be read ({e})")
        if offsets.dtype != _OFFSET or offsets.shape != (self.count + 1,):
            self._corrupt(f"{OFFSETS} holds {offsets.dtype} {offsets.shape}, expected int64 ({self.count + 1},)")
        if offsets[0] != 0 or offsets[-1] != self.total or np.any(np.diff(offsets) < 2):
            self._corrupt(f"{OFFSETS} is inconsistent with {META}")
        for name, size in ((TOKENS, self.total * _TOKEN.itemsize), (MASK, self.total), (TRUNCATED, self.count)):
            actual = (self.path / name).stat().st_size if (self.path / name).is_file() else None
            if actual != size:
                self._corrupt(f"{name} is {'missing' if actual is None else f'{actual} bytes'}, expected {size}")
        self._offsets = offsets

    def _corrupt(self, why: str) -> NoReturn:
        raise GemmatuneError(f"{self.path}: the example store is truncated or corrupt: {why}; {_REBUILD}.")

    def __len__(self) -> int:
        return self.count

    def lengths(self) -> np.ndarray:
        """Slots per example (tokens - 1), int64 [n]."""
        return np.diff(self._offsets) - 1

    def __getitem__(self, i: int) -> Example:
        return self.get_many([i])[0]

    def get_many(self, indices: Sequence[int] | np.ndarray) -> list[Example]:
        """The examples at `indices`, in that order. The files are read in index order with one read per run of
        consecutive indices, so an in-order validation group is a single sequential read."""
        wanted = np.asarray(indices, dtype=np.int64)  # [k]
        if wanted.size and (wanted.min() < 0 or wanted.max() >= self.count):
            raise IndexError(f"example index out of range [0, {self.count}): {wanted.min()}..{wanted.max()}")
        unique = np.unique(wanted)  # [u], sorted
        runs = np.split(unique, np.flatnonzero(np.diff(unique) != 1) + 1)
        found: dict[int, Example] = {}
        with (open(self.path / TOKENS, "rb", buffering=0) as ftok, open(self.path / MASK, "rb", buffering=0) as fmask,
              open(self.path / TRUNCATED, "rb", buffering=0) as fflag):
            for run in runs:
                if not run.size:
                    continue
                first, stop = int(run[0]), int(run[-1]) + 1
                begin, end = int(self._offsets[first]), int(self._offsets[stop])
                tokens = self._read(ftok, TOKENS, begin, end - begin, _TOKEN)  # [end - begin]
                mask = self._read(fmask, MASK, begin, end - begin, np.dtype(np.uint8)).view(bool)
                flags = self._read(fflag, TRUNCATED, first, stop - first, np.dtype(np.uint8))  # [stop - first]
                for i in range(first, stop):
                    a, b = int(self._offsets[i]) - begin, int(self._offsets[i + 1]) - begin
                    found[i] = Example(tokens[a:b], mask[a:b], bool(flags[i - first]))
        return [found[i] for i in wanted.tolist()]

    def _read(self, f: Any, name: str, start: int, count: int, dtype: np.dtype) -> np.ndarray:
        return read_items(f, start, count, dtype, lambda: self._corrupt(f"{name} ended early"))


def read_items(f: Any, start: int, count: int, dtype: np.dtype, ended: Callable[[], NoReturn]) -> np.ndarray:
    """count items of dtype from item `start` of the open binary file f, into a fresh array [count] (seek +
    readinto: no memory map, see the module's docstring); ended() raises when the file is shorter."""
    out = np.empty(count, dtype)
    view, done = memoryview(out).cast("B"), 0
    f.seek(start * dtype.itemsize)
    while done < len(view):  # one read() returns at most ~2 GB on Linux
        got = f.readinto(view[done:])
        if not got:
            ended()
        done += got
    return out


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) example indices, each sorted, disjoint, together range(n). The validation set is a seeded
    random round(n * val_fraction) examples: at least 1 when val_fraction > 0 and n >= 2, and never all of them."""
    k = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        k = min(max(k, 1), n - 1)
    chosen = np.random.default_rng([_seed(seed), 2]).permutation(n)  # [n]; stream 2: see _seed
    return np.sort(chosen[k:]), np.sort(chosen[:k])


def _seed(seed: int) -> int:
    """SeedSequence wants non-negative entropy; our streams are [seed, purpose, ...] with purpose 0 = epoch
    permutation, 1 = row order within a group, 2 = validation split."""
    return seed % 2**64


Batch = dict[str, Any]  # the build_rows arrays, each [batch_size, seq_len], and "epoch": int


class TeacherArrays(Protocol):
    """Per-position arrays of a teacher aligned with the rows build_rows builds (data.teacher_cache.TeacherCache):
    arrays(store, indices, examples, rows, seq_len) -> {name: [len(rows), seq_len, ...]}, examples[i] being example
    indices[i] of the store and rows as build_rows takes them."""

    def arrays(self, store: ExampleStore, indices: np.ndarray, examples: Sequence[Example],
               rows: Sequence[Sequence[int]], seq_len: int) -> dict[str, np.ndarray]: ...


class BatchIterator(Iterator[Batch]):
    """Batches of packed rows from `store` restricted to `indices`.

    shuffle=True (training): endless. Epoch e permutes `indices` with seed (seed, e), cuts the permutation into
    groups of `shuffle_buffer` examples, packs each group (best-fit decreasing, or one example per row for
    packing="pad") and visits its rows in an order seeded by (seed, e, group). Rows flow across group and epoch
    boundaries into batches of batch_size rows; "epoch" is the epoch of a batch's first row. Only one group's
    examples are in memory at a time.
    shuffle=False (validation): `indices` in order, one pass, same packing; the last batch is topped up with
    all-padding rows (weight 0) so every batch has the same shape, then the iterator stops.

    `state()` is the position (epoch, group, row within the group's order) plus what determines the row stream;
    BatchIterator(..., state=s) continues exactly where the saved one was. batch_size is not part of the
    fingerprint: the position is counted in rows, so a different batch size resumes at the same row.

    `take` (several processes): the positions within each batch that this process needs, in order; only their
    examples are read, and each batch holds only those rows. Every process steps through the same batches.

    `pairs` (preference data, see the module's docstring): `indices` are still example indices, every pair's two
    (Split.indices as prepare() gives them); "example" above then reads "pair", shuffle_buffer included.

    `teacher` (distillation from a data.teacher_cache.TeacherCache): each batch also holds its arrays for the same
    rows, "teacher_ids" int32 and "teacher_logprobs" float32 [batch_size, seq_len, k], aligned with "targets"."""

    def __init__(self, store: ExampleStore, indices: Sequence[int] | np.ndarray, *, seq_len: int, batch_size: int,
                 pad_id: int, packing: str = "pack", shuffle_buffer: int, seed: int, shuffle: bool = True,
                 state: dict[str, Any] | None = None, take: Sequence[int] | None = None,
                 pairs: bool = False, teacher: TeacherArrays | None = None) -> None:
        if packing not in ("pack", "pad"):
            raise ValueError(f"packing must be 'pack' or 'pad', got {packing!r}")
        if batch_size < 1 or shuffle_buffer < 1:
            raise ValueError(f"batch_size {batch_size} and shuffle_buffer {shuffle_buffer} must be positive")
        self.store, self.indices = store, np.asarray(indices, dtype=np.int64)  # [n]
        if not self.indices.size:
            raise GemmatuneError(f"{store.path}: no examples to iterate over (the split left none).")
        self.seq_len, self.batch_size, self.pad_id = seq_len, batch_size, pad_id
        self.packing, self.shuffle_buffer, self.seed, self.shuffle = packing, shuffle_buffer, seed, shuffle
        self.teacher = teacher
        self.pairs = pairs
        lengths = store.lengths()  # [len(store)], slots per example
        # The units shuffled and packed: examples, or pairs by their chosen (even) index. _lengths: slots per unit.
        self.units = self.indices[self.indices % 2 == 0] if pairs else self.indices  # [u]
        if pairs:
            partners = np.concatenate([self.units, self.units + 1])
            if (len(self.units) * 2 != len(self.indices) or self.units.max() + 1 >= len(store)
                    or not np.array_equal(np.sort(partners), np.sort(self.indices))):
                raise ValueError("pairs=True needs the indices of whole pairs: each pair's chosen (even) index and "
                                 "its rejected partner (the next odd one)")
            self._lengths = np.zeros(len(store), np.int64)
            self._lengths[self.units] = lengths[self.units] + lengths[self.units + 1]
        else:
            self._lengths = lengths
        longest = int(self._lengths[self.units].max())
        if longest > seq_len:
            what = "pairs (chosen + rejected)" if pairs else "examples"
            raise GemmatuneError(f"{store.path}: {what} are up to {longest} positions long but seq_len is "
                                 f"{seq_len}; prepare the data again with max_seq_len {seq_len}.")
        self.groups = math.ceil(len(self.units) / shuffle_buffer)
        self.fingerprint = {
            "store": store.digest,
            "indices": hashlib.blake2b(self.indices.astype(_OFFSET).tobytes(), digest_size=8).hexdigest(),
            "seq_len": int(seq_len), "pad_id": int(pad_id), "packing": packing,
            "shuffle_buffer": int(shuffle_buffer), "seed": int(seed), "shuffle": bool(shuffle), "pairs": bool(pairs),
        }
        self.take = list(range(batch_size)) if take is None else list(take)
        if not all(0 <= t < batch_size for t in self.take):
            raise ValueError(f"take {self.take} must hold positions in [0, {batch_size})")
        self.epoch = self.group = self.row = 0
        self._group: tuple[np.ndarray, list[list[int]]] | None = None  # the current group's _plan
        self._cached: tuple[int, np.ndarray] = (-1, self.units)  # (epoch, its order); see _order
        if state is not None:
            self.restore(state)

    def _order(self, epoch: int) -> np.ndarray:
        """The epoch's unit order [u], kept for the epoch's other groups (a permutation costs O(u))."""
        if self._cached[0] != epoch:
            order = self.units
            if self.shuffle:
                order = order[np.random.default_rng([_seed(self.seed), 0, epoch]).permutation(len(order))]
            self._cached = (epoch, order)
        return self._cached[1]

    def _plan(self, epoch: int, group: int) -> tuple[np.ndarray, list[list[int]]]:
        """A group's units [g] (store indices; a pair's chosen) and its rows (indices into them), in visiting
        order."""
        members = self._order(epoch)[group * self.shuffle_buffer:(group + 1) * self.shuffle_buffer]  # [g]
        sizes = self._lengths[members]  # [g]
        rows = assign_rows(sizes, self.seq_len) if self.packing == "pack" else pad_rows(sizes)
        if self.shuffle:
            visit = np.random.default_rng([_seed(self.seed), 1, epoch, group]).permutation(len(rows))
            rows = [rows[r] for r in visit.tolist()]
        return members, rows

    def row_plan(self, epoch: int = 0) -> list[np.ndarray]:
        """Epoch `epoch`'s rows in the order batches take them, each as the store indices of its examples in
        their places left to right: exactly what the batches hold (from the lengths alone, nothing is read)."""
        rows: list[np.ndarray] = []
        for g in range(self.groups):
            members, plan = self._plan(epoch, g)
            rows += [self._examples(members[r]) for r in plan]
        return rows

    def _examples(self, units: np.ndarray) -> np.ndarray:
        """The store indices of `units`' examples in their places in a row: each pair's chosen, then its rejected."""
        return np.stack([units, units + 1], axis=1).reshape(-1) if self.pairs else units

    def epoch_rows(self, epoch: int = 0) -> int:
        """Rows in epoch `epoch` (from the lengths alone, nothing is read). Packing depends on which examples share
        a group, so with shuffling this can differ by a row or so per group from epoch to epoch."""
        return sum(len(self._plan(epoch, g)[1]) for g in range(self.groups))

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Batch:
        rows: list[np.ndarray] = []  # the batch's rows, each as the store indices of its examples
        first_epoch = self.epoch
        while len(rows) < self.batch_size and (self.shuffle or self.epoch == 0):
            if self._group is None:
                self._group = self._plan(self.epoch, self.group)
            members, plan = self._group
            available = len(plan) - self.row
            take = min(self.batch_size - len(rows), available)
            rows += [self._examples(members[r]) for r in plan[self.row:self.row + take]]
            self.row += take
            if take == available:  # the group is used up: the position moves on now, so state() is canonical
                self._group, self.row, self.group = None, 0, self.group + 1
                if self.group == self.groups:
                    self.epoch, self.group = self.epoch + 1, 0
        if not rows:
            raise StopIteration
        # The end of a validation pass is topped up with all-padding rows; then only the wanted rows are read.
        rows += [np.zeros(0, np.int64)] * (self.batch_size - len(rows))
        wanted = [rows[t] for t in self.take]
        needed = np.unique(np.concatenate(wanted))  # store indices, sorted
        where = {int(i): j for j, i in enumerate(needed)}
        examples, placed = self.store.get_many(needed), [[where[int(i)] for i in row] for row in wanted]
        batch: Batch = build_rows(examples, placed, self.seq_len, self.pad_id)  # each [len(take), seq_len]
        if self.teacher is not None:
            batch.update(self.teacher.arrays(self.store, needed, examples, placed, self.seq_len))
        batch["epoch"] = first_epoch
        return batch

    def state(self) -> dict[str, Any]:
        """The position and fingerprint, small and JSON-serialisable, for checkpoints."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "group": self.group, "row": self.row,
                "fingerprint": dict(self.fingerprint)}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a `state()`; the data and the settings that determine the row stream must be unchanged."""
        try:
            version, saved = state["version"], dict(state["fingerprint"])
            saved.setdefault("pairs", False)  # states saved before pairs existed
            epoch, group, row = int(state["epoch"]), int(state["group"]), int(state["row"])
        except (KeyError, TypeError, ValueError):
            raise GemmatuneError("the checkpoint's data iterator state is malformed; start a fresh run.") from None
        if version != STATE_VERSION:
            raise GemmatuneError(f"the checkpoint's data iterator state has version {version}, this gemmatune "
                                 f"writes {STATE_VERSION}; start a fresh run.")
        changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in self.fingerprint.items() if saved.get(k) != v]
        if changed:
            raise GemmatuneError("the data or data settings changed since the checkpoint (" + "; ".join(changed) +
                                 "), so the data stream cannot resume where it stopped. Restore the original data "
                                 "and data settings, or start a fresh run.")
        if not (epoch >= 0 and 0 <= group < self.groups and 0 <= row < len(self._plan(epoch, group)[1])):
            raise GemmatuneError(f"the checkpoint's data iterator position (epoch {epoch}, group {group}, row {row})"
                                 " is out of range; start a fresh run.")
        self.epoch, self.group, self.row, self._group = epoch, group, row, None
