"""`gemmatune serve` through the real `openai` client, against one server started in this process on the embedded
tiny model (bfloat16, as stored) with two adapters: every greedy answer equals `gemmatune generate`'s (its engine,
one request alone), whatever else is in the batch; every mistake is an OpenAI-style 4xx JSON error; a client that
goes away frees its slot. And `gemmatune chat` fed lines through stdin, on a Gemma 3 base."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import json
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jax
import numpy as np
import openai
import pytest

from conftest import SMALL3
from gemmatune import cli, layout
from gemmatune.checkpoint import save_adapter
from gemmatune.config import DEFAULT_MODEL, EMBEDDED_MODEL, LoraConfig
from gemmatune.convert import model_config
from gemmatune.convert.hf import save_hf
from gemmatune.engine import Sampling
from gemmatune.server import _Stopper, open_server
from gemmatune.tokenizer import load_tokenizer

KEY = "sk-test-0123456789"
MAX_LEN = 96  # the engine's context per request: small, so "too long" is cheap to reach
# The checkpoint's own dtype (bfloat16 for the embedded model): `generate` and `serve` both apply adapters unmerged,
# so they agree there too. (Merged into bfloat16 weights, as `generate` once did, an adapter moved the logits by
# ~1e-2 and flipped near-ties.)
DTYPE = "auto"
NEW = 8  # tokens per answer
SLOTS = 4  # fewer than the concurrent clients below, so some requests wait for a slot and join mid-batch
QUESTIONS = ["Hello!", "What is JAX?", "Tell me a story.", "2 + 2 =", "Why is the sky blue?", "Name three colours.",
             "Translate 'cat' to French.", "Write a haiku.", "Say something.", "What is LoRA?", "Count to five.",
             "Who are you?", "Summarise: the cat sat.", "Is water wet?", "Give me a word.", "Goodbye."]


def write_adapter(path, cfg, seed: int) -> str:
    """A gemmatune adapter with a nonzero B (a fresh one is the base exactly), large enough to change answers; drawn
    with numpy (JAX's eager random ops compile for every shape)."""
    lora_cfg = LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "down"))
    rng = np.random.RandomState(seed)
    adapters = {}
    for name, shapes in layout.adapter_shapes(cfg, lora_cfg).items():
        bound = 1 / np.sqrt(np.prod(shapes["a"][1:-1]))  # lora.init_adapters' A
        adapters[name] = {"a": rng.uniform(-bound, bound, shapes["a"]).astype(np.float32),
                          "b": (0.5 * rng.randn(*shapes["b"])).astype(np.float32)}
    save_adapter(path, adapters, lora_cfg, cfg, EMBEDDED_MODEL)
    return str(path)


ENGINES: dict = {}  # model directory -> `gemmatune generate`'s engine with every adapter of that model


@pytest.fixture(scope="module", autouse=True)
def _close_engines():
    yield
    while ENGINES:
        ENGINES.popitem()[1].close()


def reference(model_dir, adapters: dict, adapter: str | None, prompt: list[int], max_tokens: int) -> tuple[str, int]:
    """What `gemmatune generate [--adapter]` answers: its own engine (cli._engine, one slot, the adapter unmerged),
    one request alone. adapters: {name: directory} of that model. (text, tokens)."""
    if model_dir not in ENGINES:
        args = argparse.Namespace(dtype=DTYPE, max_len=MAX_LEN, quantize="none", quantize_block=64,
                                  double_quant=False)  # a short context: a smaller cache to compile
        ENGINES[model_dir] = cli._engine(args, Path(model_dir), adapters, slots=1)
        ENGINES[model_dir].start()
    tok = load_tokenizer(model_dir)
    out = list(ENGINES[model_dir].stream(prompt, Sampling(max_tokens), adapter))
    return tok.decode(out), len(out)


class Served:
    def __init__(self, server, paths, model_dir=DEFAULT_MODEL):
        self.server, self.paths, self.model_dir = server, paths, model_dir  # paths: {model: adapter dir or None}
        self.url = server.url
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
        self.tok = load_tokenizer(DEFAULT_MODEL)

    def reference(self, model: str, prompt: list[int], max_tokens: int) -> tuple[str, int]:
        adapters = {name: path for name, path in self.paths.items() if path is not None}
        return reference(self.model_dir, adapters, model if model in adapters else None, prompt, max_tokens)

    def chat_ids(self, question: str) -> list[int]:
        return self.tok.encode_chat([{"role": "user", "content": question}], add_generation_prompt=True)

    def active(self) -> int:
        return self.http.get("/health").json()["active_requests"]


@contextlib.contextmanager
def running(server):
    """`server` serving from a thread until the block ends."""
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.uvicorn.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield
    finally:
        server.stop()
        thread.join(timeout=30)
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    cfg = model_config(DEFAULT_MODEL)
    paths = {"tiny": None, "alpha": write_adapter(tmp / "alpha", cfg, 1), "beta": write_adapter(tmp / "beta", cfg, 2)}
    server = open_server(EMBEDDED_MODEL, {"alpha": paths["alpha"], "beta": paths["beta"]}, port=0, api_key=KEY,
                         slots=SLOTS, max_len=MAX_LEN, dtype=DTYPE)
    with running(server):
        yield Served(server, paths)


def test_models_lists_the_base_and_each_adapter(served):
    assert [m.id for m in served.client.models.list()] == ["tiny", "alpha", "beta"]
    assert served.client.models.retrieve("beta").parent == "tiny"
    health = httpx.get(served.url + "/health")  # no key needed: probes poll it
    assert health.status_code == 200 and health.json() == {"status": "ok", "active_requests": 0}


def test_chat_plain_and_streaming_for_the_base_and_both_adapters(served):
    question, max_tokens = "What is JAX?", NEW
    answers = {}
    for model in ("tiny", "alpha", "beta"):
        want, n = served.reference(model, served.chat_ids(question), max_tokens)
        r = served.client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                  max_tokens=max_tokens, temperature=0)
        assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == model
        assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want, model
        assert r.choices[0].finish_reason == ("length" if n == max_tokens else "stop")
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(served.chat_ids(question)), n)
        assert r.usage.total_tokens == r.usage.prompt_tokens + n

        chunks = list(served.client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True}))
        assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n
        answers[model] = want
    assert len(set(answers.values())) == 3, answers  # each row decoded with its own adapter


def test_completions_plain_and_streaming(served):
    prompt = "The quick brown fox"
    want, n = served.reference("beta", [served.tok.bos_id] + served.tok.encode(prompt), NEW)
    r = served.client.completions.create(model="beta", prompt=prompt, max_tokens=NEW, temperature=0)
    assert (r.object, r.choices[0].text, r.usage.completion_tokens) == ("text_completion", want, n)
    streamed = served.client.completions.create(model="beta", prompt=prompt, max_tokens=NEW, temperature=0,
                                                stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want


def test_sixteen_concurrent_clients_with_mixed_adapters_match_serial_generate(served):
    """THE acceptance test: 16 clients at once over 4 slots (requests join the running batch as others finish),
    base and both adapters mixed; every greedy answer equals its own serial `generate`."""
    models = ["tiny", "alpha", "beta"]
    jobs = [(models[i % 3], q, NEW - i % 4) for i, q in enumerate(QUESTIONS)]  # rows end apart

    def ask(job):
        model, question, max_tokens = job
        r = served.client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                  max_tokens=max_tokens, temperature=0)
        return r.choices[0].message.content, r.usage.completion_tokens

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(ask, jobs))
    took = time.perf_counter() - t0
    want = [served.reference(model, served.chat_ids(q), n) for model, q, n in jobs]
    assert got == want, [(j, g, w) for j, g, w in zip(jobs, got, want) if g != w]
    print(f"16 concurrent requests in {took:.2f}s")


def test_stop_strings_cut_the_text_plain_and_streaming(served):
    question = "Tell me a story."
    full, _ = served.reference("alpha", served.chat_ids(question), NEW)
    assert len(full) > 4
    stop = full[2:4]  # the text is cut before its first occurrence
    want = full[:full.index(stop)]
    kw = dict(model="alpha", messages=[{"role": "user", "content": question}], max_tokens=NEW, temperature=0,
              stop=[stop, "\u2603never"])
    r = served.client.chat.completions.create(**kw)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (want, "stop")
    chunks = [c for c in served.client.chat.completions.create(**kw, stream=True) if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"
    deadline = time.monotonic() + 10  # the request was cancelled at the stop string
    while served.active() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert served.active() == 0


def test_streamed_text_holds_back_what_may_start_a_stop_string():
    stopper = _Stopper(["END", "xyz"])
    assert stopper.feed("abc E") == ("abc ", False)  # "E" may start "END"
    assert stopper.feed("x") == ("E", False)  # "Ex" cannot; "x" may start "xyz"
    assert stopper.feed("y") == ("", False)
    assert stopper.finish() == "xy"  # the answer ended without a stop string: all of it
    stopper = _Stopper(["END"])
    assert [stopper.feed(p) for p in ("one E", "N", "D two END")] == [("one ", False), ("", False), ("", True)]
    assert stopper.text == "one " and stopper.finish() == ""


def test_sampling_is_repeatable_with_a_seed(served):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Hello!"}], max_tokens=8, temperature=0.9,
              top_p=0.95, seed=7)
    first = served.client.chat.completions.create(**kw).choices[0].message.content
    assert served.client.chat.completions.create(**kw).choices[0].message.content == first


def post(served, path, body, headers=None, raw=None):
    return httpx.post(served.url + path, content=raw if raw is not None else json.dumps(body),
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json",
                               **(headers or {})}, timeout=30)


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
# (what, method, path, body or raw bytes, headers, status, param, words in the message)
ERRORS = [
    ("no key", "POST", "/v1/chat/completions", CHAT, {"Authorization": ""}, 401, None, "API key"),
    ("wrong key", "POST", "/v1/chat/completions", CHAT, {"Authorization": "Bearer sk-test-0123456788"}, 401, None,
     "API key"),
    ("wrong key, models", "GET", "/v1/models", None, {"Authorization": "Bearer nope"}, 401, None, "API key"),
    ("unknown model", "POST", "/v1/chat/completions", {**CHAT, "model": "gamma"}, {}, 404, "model", "'gamma'"),
    ("no model", "POST", "/v1/chat/completions", {k: v for k, v in CHAT.items() if k != "model"}, {}, 400, "model",
     "required"),
    ("negative temperature", "POST", "/v1/chat/completions", {**CHAT, "temperature": -1}, {}, 400, "temperature",
     "-1"),
    ("top_p 0", "POST", "/v1/chat/completions", {**CHAT, "top_p": 0}, {}, 400, "top_p", "(0, 1]"),
    ("n 2", "POST", "/v1/chat/completions", {**CHAT, "n": 2}, {}, 400, "n", "n = 1"),
    ("max_tokens 0", "POST", "/v1/chat/completions", {**CHAT, "max_tokens": 0}, {}, 400, "max_tokens", "between 1"),
    ("max_tokens a string", "POST", "/v1/chat/completions", {**CHAT, "max_tokens": "ten"}, {}, 400, "max_tokens",
     "integer"),
    ("max_tokens a bool", "POST", "/v1/chat/completions", {**CHAT, "max_tokens": True}, {}, 400, "max_tokens",
     "integer"),
    ("max_tokens past the context", "POST", "/v1/chat/completions", {**CHAT, "max_tokens": 1000}, {}, 400,
     "max_tokens", f"the context is {MAX_LEN} tokens"),
    ("max_completion_tokens past the context", "POST", "/v1/chat/completions",
     {**CHAT, "max_completion_tokens": 1000}, {}, 400, "max_completion_tokens", "1000"),
    ("prompt too long", "POST", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": "word " * 400}]}, {}, 400, "messages", f"context is {MAX_LEN}"),
    ("completion prompt too long", "POST", "/v1/completions", {"model": "tiny", "prompt": "word " * 400}, {}, 400,
     "prompt", f"context is {MAX_LEN}"),
    ("token ids outside the vocabulary", "POST", "/v1/completions", {"model": "tiny", "prompt": [2, 99999]}, {},
     400, "prompt", "vocabulary"),
    ("messages not a list", "POST", "/v1/chat/completions", {**CHAT, "messages": "Hi"}, {}, 400, "messages", "list"),
    ("bad role", "POST", "/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, {}, 400,
     "messages", "robot"),
    ("stop not strings", "POST", "/v1/chat/completions", {**CHAT, "stop": [1]}, {}, 400, "stop", "string"),
    ("malformed JSON", "POST", "/v1/chat/completions", b'{"model": "tiny", ', {}, 400, None, "not valid JSON"),
    ("not UTF-8", "POST", "/v1/chat/completions", b'\xff\xfe{', {}, 400, None, "not valid JSON"),
    ("not an object", "POST", "/v1/chat/completions", b"[1, 2]", {}, 400, None, "JSON object"),
    ("too large", "POST", "/v1/chat/completions", b" " * (2**20 + 1), {}, 413, None, "limit"),
    ("unknown path", "GET", "/v1/nothing", None, {}, 404, None, "Not Found"),
    ("wrong method", "GET", "/v1/chat/completions", None, {}, 405, None, "Method Not Allowed"),
    ("adapter without path", "POST", "/v1/adapters", {"name": "x"}, {}, 400, "path", "path"),
    ("adapter not there", "POST", "/v1/adapters", {"name": "x", "path": "/no/such/dir"}, {}, 400, "path",
     "/no/such/dir"),
    ("adapter name taken", "POST", "/v1/adapters", {"name": "alpha", "path": "/no/such/dir"}, {}, 409, "name",
     "taken"),
    ("remove the base", "DELETE", "/v1/adapters/tiny", None, {}, 400, "name", "base model"),
    ("remove an unknown adapter", "DELETE", "/v1/adapters/gamma", None, {}, 404, "model", "'gamma'"),
]


def test_every_mistake_is_an_openai_style_4xx_error(served):
    for what, method, path, body, headers, status, param, words in ERRORS:
        raw = body if isinstance(body, bytes) else None
        r = httpx.request(method, served.url + path, content=raw if raw is not None else
                          (json.dumps(body) if body is not None else None),
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **headers},
                          timeout=30)
        assert r.status_code == status, (what, r.status_code, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, what
        assert error["param"] == param and words in error["message"], (what, error)
    # the client library raises its own exceptions for them
    with pytest.raises(openai.NotFoundError) as e:
        served.client.chat.completions.create(model="gamma", messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert served.active() == 0 and served.client.models.list()  # still serving


def test_an_engine_failure_is_an_error_not_a_hang(served, monkeypatch):
    """The engine ends every request with finish "error" when decoding fails: a 500 JSON error, or in a stream
    (its 200 already sent) an error event and [DONE]."""
    engine = served.server.engine

    class Failed:
        def cancel(self):
            pass

    def failing(prompt, sampling, on_token, adapter=None):
        threading.Timer(0.05, on_token, (None, "error")).start()  # from another thread, as the engine does
        return Failed()

    monkeypatch.setattr(engine, "submit", failing)
    r = post(served, "/v1/chat/completions", CHAT)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    with served.http.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert json.loads(lines[-2][6:])["error"]["type"] == "server_error" and lines[-1] == "data: [DONE]"
    assert served.active() == 0


def test_a_client_that_disconnects_mid_stream_frees_its_slot(served, monkeypatch):
    engine, seen = served.server.engine, []  # seen: per engine request, what its on_token was given
    submit = engine.submit

    def spy(prompt, sampling, on_token, adapter=None):
        got: list = []
        seen.append(got)
        return submit(prompt, sampling, lambda t, f: (got.append((t, f)), on_token(t, f)), adapter=adapter)

    monkeypatch.setattr(engine, "submit", spy)
    prompt = served.chat_ids("Tell me a story.")
    room = MAX_LEN - len(prompt)
    body = {"model": "alpha", "messages": [{"role": "user", "content": "Tell me a story."}], "stream": True,
            "max_tokens": room, "temperature": 0}
    # Every slot taken by an answer as long as the context allows, all dropped once each has sent some text.
    with contextlib.ExitStack() as streams:
        held = []  # the line iterators too: closing one (when collected) would close its response
        for _ in range(SLOTS):
            r = streams.enter_context(served.http.stream("POST", "/v1/chat/completions", json=body))
            assert r.status_code == 200
            held.append(json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {"))
            assert any(c["choices"][0]["delta"].get("content") for c in held[-1])
    deadline = time.monotonic() + 10
    while (served.active() or engine.active) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert served.active() == 0 and engine.active == 0  # the server cancelled them, and the engine freed the slots
    counts = [len(got) for got in seen]
    time.sleep(0.3)
    # cancelled: no finish, not decoded to the end, and nothing more after the cancel
    assert len(seen) == SLOTS and [len(got) for got in seen] == counts
    assert all(f is None for got in seen for _, f in got) and max(counts) < room, counts
    want, _ = served.reference("tiny", served.chat_ids("Hello!"), NEW)
    r = served.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello!"}],
                                              max_tokens=NEW, temperature=0, timeout=10)
    assert r.choices[0].message.content == want


def test_adapters_added_and_removed_while_serving(served):
    question = "Name three colours."
    r = post(served, "/v1/adapters", {"name": "gamma", "path": served.paths["alpha"]})
    assert r.status_code == 200 and r.json()["id"] == "gamma"
    assert [m.id for m in served.client.models.list()] == ["tiny", "alpha", "beta", "gamma"]
    want, _ = served.reference("alpha", served.chat_ids(question), NEW)  # gamma holds alpha's weights
    stream = served.client.chat.completions.create(model="gamma", messages=[{"role": "user", "content": question}],
                                                   max_tokens=NEW, temperature=0, stream=True)
    got = ""
    while not got:  # until the request is decoding
        got = next(stream).choices[0].delta.content
    assert served.http.delete("/v1/adapters/gamma").json() == {"id": "gamma", "object": "model", "deleted": True}
    # the answer already decoding with it finishes with it
    assert got + "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want
    assert [m.id for m in served.client.models.list()] == ["tiny", "alpha", "beta"]
    with pytest.raises(openai.NotFoundError):
        served.client.chat.completions.create(model="gamma", messages=[{"role": "user", "content": question}])


def test_serve_refuses_a_bad_adapter_and_a_port_in_use(capsys):
    assert cli.main(["serve", "--adapter", "x=/no/such/adapter"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "/no/such/adapter" in err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert cli.main(["serve", "--port", str(taken.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "in use" in err and "--port" in err


def gemma3_checkpoint(out) -> str:
    """A small Gemma 3 checkpoint (QK-norm, no soft-caps, RoPE per layer type) with the embedded tokenizer, and weights
    as conftest.strong_params makes them (drawn with numpy: faster than JAX's eager random ops)."""
    # six layers: one repeat of the 5 local : 1 global pattern (fewer layers, less to compile)
    cfg = dataclasses.replace(SMALL3, vocab_size=model_config(DEFAULT_MODEL).vocab_size, num_layers=6,
                              layer_types=SMALL3.layer_types[:6])
    rng = np.random.RandomState(0)

    def init(path, shape):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            mean = 5.0 if "post_" in name else 4.5 if "final" in name else 0.5
            return (mean + 0.1 * rng.randn(*shape)).astype(np.float32)
        fan_in = 10.0 if "embed" in name else shape[1] * shape[2] if "o_proj" in name else shape[1]
        return (rng.randn(*shape) / np.sqrt(fan_in)).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(init, layout.param_shapes(cfg), is_leaf=layout.is_shape)
    save_hf(out, cfg, params, tokenizer_dir=DEFAULT_MODEL)
    return str(out)


def test_chat_and_serve_on_a_gemma3_base(tmp_path, monkeypatch, capsys):
    """`gemmatune chat` with lines fed through stdin, on a Gemma 3 base with an adapter (history kept, /reset,
    /exit); then the HTTP API on that base (the tests above run a Gemma 2 base): the base and the adapter answered
    together, each as `gemmatune generate` answers."""
    model = gemma3_checkpoint(tmp_path / "g3")
    adapter = write_adapter(tmp_path / "tuned", model_config(model), 3)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello!\nWhat is JAX?\n/reset\nHello!\n/exit\nnot read\n"))
    assert cli.main(["chat", "--model", model, "--adapter", adapter, "--max-new-tokens", str(NEW),
                     "--max-len", str(MAX_LEN), "--dtype", DTYPE]) == 0
    tok = load_tokenizer(model)
    hello = [{"role": "user", "content": "Hello!"}]
    ref = functools.partial(reference, model, {"tuned": adapter})
    first, _ = ref("tuned", tok.encode_chat(hello, add_generation_prompt=True), NEW)
    history = [*hello, {"role": "assistant", "content": first}, {"role": "user", "content": "What is JAX?"}]
    second, _ = ref("tuned", tok.encode_chat(history, add_generation_prompt=True), NEW)
    assert first != ref(None, tok.encode_chat(hello, add_generation_prompt=True), NEW)[0]
    out, err = capsys.readouterr()
    assert out == f"{first}\n{second}\n{first}\n"  # after /reset the first question is answered afresh
    assert "/reset" in err and "history cleared" in err

    server = open_server(model, {"tuned": adapter}, port=0, api_key=KEY, slots=2, max_len=MAX_LEN, dtype=DTYPE)
    with running(server):
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        names = [m.id for m in client.models.list()]
        assert names == ["g3", "tuned"]

        def ask(name: str) -> str | None:
            r = client.chat.completions.create(model=name, messages=hello, max_tokens=NEW, temperature=0)
            return r.choices[0].message.content

        with ThreadPoolExecutor(2) as pool:
            assert list(pool.map(ask, names)) == [ref(None, tok.encode_chat(hello, add_generation_prompt=True),
                                                      NEW)[0], first]
