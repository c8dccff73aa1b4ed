"""The teacher's top-k next-token log-probabilities, computed once to disk (`--teacher-cache DIR`), for
distilling from a teacher too large to share the devices with the student.

For every example of each example store it covers and every trained target position of the example (mask[1:]
true; nothing is stored for the others), the teacher's top k token ids and their log-probabilities at temperature
tau (teacher.teacher_topk: restricted to and normalised over the first `vocab` ids). Layout of DIR:
  meta.json                      what the cache was computed from (below), and each store's part boundaries
  <store digest>/offsets.npy     int64 [n + 1]: example i's records are records[offsets[i]:offsets[i + 1]]
  <store digest>/part-00000.bin  the records of examples bounds[j]..bounds[j + 1] - 1, in example then position
                                 order; a record is k int32 ids (little-endian) then their k float32 log-probs
meta.json records the teacher (its path, a digest of its configuration, and the size and modification time of
each file of its checkpoint), kd_topk, kd_temperature, vocab, dtype, the quantization and each store's digest: a
cache that disagrees with a run on any of them is refused, never computed over.

DIR appears with meta.json and the offsets at once (atomic.staged_dir); each part is written to a hidden sibling
and renamed into place when complete (atomic.staged_file), so a killed build leaves whole parts, and the next
build computes only the missing ones. A part is packed and computed on its own, in the same batches whether the
build ran through or resumed, so a resumed cache has the same bytes as an uninterrupted one.

Records are read with seek + readinto, by example, as ExampleStore reads examples (never a memory map: mapped pages
count in the process's RSS).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from gemmatune import distributed, sharding
from gemmatune.atomic import remove_leftovers, staged_dir, staged_file
from gemmatune.config import ModelConfig, Quantization
from gemmatune.convert import load_model, model_config
from gemmatune.data.loader import ExampleStore, read_items
from gemmatune.data.packing import assign_rows, build_rows
from gemmatune.data.records import Example
from gemmatune.errors import GemmatuneError
from gemmatune.teacher import teacher_topk

FORMAT, VERSION = "gemmatune-teacher-cache", 1
META, OFFSETS = "meta.json", "offsets.npy"
PART_BYTES = 64 << 20  # a part's records; what a killed build loses at most, and what the build holds in memory
_OFFSET = np.dtype("<i8")
_DELETE = "delete the directory to compute it again"


def record_dtype(k: int) -> np.dtype:
    """One trained position's record on disk: k ids, then their k log-probabilities."""
    return np.dtype([("ids", "<i4", (k,)), ("logprobs", "<f4", (k,))])


def part_name(j: int) -> str:
    return f"part-{j:05d}.bin"


# --- what a cache is computed from ------------------------------------------------------------------------------

def teacher_identity(teacher_dir: str | Path, cfg: ModelConfig | None = None) -> dict[str, Any]:
    """The teacher as meta.json records it: its path, a digest of its configuration (cfg, or read from the
    checkpoint), and [size, mtime_ns] of each file of the checkpoint (a directory's top-level files, or the GGUF
    file), so that retrained weights of the same shapes count as another teacher."""
    path = Path(teacher_dir).resolve()
    cfg = cfg or model_config(path)
    text = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    stats = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}
    return {"path": str(path), "config": hashlib.blake2b(text.encode(), digest_size=16).hexdigest(), "files": stats}


def trained_offsets(store: ExampleStore, *, max_tokens: int = 1 << 22) -> np.ndarray:
    """int64 [n + 1]: the cumulative count of trained target positions (mask[1:]) of the store's examples, read
    in runs of at most about max_tokens tokens (bounded memory)."""
    ends = np.cumsum(store.lengths() + 1)  # [n] tokens up to and including each example
    counts = np.zeros(len(store), np.int64)
    start = 0
    while start < len(store):
        before = int(ends[start - 1]) if start else 0
        stop = min(max(start + 1, int(np.searchsorted(ends, before + max_tokens, side="right"))), len(store))
        for i, ex in enumerate(store.get_many(np.arange(start, stop)), start):
            counts[i] = np.count_nonzero(ex.mask[1:])
        start = stop
    return np.concatenate([[0], np.cumsum(counts)]).astype(_OFFSET)


def part_bounds(offsets: np.ndarray, per_part: int) -> list[int]:
    """Example boundaries [0, ..., n] of parts that each hold at least per_part records (the last one fewer), cut at
    the first example that reaches it: a part exceeds per_part by less than one example's records."""
    n = len(offsets) - 1
    bounds = [0]
    while bounds[-1] < n:
        cut = int(np.searchsorted(offsets, offsets[bounds[-1]] + per_part, side="left"))
        bounds.append(min(max(cut, bounds[-1] + 1), n))
    return bounds


def _quant(quant: Quantization | None) -> dict[str, Any] | None:
    return None if quant is None else {"kind": quant.kind, "block": quant.block, "double": quant.double}


def _mismatch(meta: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """What differs between a cache's meta.json and the meta this run would write, named by the run's settings."""
    changed = []
    old, new = meta.get("teacher", {}), want["teacher"]
    if old.get("config") != new["config"]:
        changed.append(f"teacher {old.get('path')} -> {new['path']} (another model configuration)")
    elif old.get("files") != new["files"]:
        changed.append(f"teacher {new['path']}: its files changed since (sizes or modification times; was "
                       f"{old.get('path')})")
    for key, name in (("k", "kd_topk"), ("temperature", "kd_temperature"), ("vocab", "vocab (the ids teacher and "
                      "student share)"), ("dtype", "dtype"), ("quantization", "quantize")):
        if meta.get(key) != want[key]:
            changed.append(f"{name} {meta.get(key)!r} -> {want[key]!r}")
    digests = sorted(s.get("digest") for s in meta.get("stores", []))
    if digests != sorted(s["digest"] for s in want["stores"]):
        changed.append(f"data (example store digests {', '.join(map(str, digests))} -> "
                       f"{', '.join(sorted(s['digest'] for s in want['stores']))})")
    return changed


# --- reading ------------------------------------------------------------------------------------------------------

class _Covered:
    """One store's records in a cache: its directory, its examples' record offsets and its parts."""

    def __init__(self, root: Path, entry: dict[str, Any], record: np.dtype, corrupt: Any) -> None:
        self.digest, self.count, self.positions = str(entry["digest"]), int(entry["examples"]), int(entry["positions"])
        self.dir, self.record = root / self.digest, record
        self.bounds = np.asarray(entry["parts"], _OFFSET)  # [p + 1] example boundaries
        try:
            offsets = np.load(self.dir / OFFSETS, allow_pickle=False)  # [count + 1]
        except (OSError, ValueError) as e:
            corrupt(f"{self.dir / OFFSETS} cannot be read ({e})")
        if offsets.dtype != _OFFSET or offsets.shape != (self.count + 1,) or offsets[-1] != self.positions or \
                offsets[0] != 0 or np.any(np.diff(offsets) < 0):
            corrupt(f"{self.dir / OFFSETS} is inconsistent with {META}")
        if self.bounds.size < 1 or self.bounds[0] != 0 or self.bounds[-1] != self.count or \
                np.any(np.diff(self.bounds) < 1):
            corrupt(f"the part boundaries of store {self.digest} in {META} are inconsistent")
        self.offsets = offsets
        self.starts = offsets[self.bounds]  # [p + 1] the first record of each part

    @property
    def parts(self) -> int:
        return len(self.bounds) - 1

    def part_path(self, j: int) -> Path:
        return self.dir / part_name(j)

    def part_size(self, j: int) -> int:
        return int(self.starts[j + 1] - self.starts[j]) * self.record.itemsize

    def problem(self, j: int) -> str | None:
        """Why part j is not usable (missing, or of the wrong size), or None when it is complete."""
        path = self.part_path(j)
        if not path.is_file():
            return "missing"
        size = path.stat().st_size
        return None if size == self.part_size(j) else f"{size} bytes, expected {self.part_size(j)}"


class TeacherCache:
    """A complete cache (see the module docstring): the records of the stores it covers, by example."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_path = self.path / META
        if not meta_path.is_file():
            raise GemmatuneError(f"{self.path}: not a teacher cache (no {META} in it).")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            ok = meta.get("format") == FORMAT and isinstance(meta.get("k"), int) and \
                isinstance(meta.get("stores"), list)
        except (ValueError, AttributeError):
            ok = False
        if not ok:
            self._corrupt(f"{META} is not a teacher cache's metadata")
        if meta.get("version") != VERSION:
            raise GemmatuneError(f"{self.path}: teacher cache format version {meta.get('version')}, but this "
                                 f"gemmatune reads version {VERSION}; {_DELETE}.")
        self.meta = meta
        self.k, self.temperature, self.vocab = int(meta["k"]), float(meta["temperature"]), int(meta["vocab"])
        self.record = record_dtype(self.k)
        try:
            covered = [_Covered(self.path, s, self.record, self._corrupt) for s in meta["stores"]]
        except (KeyError, TypeError, ValueError) as e:
            self._corrupt(f"{META} is malformed ({e!r})")
        self._stores = {c.digest: c for c in covered}

    def _corrupt(self, why: str) -> NoReturn:
        raise GemmatuneError(f"{self.path}: the teacher cache is corrupt: {why}; {_DELETE}.")

    def check_complete(self) -> None:
        """Refuse a cache with a part missing or of the wrong size (a build that has not finished)."""
        for c in self._stores.values():
            for j in range(c.parts):
                if (why := c.problem(j)) is not None:
                    raise GemmatuneError(f"{c.part_path(j)}: {why}: the teacher cache is incomplete; run the "
                                         "same command again to finish it.")

    def covered(self, store: ExampleStore) -> _Covered:
        found = self._stores.get(store.digest)
        if found is None or found.count != len(store):
            raise GemmatuneError(f"{self.path}: the teacher cache does not cover the example store {store.path} "
                                 f"(digest {store.digest}); pass another --teacher-cache directory, or {_DELETE}.")
        return found

    def get_many(self, store: ExampleStore, indices: Sequence[int] | np.ndarray
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each example of `store` at `indices`, in that order: (ids int32 [n, k], log-probs float32 [n, k]),
        n its trained target positions in order. One read per run of consecutive indices within a part."""
        c = self.covered(store)
        wanted = np.asarray(indices, dtype=np.int64)  # [m]
        if wanted.size and (wanted.min() < 0 or wanted.max() >= c.count):
            raise IndexError(f"example index out of range [0, {c.count}): {wanted.min()}..{wanted.max()}")
        unique = np.unique(wanted)
        part_of = np.searchsorted(c.bounds, unique, side="right") - 1  # [u]
        # Runs of consecutive indices within one part: each run is one contiguous range of one file.
        cuts = np.flatnonzero((np.diff(unique) != 1) | (np.diff(part_of) != 0)) + 1
        found: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        with contextlib.ExitStack() as files:
            opened: dict[int, Any] = {}  # part -> its file, each opened once per call
            for run in np.split(unique, cuts):
                if not run.size:
                    continue
                first, stop = int(run[0]), int(run[-1]) + 1
                j = int(np.searchsorted(c.bounds, first, side="right") - 1)
                if j not in opened:
                    try:
                        opened[j] = files.enter_context(open(c.part_path(j), "rb", buffering=0))
                    except FileNotFoundError:
                        self._corrupt(f"{c.part_path(j)} is missing")
                begin, end = int(c.offsets[first]), int(c.offsets[stop])
                records = self._read(opened[j], c.part_path(j), begin - int(c.starts[j]), end - begin)
                for i in range(first, stop):
                    a, b = int(c.offsets[i]) - begin, int(c.offsets[i + 1]) - begin
                    found[i] = (records["ids"][a:b], records["logprobs"][a:b])
        return [found[i] for i in wanted.tolist()]

    def _read(self, f: Any, path: Path, start: int, count: int) -> np.ndarray:
        """count records from record `start` of the open part file f: [count]."""
        return read_items(f, start, count, self.record, lambda: self._corrupt(f"{path} ended early"))

    def arrays(self, store: ExampleStore, indices: Sequence[int] | np.ndarray, examples: Sequence[Example],
               rows: Sequence[Sequence[int]], seq_len: int) -> dict[str, np.ndarray]:
        """The teacher's arrays of the rows that data.packing.build_rows(examples, rows, seq_len, ...) builds, where
        examples[i] is example indices[i] of store: "teacher_ids" int32 and "teacher_logprobs" float32, each
        [len(rows), seq_len, k]; [r, t] is the teacher's top k for predicting targets[r, t]. Positions that are not
        trained (weight 0) and padding hold id 0 and log-prob 0.0."""
        records = self.get_many(store, indices)
        ids = np.zeros((len(rows), seq_len, self.k), np.int32)
        logprobs = np.zeros((len(rows), seq_len, self.k), np.float32)
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                ex = examples[i]
                where = start + np.flatnonzero(ex.mask[1:])  # the row slots of the example's trained targets
                if len(where) != len(records[i][0]):
                    self._corrupt(f"example {int(np.asarray(indices)[i])} of {store.path} has {len(where)} trained "
                                  f"positions but {len(records[i][0])} records")
                ids[r, where], logprobs[r, where] = records[i]
                start += ex.slots
        return {"teacher_ids": ids, "teacher_logprobs": logprobs}


# --- building -----------------------------------------------------------------------------------------------------

def _unique_stores(stores: Sequence[ExampleStore]) -> list[ExampleStore]:
    """The stores by digest, first of each: a validation split of the training store is the same store."""
    seen: dict[str, ExampleStore] = {}
    for s in stores:
        seen.setdefault(s.digest, s)
    return list(seen.values())


def _create(path: Path, want: dict[str, Any], offsets: list[np.ndarray]) -> None:
    """DIR with meta.json and every store's offsets, appearing at once."""
    with staged_dir(path) as staged:
        for entry, off in zip(want["stores"], offsets):
            (staged / entry["digest"]).mkdir()
            with open(staged / entry["digest"] / OFFSETS, "wb") as f:
                np.save(f, off, allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())  # commit_dir fsyncs the staged directory's own entries, not files below them
        (staged / META).write_text(json.dumps(want, indent=1) + "\n", encoding="utf-8")


def _plan(path: Path, want: dict[str, Any], stores: list[ExampleStore], per_part: int,
          log: TextIO) -> np.ndarray:
    """Check or create DIR (process 0); the parts still to compute as rows [store, part, first, stop]."""
    if path.exists() and not path.is_dir():
        raise GemmatuneError(f"{path}: exists and is not a directory; pass another --teacher-cache directory.")
    if (path / META).is_file():
        try:
            meta = json.loads((path / META).read_text(encoding="utf-8"))
        except ValueError:
            meta = None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise GemmatuneError(f"{path}: {META} is not a teacher cache's metadata; {_DELETE}, or pass another "
                                 "--teacher-cache directory.")
        if meta.get("version") != VERSION:
            raise GemmatuneError(f"{path}: teacher cache format version {meta.get('version')}, but this gemmatune "
                                 f"writes version {VERSION}; {_DELETE}, or pass another --teacher-cache directory.")
        changed = _mismatch(meta, want)
        if changed:
            raise GemmatuneError(f"{path}: the teacher cache was computed for another run: {'; '.join(changed)}. "
                                 f"Pass another --teacher-cache directory, or delete {path} to compute it again.")
    elif path.is_dir() and any(path.iterdir()):
        raise GemmatuneError(f"{path}: exists, is not empty and is not a teacher cache (no {META}); refusing to "
                             "write into it. Pass a new or empty --teacher-cache directory.")
    else:
        offsets = [trained_offsets(s) for s in stores]
        for entry, off in zip(want["stores"], offsets):
            entry["positions"], entry["parts"] = int(off[-1]), part_bounds(off, per_part)
        _create(path, want, offsets)
    cache = TeacherCache(path)
    todo = []
    for s, store in enumerate(stores):
        c = cache.covered(store)
        remove_leftovers(c.dir)  # what a killed build left: a part's hidden staging file
        for j in range(c.parts):
            why = c.problem(j)
            if why is not None and why != "missing":
                print(f"teacher cache: {c.part_path(j)} is {why}: computing it again", file=log)
            if why is not None:
                todo.append((s, j, int(c.bounds[j]), int(c.bounds[j + 1])))
    return np.asarray(todo, np.int64).reshape(-1, 4)


def _broadcast_plan(plan: np.ndarray | None) -> np.ndarray | None:
    """Process 0's plan (None: it refused the cache) to every process; the other processes pass None."""
    if jax.process_count() == 1:
        return plan
    from jax.experimental import multihost_utils

    n = int(multihost_utils.broadcast_one_to_all(np.int64(-1 if plan is None else len(plan))))
    if n <= 0:
        return None if n < 0 else np.zeros((0, 4), np.int64)
    return np.asarray(multihost_utils.broadcast_one_to_all(plan if plan is not None else np.zeros((n, 4), np.int64)))


def _compute_part(fn: Any, place: Any, store: ExampleStore, first: int, stop: int, k: int, *, batch_size: int,
                  seq_len: int, pad_id: int) -> np.ndarray:
    """The records of examples first..stop - 1 of store: they are packed into rows (best-fit decreasing, as
    training packs), run through the teacher batch_size rows at a time, and gathered back by example."""
    examples = store.get_many(np.arange(first, stop))
    counts = np.array([np.count_nonzero(ex.mask[1:]) for ex in examples], np.int64)  # [m] records per example
    starts = np.concatenate([[0], np.cumsum(counts)])  # [m + 1]
    out = np.zeros(int(starts[-1]), record_dtype(k))
    kept = np.flatnonzero(counts)  # examples without a trained target need no teacher
    longest = max((examples[i].slots for i in kept), default=0)
    if longest > seq_len:
        raise GemmatuneError(f"{store.path}: examples are up to {longest} positions long but the teacher cache is "
                             f"computed with seq_len {seq_len}; prepare the data with max_seq_len {seq_len}.")
    rows = [[int(kept[i]) for i in row] for row in assign_rows([examples[i].slots for i in kept], seq_len)]
    rows += [[]] * (-len(rows) % batch_size)  # all-padding rows: every batch has one shape (one compilation)
    for b in range(0, len(rows), batch_size):
        batch_rows = rows[b:b + batch_size]
        arrays = build_rows(examples, batch_rows, seq_len, pad_id)  # each [batch_size, seq_len]
        ids, logprobs = fn(place(arrays["inputs"]), place(arrays["positions"]), place(arrays["segment_ids"]))
        ids, logprobs = np.asarray(sharding.to_host(ids)), np.asarray(sharding.to_host(logprobs))  # [B, T, k]
        for r, row in enumerate(batch_rows):
            slot = 0
            for i in row:
                where = slot + np.flatnonzero(examples[i].mask[1:])
                out["ids"][starts[i]:starts[i + 1]] = ids[r, where]
                out["logprobs"][starts[i]:starts[i + 1]] = logprobs[r, where]
                slot += examples[i].slots
    return out


@functools.lru_cache(maxsize=4)
def _topk_step(cfg: ModelConfig, mesh: Mesh | None, k: int, temperature: float, vocab: int, chunk: int
               ) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """The jitted teacher_topk(params, inputs, positions, segment_ids), kept across builds of one process (a
    resumed or repaired build in the same process compiles nothing again)."""
    def run(params: Any, inputs: jax.Array, positions: jax.Array, segment_ids: jax.Array
            ) -> tuple[jax.Array, jax.Array]:
        with sharding.active(mesh):
            return teacher_topk(params, {"inputs": inputs, "positions": positions, "segment_ids": segment_ids},
                                cfg, k=k, temperature=temperature, vocab=vocab, chunk=chunk)

    return jax.jit(run)


def _write_part(path: Path, records: np.ndarray) -> None:
    with staged_file(path, force=True) as staged, open(staged, "wb") as f:
        f.write(records.tobytes())


def ensure_cache(path: str | Path, teacher_dir: str | Path, stores: Sequence[ExampleStore], *, k: int,
                 temperature: float, vocab: int, dtype: str = "bfloat16", quant: Quantization | None = None,
                 mesh: Mesh | None = None, batch_size: int, seq_len: int, pad_id: int, chunk: int = 1024,
                 part_bytes: int = PART_BYTES, log: TextIO | None = None) -> TeacherCache:
    """The teacher cache at `path` for `stores` (every example of each; several stores, or one store listed twice,
    are fine), computed where parts are missing and returned complete.

    A new or empty directory is created; a cache of the same teacher, settings and data resumes (only its missing
    parts are computed; a complete one loads no teacher); a cache computed from anything else is refused with one
    GemmatuneError naming what differs. The teacher is loaded only when a part is missing
    (convert.load_model(teacher_dir, dtype, mesh=mesh, quant=quant)), runs batch_size rows of seq_len positions at a
    time (each batch split over `mesh` like a training batch; batch_size must divide among its data axes), and is
    freed before returning. Progress goes to `log` (stderr).

    Several processes: every process calls this with the same arguments and computes on the mesh; process 0 alone
    checks, creates and writes DIR, which must be on a filesystem every process sees (each reads its rows' records
    from it during training)."""
    log = log or sys.stderr
    path = Path(path)
    if not 1 <= k <= vocab:
        raise GemmatuneError(f"kd_topk {k} must lie in [1, {vocab}] (the vocabulary teacher and student share).")
    if not temperature > 0:
        raise GemmatuneError(f"kd_temperature {temperature} must be positive.")
    stores = _unique_stores(stores)
    cfg = model_config(teacher_dir)
    if vocab > cfg.vocab_size:
        raise GemmatuneError(f"{teacher_dir}: the teacher has {cfg.vocab_size} embedding rows, fewer than the "
                             f"{vocab} ids to distil; teacher and student must share the tokenizer.")
    teacher = teacher_identity(teacher_dir, cfg)
    want = {"format": FORMAT, "version": VERSION, "teacher": teacher, "k": int(k), "temperature": float(temperature),
            "vocab": int(vocab), "dtype": dtype, "quantization": _quant(quant),
            "stores": [{"digest": s.digest, "examples": len(s)} for s in stores]}
    plan = None
    if jax.process_index() == 0:
        try:
            plan = _plan(path, want, stores, max(1, part_bytes // record_dtype(k).itemsize), log)
        except BaseException:
            if jax.process_count() > 1:
                _broadcast_plan(None)  # the other processes refuse too, instead of waiting for process 0
            raise
    plan = _broadcast_plan(plan)
    if plan is None:  # another process, when process 0 refused
        raise GemmatuneError(f"{path}: process 0 refused the teacher cache (see its message).")
    if len(plan):
        _build(path, teacher_dir, stores, plan, k=k, temperature=temperature, vocab=vocab, dtype=dtype, quant=quant,
               mesh=mesh, batch_size=batch_size, seq_len=seq_len, pad_id=pad_id, chunk=chunk, log=log)
    distributed.barrier("teacher-cache")
    if not (path / META).is_file():
        raise GemmatuneError(f"{path}: the teacher cache is not visible to process {jax.process_index()}; "
                             "--teacher-cache must be a directory every process sees (a shared filesystem).")
    cache = TeacherCache(path)
    cache.check_complete()
    return cache


def _build(path: Path, teacher_dir: str | Path, stores: list[ExampleStore], plan: np.ndarray, *, k: int,
           temperature: float, vocab: int, dtype: str, quant: Quantization | None, mesh: Mesh | None,
           batch_size: int, seq_len: int, pad_id: int, chunk: int, log: TextIO) -> None:
    started = time.perf_counter()
    print(f"teacher cache {path}: computing {len(plan)} part(s) with the teacher {teacher_dir}", file=log)
    cfg, params = load_model(teacher_dir, dtype=dtype, mesh=mesh, quant=quant)
    if mesh is not None:
        sharding.check_batch(mesh, batch_size)
        rows = NamedSharding(mesh, sharding.spec(sharding.BATCH, (batch_size, seq_len), mesh.shape))

        def place(a: np.ndarray) -> jax.Array:
            return sharding.place(a, rows)
    else:
        place = jnp.asarray

    step = _topk_step(cfg, mesh, k, temperature, vocab, chunk)
    main = jax.process_index() == 0
    try:
        for n, (s, j, first, stop) in enumerate(plan.tolist(), 1):
            t = time.perf_counter()
            records = _compute_part(lambda *a: step(params, *a), place, stores[s], first, stop, k,
                                    batch_size=batch_size, seq_len=seq_len, pad_id=pad_id)
            if main:
                _write_part(path / stores[s].digest / part_name(j), records)
            print(f"teacher cache: part {n}/{len(plan)} ({len(records)} positions of examples {first}..{stop - 1} "
                  f"of {stores[s].path}) in {time.perf_counter() - t:.1f}s", file=log)
    finally:
        for leaf in jax.tree.leaves(params):  # free the teacher's device memory now, before the student loads
            if isinstance(leaf, jax.Array):
                leaf.delete()
    print(f"teacher cache {path}: done in {time.perf_counter() - started:.1f}s", file=log)
