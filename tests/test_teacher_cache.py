"""The teacher cache (data.teacher_cache) on the embedded tiny model: its records equal a direct computation per
example; an interrupted build resumes to the same bytes; a damaged part is computed again; a complete cache loads
no teacher; a cache of another run is refused; and BatchIterator's teacher arrays line up with the targets."""

from __future__ import annotations

import filecmp
import io
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemmatune.convert import load_model
from gemmatune.data import teacher_cache
from gemmatune.data.loader import BatchIterator, ExampleStore, StoreWriter
from gemmatune.data.records import Example
from gemmatune.data.teacher_cache import TeacherCache, ensure_cache, record_dtype
from gemmatune.errors import GemmatuneError
from gemmatune.hub import resolve_model
from gemmatune.model import forward

SEQ_LEN, K, TAU, VOCAB = 32, 8, 2.0, 4000  # VOCAB: fewer ids than the tiny model's 4096 rows
# 24 records per part: 3 parts or more of the 10 examples
SETTINGS = {"k": K, "temperature": TAU, "vocab": VOCAB, "dtype": "float32", "batch_size": 2, "seq_len": SEQ_LEN,
            "pad_id": 0, "chunk": 16, "part_bytes": 24 * record_dtype(K).itemsize}


def write_examples(path: Path, n: int, seed: int) -> ExampleStore:
    """n examples of 4..20 tokens: <bos>, random tokens, an untrained prompt of 1..4 tokens before the trained
    rest; example 3 has no trained token at all."""
    rng = np.random.default_rng(seed)
    with StoreWriter(path) as w:
        for i in range(n):
            size = int(rng.integers(4, 21))
            tokens = np.concatenate([[2], rng.integers(3, 4096, size - 1)]).astype(np.int32)
            mask = np.arange(size) > int(rng.integers(1, 5))
            w.append(Example(tokens, mask & (i != 3)))
    return ExampleStore(path)


@pytest.fixture(scope="module")
def tiny() -> Path:
    return resolve_model("tiny")


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny) -> tuple[ExampleStore, Path]:
    """A store of 10 examples and its cache, built in one go."""
    root = tmp_path_factory.mktemp("tcache")
    store = write_examples(root / "train", 10, seed=0)
    ensure_cache(root / "cache", tiny, [store, store], log=io.StringIO(), **SETTINGS)
    return store, root / "cache"


def test_records_equal_direct_computation(built, tiny):
    store, path = built
    cache = TeacherCache(path)
    assert (cache.k, cache.temperature, cache.vocab) == (K, TAU, VOCAB)
    assert len(list((path / store.digest).glob("part-*.bin"))) >= 3
    cfg, params = load_model(tiny, "float32")
    # Each example alone in a row of SEQ_LEN slots: one compilation for all of them.
    logits_of = jax.jit(lambda tokens, segments: forward(params, tokens, cfg, segment_ids=segments))
    got = cache.get_many(store, np.arange(len(store))[::-1])[::-1]  # out of order: a read per example
    for i, ex in enumerate(store.get_many(np.arange(len(store)))):
        n = ex.slots
        tokens = np.zeros((1, SEQ_LEN), np.int32)
        tokens[0, :n] = ex.tokens[:-1]
        logits = np.asarray(logits_of(tokens, (np.arange(SEQ_LEN) < n)[None].astype(np.int32)), np.float64)[0, :n]
        z = logits[:, :VOCAB] / TAU
        logp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
        trained = np.flatnonzero(ex.mask[1:])
        ids, lp = got[i]
        assert ids.shape == lp.shape == (len(trained), K) and ids.dtype == np.int32 and lp.dtype == np.float32
        if i == 3:
            assert len(trained) == 0
        order = np.argsort(-logp[trained], axis=-1, kind="stable")[:, :K]
        np.testing.assert_array_equal(ids, order)
        np.testing.assert_allclose(lp, np.take_along_axis(logp[trained], order, -1), rtol=0, atol=2e-5)


def test_reused_without_teacher_and_mismatch_refused(built, tiny, tmp_path, monkeypatch):
    store, path = built
    before = {p: p.stat().st_mtime_ns for p in path.rglob("*")}

    def no_teacher(*a, **kw):
        raise AssertionError("a complete cache must not load the teacher")

    monkeypatch.setattr(teacher_cache, "load_model", no_teacher)
    cache = ensure_cache(path, tiny, [store], log=io.StringIO(), **SETTINGS)
    assert cache.k == K and {p: p.stat().st_mtime_ns for p in path.rglob("*")} == before
    for change, named in (({"k": 4}, "kd_topk 8 -> 4"), ({"temperature": 1.0}, "kd_temperature 2.0 -> 1.0"),
                          ({"dtype": "bfloat16"}, "dtype 'float32' -> 'bfloat16'")):
        with pytest.raises(GemmatuneError, match=f"{named}.*another --teacher-cache directory, or delete"):
            ensure_cache(path, tiny, [store], log=io.StringIO(), **(SETTINGS | change))
    other = write_examples(tmp_path / "other", 4, seed=1)
    with pytest.raises(GemmatuneError, match=r"computed for another run: data \(example store digests"):
        ensure_cache(path, tiny, [other], log=io.StringIO(), **SETTINGS)
    # The teacher copied elsewhere with its files' times is the same teacher; once its weights file is rewritten
    # (another modification time), another one.
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny, teacher)
    ensure_cache(path, teacher, [store], log=io.StringIO(), **SETTINGS)
    os.utime(teacher / "model.safetensors", ns=(0, 10**18))
    with pytest.raises(GemmatuneError, match="teacher .*files changed"):
        ensure_cache(path, teacher, [store], log=io.StringIO(), **SETTINGS)
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("mine")
    with pytest.raises(GemmatuneError, match="not a teacher cache"):
        ensure_cache(tmp_path / "stuff", tiny, [store], log=io.StringIO(), **SETTINGS)
    assert {p: p.stat().st_mtime_ns for p in path.rglob("*")} == before  # nothing was written over
    with pytest.raises(GemmatuneError, match="does not cover the example store"):
        cache.get_many(other, [0])


def _same_files(a: Path, b: Path) -> None:
    names = sorted(p.relative_to(a) for p in a.rglob("*"))
    assert names == sorted(p.relative_to(b) for p in b.rglob("*"))
    for name in names:
        if (a / name).is_file():
            assert filecmp.cmp(a / name, b / name, shallow=False), name


def test_interrupted_build_resumes_to_the_same_bytes(built, tiny, tmp_path, monkeypatch):
    store, reference = built
    path = tmp_path / "cache"
    write = teacher_cache._write_part
    written = []

    def killed_after_one(part: Path, records: np.ndarray) -> None:
        if written:
            raise KeyboardInterrupt  # killed while computing the second part
        write(part, records)
        written.append(part.name)

    monkeypatch.setattr(teacher_cache, "_write_part", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        ensure_cache(path, tiny, [store], log=io.StringIO(), **SETTINGS)
    monkeypatch.setattr(teacher_cache, "_write_part", write)
    assert sorted(p.name for p in (path / store.digest).glob("part-*")) == ["part-00000.bin"]
    with pytest.raises(GemmatuneError, match="incomplete; run the same command again"):
        TeacherCache(path).check_complete()
    # A part half-written by a killed writer is left in its hidden staging file; the next build removes it.
    (path / store.digest / ".part-00001.bin.partial-99999").write_bytes(b"\0" * 10)
    log = io.StringIO()
    ensure_cache(path, tiny, [store], log=log, **SETTINGS)
    assert "computing 2 part(s)" in log.getvalue()
    _same_files(reference, path)
    # A damaged part (the wrong size) is computed again, to the same bytes.
    part = path / store.digest / "part-00001.bin"
    part.write_bytes(part.read_bytes()[:-4])
    with pytest.raises(GemmatuneError, match="part-00001.bin: .* bytes, expected"):
        TeacherCache(path).check_complete()
    log = io.StringIO()
    ensure_cache(path, tiny, [store], log=log, **SETTINGS)
    assert "part-00001.bin is" in log.getvalue() and "computing 1 part(s)" in log.getvalue()
    _same_files(reference, path)


def test_batches_carry_the_teacher_aligned_with_targets(built):
    store, path = built
    cache = TeacherCache(path)
    records = cache.get_many(store, np.arange(len(store)))
    settings = {"seq_len": SEQ_LEN, "batch_size": 3, "pad_id": 0, "shuffle_buffer": 4, "seed": 1}
    it = BatchIterator(store, np.arange(len(store)), teacher=cache, **settings)
    plan = it.row_plan(0)
    batch = next(it)
    assert batch["teacher_ids"].shape == batch["teacher_logprobs"].shape == (3, SEQ_LEN, K)
    assert batch["teacher_ids"].dtype == np.int32 and batch["teacher_logprobs"].dtype == np.float32
    # By hand: the first row's examples, left to right, each at its slots' trained targets.
    start = 0
    for i in plan[0].tolist():
        ex = store[i]
        trained = start + np.flatnonzero(ex.mask[1:])
        np.testing.assert_array_equal(batch["targets"][0, trained], ex.tokens[1:][ex.mask[1:]])
        np.testing.assert_array_equal(batch["teacher_ids"][0, trained], records[i][0])
        np.testing.assert_array_equal(batch["teacher_logprobs"][0, trained], records[i][1])
        start += ex.slots
    off = batch["weights"] == 0  # untrained targets and padding
    assert off.any() and (batch["segment_ids"] == 0).any()
    assert not batch["teacher_ids"][off].any() and not batch["teacher_logprobs"][off].any()
    assert (batch["teacher_logprobs"][~off] < 0).all()  # every trained position has its records
    # take: one process's rows, the same arrays; a restored iterator continues with the same teacher arrays.
    state = it.state()
    second = next(it)
    part = next(BatchIterator(store, np.arange(len(store)), teacher=cache, take=[2], **settings))
    for key in ("teacher_ids", "teacher_logprobs", "targets"):
        np.testing.assert_array_equal(part[key], batch[key][2:3])
    again = next(BatchIterator(store, np.arange(len(store)), teacher=cache, state=state, **settings))
    for key in ("teacher_ids", "teacher_logprobs", "targets"):
        np.testing.assert_array_equal(again[key], second[key])
    plain = next(BatchIterator(store, np.arange(len(store)), **settings))
    assert set(plain) == {"inputs", "targets", "weights", "segment_ids", "positions", "epoch"}
    assert jnp.asarray(plain["targets"]).shape == (3, SEQ_LEN)
