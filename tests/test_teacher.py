"""The teacher's top-k log-probabilities (teacher.teacher_topk) against a direct float32 computation from the full
logits: k below and equal to the vocabulary, chunked and unchunked, the final soft-cap on, and a vocabulary smaller
than the teacher's embedding."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SMALL
from gemmatune.model import forward
from gemmatune.teacher import teacher_topk

# Two packed rows: three examples in the first, one and padding in the second.
SEGMENTS = np.array([[1] * 5 + [2] * 4 + [3] * 3, [1] * 9 + [0] * 3], np.int32)  # [2, 12]


def packed_batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    positions = np.zeros_like(SEGMENTS)
    for r in range(len(SEGMENTS)):
        for s in set(SEGMENTS[r].tolist()) - {0}:
            where = np.flatnonzero(SEGMENTS[r] == s)
            positions[r, where] = np.arange(len(where))
    return {"inputs": rng.integers(0, SMALL.vocab_size, SEGMENTS.shape).astype(np.int32), "positions": positions,
            "segment_ids": SEGMENTS}


@pytest.fixture(scope="module")
def reference(small_params) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The packed batch and its full soft-capped float32 logits [2, 12, V], computed directly."""
    batch = packed_batch()
    logits = forward(small_params, jnp.asarray(batch["inputs"]), SMALL, positions=jnp.asarray(batch["positions"]),
                     segment_ids=jnp.asarray(batch["segment_ids"]))
    return batch, np.asarray(logits, np.float64)


@pytest.mark.parametrize(("k", "vocab", "chunk", "temperature"), [
    (5, SMALL.vocab_size, 7, 2.0),  # chunks that do not divide the 24 positions
    (SMALL.vocab_size, SMALL.vocab_size, 24, 1.0),  # k = V, unchunked
    (3, 200, 5, 0.5),  # the first 200 ids of a 256-row embedding
])
def test_topk_matches_full_logits(small_params, reference, k, vocab, chunk, temperature):
    batch, logits = reference
    ids, logprobs = jax.jit(partial(teacher_topk, cfg=SMALL, k=k, temperature=temperature, vocab=vocab,
                                    chunk=chunk))(small_params, batch)
    assert ids.shape == logprobs.shape == (2, 12, k) and ids.dtype == jnp.int32 and logprobs.dtype == jnp.float32
    cap = SMALL.final_logit_softcap
    assert cap is not None and np.abs(logits).max() > 0.4 * cap  # the logits reach into the cap's bend
    z = logits[..., :vocab] / temperature
    ref = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
    order = np.argsort(-ref, axis=-1, kind="stable")[..., :k]  # descending, lower id first among equals
    real = batch["segment_ids"] != 0
    np.testing.assert_array_equal(np.asarray(ids)[real], order[real])
    # float32 against float64: the chunked and the unchunked computations agree to rounding
    np.testing.assert_allclose(np.asarray(logprobs)[real], np.take_along_axis(ref, order, -1)[real],
                               rtol=0, atol=2e-5)
    # Without the cap the top-k log-probabilities would differ: the test would see a missing or misplaced cap.
    raw = np.arctanh(logits[..., :vocab] / cap) * cap / temperature
    uncapped = raw - np.log(np.exp(raw).sum(-1, keepdims=True))
    assert np.abs(np.take_along_axis(uncapped, order, -1) - np.asarray(logprobs))[real].max() > 1e-2
    if k == vocab:  # the whole distribution: probabilities sum to 1
        np.testing.assert_allclose(np.exp(np.asarray(logprobs, np.float64)).sum(-1), 1.0, atol=1e-5)


def test_refuses_bad_settings(small_params):
    with pytest.raises(ValueError, match="k"):
        teacher_topk(small_params, packed_batch(), SMALL, k=300, temperature=1.0, vocab=SMALL.vocab_size, chunk=4)
    with pytest.raises(ValueError, match="temperature"):
        teacher_topk(small_params, packed_batch(), SMALL, k=3, temperature=0.0, vocab=SMALL.vocab_size, chunk=4)
