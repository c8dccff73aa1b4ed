"""Generation: cached greedy decoding against full forward passes and transformers' generate, batching with
left padding, stop ids, sampling (seeds, top-k, top-p), one compilation per shape, input validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import SMALL, hf_model, strong_params
from gemmatune import generate as G
from gemmatune import model as M
from gemmatune.errors import GemmatuneError

W = SMALL.sliding_window
NEW = 3 * W  # every continuation runs several windows past the prompt
rng = np.random.RandomState(1)
PROMPTS = [list(rng.randint(3, SMALL.vocab_size, n)) for n in (5, 3, 11, 6)]
_forward = jax.jit(M.forward, static_argnums=2)
_decode = jax.jit(M.forward_cached, static_argnums=3)
_sample_rows = jax.jit(G.sample_rows)  # one compilation per shape, not a dispatch per operation


@pytest.fixture(scope="module")
def params() -> dict:
    """Greedy continuations of these weights stay diverse (asserted below) and every step has a clear winner,
    so equal tokens mean equal models."""
    return strong_params(SMALL)


@pytest.fixture(scope="module")
def greedy(params) -> list[list[int]]:
    return G.generate(params, SMALL, PROMPTS, max_new_tokens=NEW)


def step_logits(params: dict, prompt: list[int], new: list[int]) -> np.ndarray:
    """Full-forward (no cache) logits that predicted each token of `new`: [len(new), V]. One fixed-length pass
    suffices because the model is causal: the logits at t see only tokens up to t."""
    seq = np.array([prompt + new], np.int32)
    return np.asarray(_forward(params, jnp.asarray(seq), SMALL))[0, len(prompt) - 1:-1]


def test_cached_greedy_equals_repeated_full_forward(params, greedy):
    for prompt, new in zip(PROMPTS, greedy):
        assert len(new) == NEW
        logits = step_logits(params, prompt, new)
        # Teacher-forced argmax equal to each generated token = argmax of a fresh full pass at every step.
        np.testing.assert_array_equal(logits.argmax(-1), new)
        top2 = np.sort(logits, axis=-1)[:, -2:]
        assert (top2[:, 1] - top2[:, 0]).min() > 1e-3  # no near-ties, so the comparison is meaningful
        assert len(set(new)) >= 6  # not collapsed onto one repeated token


def test_greedy_equals_transformers_tokens_and_logits(params, greedy):
    model = hf_model(SMALL, params)
    prompt, ours = PROMPTS[0], greedy[0]
    never = next(t for t in range(SMALL.vocab_size) if t not in ours)  # as eos, so transformers runs to the end
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=NEW, output_logits=True,
                             return_dict_in_generate=True, eos_token_id=never, pad_token_id=SMALL.pad_token_id)
    assert out.sequences[0, len(prompt):].tolist() == ours
    ref = torch.cat(out.logits).numpy()  # [NEW, V], one row per step
    # Our cached logits at each step, in generate's layout: left padding to the bucketed width, one prefill,
    # then one token at a time.
    width = G._round_up(len(prompt), G.BUCKET)
    cache = M.init_cache(SMALL, 1, width + NEW, jnp.float32, jnp.asarray([width - len(prompt)]))
    padded = [SMALL.pad_token_id] * (width - len(prompt)) + prompt
    rows = []
    for chunk in [padded] + [[t] for t in ours[:-1]]:
        logits, cache = _decode(M.unstack(params), jnp.asarray([chunk]), cache, SMALL)
        rows.append(np.asarray(logits)[0, -1])
    np.testing.assert_allclose(np.stack(rows), ref, atol=1e-4, rtol=0)


def test_batch_rows_equal_each_prompt_alone(params, greedy):
    # PROMPTS span two padding buckets (3..11 tokens), so rows carry 5 to 13 left-padding slots in the batch.
    for prompt, batched in zip(PROMPTS, greedy):
        assert G.generate(params, SMALL, [prompt], max_new_tokens=NEW)[0] == batched


def test_stop_ids_end_a_row_and_are_not_returned(params, greedy):
    row = greedy[2]
    j = next(i for i, t in enumerate(row) if i >= 3 and t not in row[:i] and t not in greedy[3])
    unused = next(t for t in range(SMALL.vocab_size) if t not in row + greedy[3])  # a second stop id, never met
    streamed: list[np.ndarray] = []
    out = G.generate(params, SMALL, [PROMPTS[2], PROMPTS[3]], max_new_tokens=NEW, stop_ids=[row[j], unused],
                     on_tokens=streamed.append)
    assert out == [row[:j], greedy[3]]  # the other row runs on to max_new_tokens
    steps = np.stack(streamed)  # [steps, B]
    assert steps.shape == (NEW, 2)
    assert (steps[j:, 0] == G.FINISHED).all() and steps[:j, 0].tolist() == row[:j]
    assert steps[:, 1].tolist() == greedy[3]
    # When every row stops, the loop ends early.
    streamed.clear()
    assert G.generate(params, SMALL, [PROMPTS[2]], max_new_tokens=NEW, stop_ids=[row[j]],
                      on_tokens=streamed.append) == [row[:j]]
    assert len(streamed) == j + 1


def test_sampling_is_seeded_and_cuts_to_greedy(params, greedy):
    prompts, kw = PROMPTS[:2], dict(max_new_tokens=NEW, temperature=1.0)
    a = G.generate(params, SMALL, prompts, seed=1, **kw)
    assert a == G.generate(params, SMALL, prompts, seed=1, **kw)
    assert a != G.generate(params, SMALL, prompts, seed=2, **kw)
    assert a != greedy[:2]
    assert G.generate(params, SMALL, prompts, seed=3, top_k=1, **kw) == greedy[:2]
    assert G.generate(params, SMALL, prompts, seed=3, top_p=1e-6, **kw) == greedy[:2]


def test_sampled_tokens_stay_within_top_k(params):
    k = 3
    new = G.generate(params, SMALL, PROMPTS[:1], max_new_tokens=NEW, temperature=2.0, top_k=k, seed=5)[0]
    logits = step_logits(params, PROMPTS[0], new)
    rank = (logits > logits[np.arange(len(new)), new][:, None]).sum(-1)  # 0 for the most likely token
    assert rank.max() < k and rank.max() > 0  # a high temperature leaves the argmax sometimes


def rows(logits: jax.Array, seed: int, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """G.sample_rows with the same settings on every row, each row its own seed (independent draws)."""
    B = logits.shape[0]
    return np.asarray(_sample_rows(logits, jnp.full(B, temperature), jnp.full(B, top_k), jnp.full(B, top_p),
                                    seed + jnp.arange(B), jnp.zeros(B, jnp.int32)))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**30), st.integers(1, 6), st.floats(0.05, 1.0), st.floats(0.3, 3.0))
def test_sample_rows_stays_in_the_cut(seed, k, p, temperature):
    r = np.random.RandomState(seed)
    logits = jnp.asarray(r.normal(0, 3, (64, 16)), jnp.float32)  # [B, V]

    def rank(tok: np.ndarray) -> np.ndarray:  # [B]: how many tokens are more likely than the sampled one
        return np.asarray((logits > jnp.take_along_axis(logits, jnp.asarray(tok)[:, None], -1)).sum(-1))

    assert rank(rows(logits, seed, temperature, top_k=k)).max() < k
    # Top-p: the nucleus is the shortest prefix (by decreasing probability) whose mass reaches p.
    probs = np.sort(np.asarray(jax.nn.softmax(logits / temperature)), -1)[:, ::-1]
    size = (np.cumsum(probs, -1) - probs < p).sum(-1)
    assert (rank(rows(logits, seed, temperature, top_p=p)) < size).all()


def test_sample_rows_frequencies():
    """Temperature then top-p renormalise as expected: probabilities .5 .3 .15 .05 with top_p 0.75 keep the
    first two (0.5 < 0.75 <= 0.8) in ratio 5:3."""
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 20000))  # [B, 4]: 20000 independent draws

    def freq(**kw: float) -> np.ndarray:
        return np.bincount(rows(logits, 0, **kw), minlength=4) / 20000

    np.testing.assert_allclose(freq(temperature=1.0), [0.5, 0.3, 0.15, 0.05], atol=0.015)
    np.testing.assert_allclose(freq(temperature=1.0, top_p=0.75), [0.625, 0.375, 0, 0], atol=0.015)
    hot = np.exp(np.log([0.5, 0.3, 0.15, 0.05]) / 2.0)
    np.testing.assert_allclose(freq(temperature=2.0), hot / hot.sum(), atol=0.015)


def test_sample_rows_mixes_greedy_and_sampled_rows():
    logits = jnp.asarray(np.random.RandomState(0).normal(0, 1, (6, 50)), jnp.float32)
    temperature = jnp.array([0, 5, 0, 5, 5, 0], jnp.float32)
    zeros = jnp.zeros(6, jnp.int32)
    got = np.asarray(G.sample_rows(logits, temperature, zeros, jnp.ones(6), jnp.arange(6), zeros))
    greedy = np.asarray(logits.argmax(-1))
    assert (got[[0, 2, 5]] == greedy[[0, 2, 5]]).all() and (got[[1, 3, 4]] != greedy[[1, 3, 4]]).any()


def test_decode_step_compiles_once(params, monkeypatch):
    traced: list[tuple[int, ...]] = []

    def counting(params, tokens, *a, **kw):
        traced.append(tokens.shape)  # runs only while tracing, so it counts compilations
        return M.forward_cached(params, tokens, *a, **kw)

    monkeypatch.setattr(G, "forward_cached", counting)
    prompts = [p[:4] for p in PROMPTS] + [[5]]  # a batch of 5: a shape no other test compiles
    G.generate(params, SMALL, prompts, max_new_tokens=20)
    assert traced == [(5, 8), (5, 1)]  # one prefill, one decode step for all 20 tokens
    G.generate(params, SMALL, [p[::-1] for p in prompts], max_new_tokens=17)  # same buckets: no new compile
    assert traced == [(5, 8), (5, 1)]


def test_bfloat16_generation_runs(params, greedy):
    bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    out = G.generate(bf16, SMALL, PROMPTS[:2], max_new_tokens=W)
    assert [len(o) for o in out] == [W, W] and all(0 <= t < SMALL.vocab_size for o in out for t in o)
    assert [o[0] for o in out] == [g[0] for g in greedy[:2]]  # the first token's margin survives bfloat16


@pytest.mark.parametrize("prompts, kw, says", [
    ([], {}, "no prompts"),
    ([[2, 3], []], {}, "[1] are empty"),
    ([[2, SMALL.vocab_size]], {}, "outside the vocabulary"),
    ([[2, 3]], {"max_new_tokens": 0}, "at least 1"),
    ([[2] * 500], {"max_new_tokens": 13}, "Lower max_new_tokens to at most 12"),
    ([[2, 3]], {"temperature": -0.5}, "temperature"),
    ([[2, 3]], {"top_k": 0}, "top_k"),
    ([[2, 3]], {"top_p": 0.0}, "top_p"),
    ([[2, 3]], {"top_p": 1.5}, "top_p"),
])
def test_invalid_inputs_are_refused(params, prompts, kw, says):
    with pytest.raises(GemmatuneError) as e:
        G.generate(params, SMALL, prompts, **{"max_new_tokens": 4, **kw})
    assert says in str(e.value)
