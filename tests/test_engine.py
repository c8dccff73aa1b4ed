"""The serving engine: per-row adapters equal to merged weights, continuous batching equal to each request alone,
seeded sampling independent of batch-mates, queueing, cancelling, adapters added and removed while running, and
the requests it refuses."""

from __future__ import annotations

import dataclasses
import threading
import time

import jax
import numpy as np
import pytest

from conftest import SMALL, SMALL3, strong_params
from gemmatune import generate as G
from gemmatune import lora
from gemmatune.config import LoraConfig
from gemmatune.engine import CHUNK, Engine, Sampling
from gemmatune.errors import GemmatuneError

rng = np.random.RandomState(3)
# Prompt lengths around a chunk boundary and over several chunks.
PROMPTS = [list(rng.randint(3, SMALL.vocab_size, n)) for n in (5, CHUNK, CHUNK + 1, 2 * CHUNK + 7, 1)]
NEW = 2 * SMALL.sliding_window + 3  # past the local layers' ring, twice
STOP = 1  # a stop id, met by some greedy continuations


def adapter(cfg, seed: int, lora_cfg: LoraConfig):
    """An adapter with a nonzero B, large enough to change greedy answers."""
    ad = lora.init_adapters(cfg, lora_cfg, jax.random.key(seed))
    keys = jax.random.split(jax.random.key(seed + 100), len(ad))
    return {n: {"a": np.asarray(v["a"]), "b": np.asarray(0.3 * jax.random.normal(k, v["b"].shape))}
            for k, (n, v) in zip(keys, ad.items())}


LORA_A = LoraConfig(rank=4, alpha=8.0)
LORA_B = LoraConfig(rank=8, alpha=4.0, targets=("q", "v", "down"))


@pytest.fixture(scope="module", params=[SMALL, SMALL3], ids=["gemma2", "gemma3"])
def setup(request):
    cfg = request.param
    params = strong_params(cfg)
    ads = {"a": (adapter(cfg, 1, LORA_A), LORA_A), "b": (adapter(cfg, 2, LORA_B), LORA_B)}
    # The reference: each adapter merged into the weights, decoded alone by generate().
    ref = {}
    for name in (None, "a", "b"):
        p = params if name is None else lora.merge(params, *ads[name])
        ref[name] = G.generate(p, cfg, PROMPTS, max_new_tokens=NEW, stop_ids=[STOP])  # rows as if alone: test_generate
    assert ref[None] != ref["a"] and ref["a"] != ref["b"] and ref[None] != ref["b"]
    return cfg, params, ads, ref


# The scheduling tests below run on Gemma 2 alone: the engine treats both families alike, and the model's part is
# checked on both above.
ONE_FAMILY = pytest.mark.parametrize("setup", [SMALL], ids=["gemma2"], indirect=True)


def collect(engine: Engine, jobs: list[tuple[list[int], str | None, Sampling]]) -> list[tuple[list[int], str]]:
    """Submit every job at once; wait for all; (tokens, finish) per job."""
    out: list[tuple[list[int], str]] = [([], "")] * len(jobs)
    done = threading.Semaphore(0)

    def make(i: int):
        tokens: list[int] = []

        def on_token(t, finish):
            if t is not None:
                tokens.append(t)
            else:
                out[i] = (tokens, finish)
                done.release()
        return on_token

    for i, (prompt, name, s) in enumerate(jobs):
        engine.submit(prompt, s, make(i), name)
    for _ in jobs:
        assert done.acquire(timeout=300)
    return out


def test_mixed_adapters_in_one_batch_equal_each_merged_alone(setup):
    cfg, params, ads, ref = setup
    with Engine(cfg, params, stop_ids=[STOP], slots=4, max_len=256) as engine:
        for name, (ad, lcfg) in ads.items():
            engine.add_adapter(name, ad, lcfg)
        names = [None, "a", "b"]
        # 15 requests over 4 rows: requests queue, and join the batch as rows free up, at different times.
        jobs = [(p, names[(i + j) % 3], Sampling(NEW)) for j in range(3) for i, p in enumerate(PROMPTS)]
        got = collect(engine, jobs)
    for (prompt, name, _), (tokens, finish) in zip(jobs, got):
        r = ref[name][PROMPTS.index(prompt)]
        assert (tokens, finish) == (r, "length" if len(r) == NEW else "stop")


@ONE_FAMILY
def test_a_request_joining_a_running_batch(setup):
    cfg, params, ads, ref = setup
    with Engine(cfg, params, stop_ids=[STOP], slots=2, max_len=256) as engine:
        engine.add_adapter("a", *ads["a"])
        first: list[int] = []
        joined = threading.Event()
        results: dict[str, list[int]] = {}
        finished = threading.Semaphore(0)

        def on_first(t, finish):
            if t is not None:
                first.append(t)
                if len(first) == 5:  # the second request arrives while this one is decoding
                    engine.submit(PROMPTS[3], Sampling(NEW), on_second, "a")
                    joined.set()
            else:
                results["first"] = list(first)
                finished.release()

        second: list[int] = []

        def on_second(t, finish):
            if t is not None:
                second.append(t)
            else:
                results["second"] = list(second)
                finished.release()

        engine.submit(PROMPTS[0], Sampling(NEW), on_first)
        assert finished.acquire(timeout=300) and finished.acquire(timeout=300) and joined.is_set()
    assert results["first"] == ref[None][0] and results["second"] == ref["a"][3]


@ONE_FAMILY
def test_stop_ids_and_max_tokens_end_a_request(setup):
    cfg, params, _, ref = setup
    row = ref[None][2]
    j = next(i for i, t in enumerate(row) if i >= 2 and t not in row[:i])
    with Engine(cfg, params, stop_ids=[STOP, row[j]], slots=2, max_len=256) as engine:
        [(tokens, finish), (short, why)] = collect(engine, [(PROMPTS[2], None, Sampling(NEW)),
                                                            (PROMPTS[0], None, Sampling(3))])
    assert (tokens, finish) == (row[:j], "stop")  # the stop id itself is not passed on
    assert (short, why) == (ref[None][0][:3], "length")


@ONE_FAMILY
def test_sampling_is_seeded_per_request_whatever_the_batch(setup):
    cfg, params, _, ref = setup
    s = Sampling(12, temperature=1.0, seed=7)
    with Engine(cfg, params, stop_ids=[STOP], slots=4, max_len=256) as engine:
        alone = collect(engine, [(PROMPTS[0], None, s)])[0][0]
        crowd = collect(engine, [(PROMPTS[1], None, dataclasses.replace(s, seed=1)), (PROMPTS[0], None, s),
                                 (PROMPTS[2], None, Sampling(12))])
        other = collect(engine, [(PROMPTS[0], None, dataclasses.replace(s, seed=8))])[0][0]
        cut = collect(engine, [(PROMPTS[0], None, dataclasses.replace(s, top_k=1)),
                               (PROMPTS[0], None, dataclasses.replace(s, top_p=1e-6))])
    assert crowd[1][0] == alone and other != alone and alone != ref[None][0][:12]
    assert crowd[2][0] == ref[None][2][:12]  # a greedy row beside sampled ones stays greedy
    assert [c[0] for c in cut] == [ref[None][0][:12]] * 2


@ONE_FAMILY
def test_cancel_frees_the_row_and_adapters_come_and_go(setup):
    cfg, params, ads, ref = setup
    with Engine(cfg, params, stop_ids=[STOP], slots=1, max_len=256) as engine:
        got: list[int] = []
        started = threading.Event()

        def on_token(t, finish):
            got.append(t)
            started.set()

        req = engine.submit(PROMPTS[0], Sampling(200), on_token)
        assert started.wait(300)
        req.cancel()
        n = len(got)
        # The only row is free again: the next request runs, and nothing more reaches the cancelled one.
        engine.add_adapter("b", *ads["b"])
        assert collect(engine, [(PROMPTS[1], "b", Sampling(NEW))])[0][0] == ref["b"][1]
        assert len(got) == n and None not in got and engine.active == 0
        engine.remove_adapter("b")
        assert engine.adapter_names == []
        with pytest.raises(GemmatuneError, match="no adapter named 'b'"):
            engine.submit(PROMPTS[1], Sampling(4), on_token, "b")
        engine.add_adapter("a", *ads["a"])  # takes the freed place in the bank
        assert collect(engine, [(PROMPTS[4], "a", Sampling(NEW))])[0][0] == ref["a"][4]
        with pytest.raises(GemmatuneError, match="already loaded"):
            engine.add_adapter("a", *ads["b"])
        # Removed just after its request was submitted (queued, or taken into a row and prefilling): the request
        # still finishes with it.
        for pause in (0.0, 0.001, 0.01):
            engine.add_adapter("c", *ads["b"])
            got_c: list[int] = []
            finished = threading.Event()
            engine.submit(PROMPTS[1], Sampling(NEW), lambda t, f: finished.set() if t is None else got_c.append(t),
                          "c")
            time.sleep(pause)
            engine.remove_adapter("c")
            assert finished.wait(300) and got_c == ref["b"][1]


@pytest.mark.parametrize("prompt, s, says", [
    ([], Sampling(4), "empty"),
    ([2, SMALL.vocab_size], Sampling(4), "outside the vocabulary"),
    ([2, 3], Sampling(0), "at least 1"),
    ([2] * 60, Sampling(5), "ask for at most 4 tokens"),
    ([2, 3], Sampling(4, temperature=-1), "temperature"),
    ([2, 3], Sampling(4, top_k=0), "top_k"),
    ([2, 3], Sampling(4, top_p=1.5), "top_p"),
])
def test_refused_requests(prompt, s, says):
    engine = Engine(SMALL, strong_params(SMALL), stop_ids=[STOP], slots=1, max_len=64)
    with pytest.raises(GemmatuneError, match=says):
        engine.submit(prompt, s, lambda t, f: None)
    with pytest.raises(GemmatuneError, match="no adapter named 'x'"):
        engine.submit([2, 3], Sampling(4), lambda t, f: None, "x")
