"""Continuous batching with many LoRA adapters on one base: the decoder behind `gemmatune serve`, `chat` and
`generate`.

The engine holds `slots` rows of KV cache and decodes every busy row together, one token per step, each row with
its own adapter (lora.make_bank: per-row A and B gathered, nothing merged), its own sampling settings and its own
clock (model.forward_cached: per-row lengths). A new request is prefilled alone, in fixed chunks of CHUNK tokens
(one compilation for every prompt length), then copied into a free row; it joins the running batch between two
decoding steps, so nobody waits for the slowest request. A finished or cancelled request frees its row at once.

Greedy answers do not depend on what else is in the batch: each row's numbers are its own (rows never mix), and
every command decodes through this engine, so `serve` answers as `generate` does.

Threads: `submit`, `cancel`, `add_adapter` and `remove_adapter` may be called from any thread; the decoding runs in
the engine's own thread (`start`), which calls each request's `on_token`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import queue
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemmatune.config import LoraConfig, ModelConfig
from gemmatune.errors import GemmatuneError
from gemmatune.generate import Settings, check_sampling, next_tokens, row_settings, settings
from gemmatune.layout import Params
from gemmatune.lora import make_bank
from gemmatune.model import Cache, init_cache, unstack

CHUNK = 32  # prompt tokens per prefill call; a prompt is left-padded to a multiple of it
DEFAULT_MAX_LEN = 4096

# on_token(token_id, None) for each new token; on_token(None, finish) once at the end: "stop" (a stop id, not
# passed on), "length" (max_tokens reached) or "error" (the engine failed; its message went to stderr).
OnToken = Callable[[int | None, str | None], None]


@dataclasses.dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float | None = None
    top_k: int | None = None
    seed: int = 0


class Request:
    """A submitted request; `cancel` frees its row before the next step, and no `on_token` call follows it."""

    def __init__(self, prompt: list[int], sampling: Sampling, on_token: OnToken, adapter: int) -> None:
        self.prompt, self.sampling, self.adapter = prompt, sampling, adapter
        self._on_token = on_token
        self._lock = threading.Lock()  # held while on_token runs, so cancel() returns only after it
        self.cancelled = False
        self.generated = 0

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True

    def emit(self, token: int | None, finish: str | None = None) -> None:
        with self._lock:
            if not self.cancelled:
                self._on_token(token, finish)


class Engine:
    def __init__(self, cfg: ModelConfig, params: Params, *, stop_ids: Sequence[int], slots: int = 8,
                 max_len: int | None = None, dtype: Any = None) -> None:
        if slots < 1:
            raise GemmatuneError(f"slots is {slots}; the engine needs at least one row.")
        self.cfg = cfg
        self.max_len = min(max_len or DEFAULT_MAX_LEN, cfg.max_position_embeddings)
        if self.max_len < 2:
            raise GemmatuneError(f"max_len is {self.max_len}; a row needs room for a prompt and an answer.")
        self.params = unstack(params)
        self.dtype = jnp.dtype(dtype or self.params["embed"].dtype)
        self.slots = slots
        self.stop_ids = np.array(sorted(set(stop_ids)), np.int64)
        # Room for the left padding that rounds a prompt up to whole chunks.
        self._cache_len = self.max_len + CHUNK - 1
        self._cache = init_cache(cfg, slots, self._cache_len, self.dtype)
        self._rows: list[Request | None] = [None] * slots
        self._tokens = np.zeros(slots, np.int32)  # each row's last token, the next step's input
        self._settings: list[Settings] = [row_settings(0.0, None, None, 0)] * slots
        self._pending: collections.deque[Request] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        # Adapters: name -> bank index; the bank (index 0: the base, no adapter) is rebuilt when it changes.
        self._index: dict[str, int] = {}
        self._entries: list[tuple[Params, LoraConfig] | None] = [None]
        self._bank = make_bank(self._entries)
        # A decoding step ([slots, 1]) and a prompt chunk ([1, CHUNK]) are the same call: two compilations in all.
        self._next = functools.partial(next_tokens, cfg=cfg, dtype=self.dtype)
        self._insert = jax.jit(_insert, donate_argnames=("cache",))

    # --- adapters ------------------------------------------------------------------------------------------

    @property
    def adapter_names(self) -> list[str]:
        with self._cond:
            return list(self._index)

    def add_adapter(self, name: str, adapters: Params, lora_cfg: LoraConfig) -> None:
        """Serve `adapters` (stacked, as convert.peft.load_adapter_for returns them) under `name` from the next
        step on."""
        with self._cond:
            if name in self._index:
                raise GemmatuneError(f"an adapter named {name!r} is already loaded; remove it first or pick "
                                     "another name.")
            self._prune()
            free = [i for i, e in enumerate(self._entries) if e is None and i > 0]
            index = free[0] if free else len(self._entries)
            if index == len(self._entries):
                self._entries.append(None)
            self._entries[index] = (adapters, lora_cfg)
            self._index[name] = index
            self._rebuild()

    def remove_adapter(self, name: str) -> None:
        """Stop accepting requests for `name`; requests already running with it finish with it."""
        with self._cond:
            if name not in self._index:
                raise GemmatuneError(f"no adapter named {name!r} is loaded (loaded: "
                                     f"{', '.join(self._index) or 'none'}).")
            del self._index[name]
            self._prune()
            self._rebuild()

    def _prune(self) -> None:
        """Empty the bank entries of removed adapters that no request uses any more (under the lock)."""
        busy = {r.adapter for r in [*self._rows, *self._pending] if r is not None} | set(self._index.values())
        self._entries = [e if i == 0 or i in busy else None for i, e in enumerate(self._entries)]
        while len(self._entries) > 1 and self._entries[-1] is None:
            self._entries.pop()

    def _rebuild(self) -> None:
        """The bank of the current entries, its size rounded up to a power of two and its rank to a multiple of 8
        (fewer shapes, fewer compilations)."""
        n = 1 << max(len(self._entries) - 1, 0).bit_length()
        rank = max([8] + [-(-e[1].rank // 8) * 8 for e in self._entries if e is not None])
        self._bank = make_bank(self._entries, size=max(n, 1), rank=rank)

    # --- requests ------------------------------------------------------------------------------------------

    def submit(self, prompt: Sequence[int], sampling: Sampling, on_token: OnToken, adapter: str | None = None
               ) -> Request:
        """Queue a request; it starts at the next step with a free row."""
        prompt = [int(t) for t in prompt]
        self.check(prompt, sampling)
        with self._cond:
            if adapter is not None and adapter not in self._index:
                raise GemmatuneError(f"no adapter named {adapter!r} is loaded (loaded: "
                                     f"{', '.join(self._index) or 'none'}).")
            req = Request(prompt, sampling, on_token, 0 if adapter is None else self._index[adapter])
            self._pending.append(req)
            self._cond.notify()
        return req

    def check(self, prompt: Sequence[int], sampling: Sampling) -> None:
        """The GemmatuneError `submit` raises for this request, if any."""
        if not prompt:
            raise GemmatuneError("the prompt is empty; it needs at least one token.")
        if min(prompt) < 0 or max(prompt) >= self.cfg.vocab_size:
            raise GemmatuneError(f"the prompt holds token ids outside the vocabulary [0, {self.cfg.vocab_size}).")
        if sampling.max_tokens < 1:
            raise GemmatuneError(f"max_tokens is {sampling.max_tokens}; it must be at least 1.")
        if len(prompt) + sampling.max_tokens > self.max_len:
            raise GemmatuneError(
                f"the prompt ({len(prompt)} tokens) plus max_tokens ({sampling.max_tokens}) is "
                f"{len(prompt) + sampling.max_tokens}, beyond the context of {self.max_len} tokens; shorten the "
                f"prompt or ask for at most {max(self.max_len - len(prompt), 0)} tokens.")
        check_sampling(sampling.temperature, sampling.top_k, sampling.top_p)

    def stream(self, prompt: Sequence[int], sampling: Sampling, adapter: str | None = None) -> Iterator[int]:
        """The request's tokens as they come (blocking); closing the iterator early cancels the request."""
        q: queue.SimpleQueue[tuple[int | None, str | None]] = queue.SimpleQueue()
        req = self.submit(prompt, sampling, lambda t, f: q.put((t, f)), adapter)
        try:
            while True:
                token, finish = q.get()
                if token is None:
                    if finish == "error":
                        raise GemmatuneError("decoding failed; the error is printed above.")
                    return
                yield token
        finally:
            req.cancel()

    @property
    def active(self) -> int:
        """Requests running or waiting."""
        with self._cond:
            return sum(r is not None for r in self._rows) + len(self._pending)

    # --- the decoding thread -------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="gemmatune-engine", daemon=True)
            self._thread.start()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> Engine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        while True:
            with self._cond:
                for b, r in enumerate(self._rows):  # cancelled rows free their slot
                    if r is not None and r.cancelled:
                        self._rows[b] = None
                while not self._closed and not self._pending and all(r is None for r in self._rows):
                    self._cond.wait()
                if self._closed:
                    break
                admit = []  # (request, its row): the row is taken now, so its adapter counts as in use
                while self._pending and None in self._rows:
                    req = self._pending.popleft()
                    if not req.cancelled:
                        admit.append((req, self._rows.index(None)))
                        self._rows[admit[-1][1]] = req
                bank = self._bank
            try:
                for req, b in admit:
                    self._start_row(req, b, bank)
                if any(r is not None for r in self._rows):
                    self._step(bank)
            except Exception as e:  # noqa: BLE001 - every waiting client gets an answer, never a hang
                print(f"error: decoding failed: {type(e).__name__}: {e}", file=sys.stderr)
                with self._cond:
                    failed = [r for r in self._rows if r is not None] + list(self._pending)
                    self._rows = [None] * self.slots
                    self._pending.clear()
                    self._cache = init_cache(self.cfg, self.slots, self._cache_len, self.dtype)
                for r in failed:
                    r.emit(None, "error")
        with self._cond:
            left = [r for r in self._rows if r is not None] + list(self._pending)
        for r in left:
            r.emit(None, "error")

    def _start_row(self, req: Request, b: int, bank: list[Params]) -> None:
        """Prefill the request's prompt in chunks into a one-row cache, sample its first token and move the row
        into slot b (taken for it)."""
        n = len(req.prompt)
        width = -(-n // CHUNK) * CHUNK
        tokens = np.full((1, width), self.cfg.pad_token_id, np.int32)
        tokens[0, width - n:] = req.prompt  # left padding, masked
        cache = init_cache(self.cfg, 1, self._cache_len, self.dtype, jnp.asarray([width - n]))
        s = row_settings(req.sampling.temperature, req.sampling.top_k, req.sampling.top_p, req.sampling.seed)
        for lo in range(0, width, CHUNK):
            first, cache = self._next(self.params, jnp.asarray(tokens[:, lo:lo + CHUNK]), cache, bank,
                                      jnp.asarray([req.adapter], jnp.int32), *settings([s]), jnp.zeros(1, jnp.int32))
        self._cache = self._insert(self._cache, cache, jnp.asarray(b, jnp.int32))
        self._settings[b] = s
        self._tokens[b] = int(first[0])
        self._deliver(b, int(first[0]))

    def _step(self, bank: list[Params]) -> None:
        """One token for every busy row."""
        busy = [b for b, r in enumerate(self._rows) if r is not None]
        if not busy:
            return
        ids = np.array([r.adapter if r is not None else 0 for r in self._rows], np.int32)
        steps = np.array([r.generated if r is not None else 0 for r in self._rows], np.int32)
        nxt, self._cache = self._next(self.params, jnp.asarray(self._tokens[:, None]), self._cache, bank,
                                      jnp.asarray(ids), *settings(self._settings), jnp.asarray(steps))
        nxt = np.asarray(nxt)  # [slots]; the one host sync per step
        for b in busy:
            self._tokens[b] = nxt[b]
            self._deliver(b, int(nxt[b]))

    def _deliver(self, b: int, token: int) -> None:
        """Token `token` of row b: passed on, or the row's end (a stop id, max_tokens, a cancel)."""
        req = self._rows[b]
        assert req is not None
        if req.cancelled:
            finish = "cancelled"
        elif token in self.stop_ids:
            finish = "stop"
        else:
            req.generated += 1
            req.emit(token)
            finish = "length" if req.generated >= req.sampling.max_tokens else None
        if finish is not None:
            with self._cond:
                self._rows[b] = None
            if finish != "cancelled":
                req.emit(None, finish)


def _insert(cache: Cache, row: Cache, b: jax.Array) -> Cache:
    """The one-row cache `row` copied into row b of `cache`."""
    kv = [{n: c[n].at[b].set(r[n][0]) for n in ("k", "v")} for c, r in zip(cache["kv"], row["kv"], strict=True)]
    return {"kv": kv, "length": cache["length"].at[b].set(row["length"][0]),
            "start": cache["start"].at[b].set(row["start"][0])}
