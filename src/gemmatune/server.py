"""`gemmatune serve`: an OpenAI-compatible HTTP API over the continuous-batching engine, one base model and any
number of LoRA adapters decoded together.

Routes: GET /health, GET /v1/models (and /v1/models/{name}), POST /v1/chat/completions, POST /v1/completions
(both with `stream: true` as server-sent events), POST /v1/adapters and DELETE /v1/adapters/{name}. A request's
`model` is the base model's name or an adapter's.

Safe by default: it listens on 127.0.0.1 unless told otherwise; with an API key every request but /health needs
`Authorization: Bearer KEY` (compared in constant time); bodies, prompts and max_tokens are bounded; every mistake is
an OpenAI-style JSON error `{"error": {"message", "type", "param", "code"}}` with a 4xx status; a client that goes
away mid-answer cancels its request, which frees its batch slot before the engine's next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hmac
import json
import secrets
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gemmatune.config import ModelConfig, Quantization
from gemmatune.engine import Engine, Sampling
from gemmatune.errors import GemmatuneError
from gemmatune.tokenizer import StreamDecoder, Tokenizer

MAX_BODY = 2**20  # bytes of a request body; a chat far longer than any context fits in 1 MiB of JSON
MAX_STOPS = 4  # stop strings per request, as OpenAI's API allows
PUBLIC = ("/health",)  # the paths that need no API key: load balancers and probes poll them


class ApiError(Exception):
    """An error answered as OpenAI's API answers it: HTTP status and {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


class _Guard:
    """ASGI middleware in front of every route: the API key and the body limit, before a route reads anything.

    The Content-Length is checked up front; a chunked body is counted as it arrives (see _read_json)."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body: int) -> None:
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        error = None
        if self.api_key is not None and scope["path"] not in PUBLIC:
            scheme, _, given = headers.get("authorization", "").partition(" ")
            # compare_digest on bytes: its time does not depend on where the first difference is
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
                error = ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' with "
                                      "the key the server was started with (--api-key)",
                                 kind="authentication_error", code="invalid_api_key")
        length = headers.get("content-length", "")
        if error is None and length.isdigit() and int(length) > self.max_body:
            error = _too_large(self.max_body)
        if error is not None:
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than the server's limit of {limit} bytes",
                    code="request_too_large")


# ---------------------------------------------------------------------------------------------------------------
# Request parameters: each checked for its type and range, named in the error


def _param(body: Mapping[str, Any], name: str, kinds: tuple[type, ...], default: Any = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    # bool is an int to Python, never to JSON's readers
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        want = " or ".join({int: "an integer", float: "a number", str: "a string", bool: "a boolean",
                            list: "a list", dict: "an object"}[k] for k in kinds if not (k is int and float in kinds))
        raise ApiError(400, f"'{name}' must be {want}, got {json.dumps(value)[:80]}", param=name)
    return value


def _number(body: Mapping[str, Any], name: str, default: float | None, ok: Callable[[float], bool],
            rule: str) -> float | None:
    value = _param(body, name, (int, float), default)
    if value is not None and not ok(value):
        raise ApiError(400, f"'{name}' is {value}; it must be {rule}", param=name)
    return value


def _stops(body: Mapping[str, Any]) -> list[str]:
    stop = _param(body, "stop", (str, list), [])
    stops = [stop] if isinstance(stop, str) else stop
    if len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOPS} of them",
                       param="stop")
    return stops


@dataclasses.dataclass(frozen=True)
class _Job:
    """One request, parsed: what to decode and how to answer."""

    prompt: list[int]
    sampling: Sampling
    adapter: str | None
    model: str
    stops: list[str]
    stream: bool
    include_usage: bool


# ---------------------------------------------------------------------------------------------------------------
# Decoding one request: the engine's thread hands tokens to the event loop through a queue


class _Stopper:
    """Text of a streamed answer, cut before the first stop string. Text that might still become the start of a
    stop string is held back until it cannot."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops, self.text, self.sent = list(stops), "", 0

    def feed(self, piece: str) -> tuple[str, bool]:
        """(the text that can be sent now, whether a stop string was reached)."""
        self.text += piece
        # A stop string never starts in the text already sent: it was held back while it could.
        found = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if found:
            self.text = self.text[:min(found)]
            return self._take(len(self.text)), True
        hold = max((k for s in self.stops for k in range(1, min(len(s), len(self.text)) + 1)
                    if self.text.endswith(s[:k])), default=0)
        return self._take(len(self.text) - hold), False

    def finish(self) -> str:
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        out, self.sent = self.text[self.sent:max(end, self.sent)], max(end, self.sent)
        return out


class Api:
    """The routes' state: the engine, the tokenizer, and the names requests may ask for."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, *, base_name: str, model_dir: Path, cfg: ModelConfig,
                 max_body: int = MAX_BODY) -> None:
        self.engine, self.tok, self.base_name, self.model_dir, self.cfg = engine, tokenizer, base_name, model_dir, cfg
        self.max_body = max_body
        self.created = int(time.time())
        self.active: set[Any] = set()  # engine requests not yet finished or cancelled (reported by /health)

    # -- routes ---------------------------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "active_requests": len(self.active)})

    def _card(self, name: str) -> dict[str, Any]:
        parent = None if name == self.base_name else self.base_name
        return {"id": name, "object": "model", "created": self.created, "owned_by": "gemmatune", "root": name,
                "parent": parent}

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._card(n) for n in self._names()]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in self._names():
            raise _unknown_model(name, self._names())
        return JSONResponse(self._card(name))

    async def chat(self, request: Request) -> Response:
        body = await self._read_json(request)
        messages = _param(body, "messages", (list,))
        if not messages:
            raise ApiError(400, "'messages' is required: a non-empty list of {\"role\", \"content\"} objects",
                           param="messages")
        try:
            prompt = self.tok.encode_chat(messages, add_generation_prompt=True)
        except GemmatuneError as e:
            raise ApiError(400, str(e), param="messages") from e
        job = self._job(body, prompt, "messages")
        return await self._answer(request, job, "chatcmpl", "chat.completion")

    async def completions(self, request: Request) -> Response:
        body = await self._read_json(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]  # the client libraries send a batch of one this way
        if isinstance(prompt, str):
            ids = [self.tok.bos_id] + self.tok.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(i, int) and not isinstance(i, bool)
                                                         for i in prompt):
            ids = list(prompt)  # token ids, used as given (the caller adds <bos>)
            if not all(0 <= i < self.cfg.vocab_size for i in ids):
                raise ApiError(400, f"'prompt' holds token ids outside the vocabulary [0, {self.cfg.vocab_size})",
                               param="prompt")
        else:
            raise ApiError(400, "'prompt' must be a string or a non-empty list of token ids (one prompt per "
                                "request)", param="prompt")
        return await self._answer(request, self._job(body, ids, "prompt"), "cmpl", "text_completion")

    async def add_adapter(self, request: Request) -> Response:
        from gemmatune.convert.peft import load_adapter_for

        body = await self._read_json(request)
        name, path = _param(body, "name", (str,)), _param(body, "path", (str,))
        if not name or not path:
            raise ApiError(400, "send {\"name\": NAME, \"path\": ADAPTER_DIRECTORY}", param="name" if not name
                           else "path")
        if name == self.base_name or name in self.engine.adapter_names:
            raise ApiError(409, f"the model name {name!r} is taken; remove it first (DELETE /v1/adapters/{name}) "
                                "or pick another name", param="name", code="model_exists")

        def load() -> None:  # reading the files and building the adapter bank block: off the event loop
            self.engine.add_adapter(name, *load_adapter_for(self.model_dir, path, self.cfg))

        try:
            await run_in_threadpool(load)
        except GemmatuneError as e:
            if name in self.engine.adapter_names:  # another request added the name meanwhile
                raise ApiError(409, str(e), param="name", code="model_exists") from e
            raise ApiError(400, str(e), param="path") from e
        return JSONResponse(self._card(name))

    async def remove_adapter(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name == self.base_name:
            raise ApiError(400, f"{name!r} is the base model; only adapters can be removed", param="name")
        if name not in self.engine.adapter_names:
            raise _unknown_model(name, self._names())
        self.engine.remove_adapter(name)  # requests already decoding with it finish
        return JSONResponse({"id": name, "object": "model", "deleted": True})

    # -- parsing ----------------------------------------------------------------------------------------------------

    async def _read_json(self, request: Request) -> dict[str, Any]:
        data = bytearray()
        try:
            async for chunk in request.stream():
                data += chunk
                if len(data) > self.max_body:  # a chunked upload without Content-Length
                    raise _too_large(self.max_body)
        except ClientDisconnect:
            raise ApiError(400, "the client closed the connection before sending the whole body") from None
        try:
            body = json.loads(data)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def _names(self) -> list[str]:
        return [self.base_name, *self.engine.adapter_names]

    def _job(self, body: dict[str, Any], prompt: list[int], prompt_param: str) -> _Job:
        model = _param(body, "model", (str,))
        if model is None:
            raise ApiError(400, f"'model' is required: one of {', '.join(map(repr, self._names()))}", param="model")
        if model != self.base_name and model not in self.engine.adapter_names:
            raise _unknown_model(model, self._names())
        n = _param(body, "n", (int,), 1)
        if n != 1:
            raise ApiError(400, f"'n' is {n}; this server answers one choice per request (n = 1)", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if _number(body, name, 0, lambda v: True, "") != 0:
                raise ApiError(400, f"'{name}' is not supported (only 0)", param=name)
        if _param(body, "logprobs", (bool, int), False):
            raise ApiError(400, "'logprobs' is not supported", param="logprobs")
        limit = self.engine.max_len
        if len(prompt) >= limit:
            raise ApiError(400, f"the prompt is {len(prompt)} tokens; this server's context is {limit} tokens "
                                "(prompt + answer). Shorten the prompt.", param=prompt_param,
                           code="context_length_exceeded")
        if body.get("max_completion_tokens") is not None:
            key = "max_completion_tokens"
        else:
            key = "max_tokens"
        room = limit - len(prompt)
        max_tokens = _param(body, key, (int,), room)  # by default: as long as the context allows
        if not 1 <= max_tokens <= room:
            raise ApiError(400, f"'{key}' is {max_tokens}; with this {len(prompt)}-token prompt it must be between "
                                f"1 and {room} (the context is {limit} tokens, prompt + answer)", param=key,
                           code="context_length_exceeded" if max_tokens > room else None)
        temperature = _number(body, "temperature", 1.0, lambda v: 0 <= v <= 2, "between 0 and 2 (0: greedy)")
        top_p = _number(body, "top_p", None, lambda v: 0 < v <= 1, "in (0, 1]")
        top_k = _param(body, "top_k", (int,))  # not OpenAI's, but vLLM's and llama.cpp's servers take it
        if top_k is not None and top_k < 1 and top_k != -1:
            raise ApiError(400, f"'top_k' is {top_k}; it must be at least 1 (-1: no cut)", param="top_k")
        # Without a seed each sampled answer differs, as OpenAI's do; with one it is repeatable, and the same as
        # `gemmatune generate --seed` (generate.row_settings folds any integer seed, and any top_k, into the engine's).
        seed = _param(body, "seed", (int,))
        if seed is not None and not -2**63 <= seed < 2**64:
            raise ApiError(400, f"'seed' is {seed}; it must fit in 64 bits", param="seed")
        seed = secrets.randbits(31) if seed is None else seed
        stream = _param(body, "stream", (bool,), False)
        options = _param(body, "stream_options", (dict,), {})
        include_usage = _param(options, "include_usage", (bool,), False)
        sampling = Sampling(max_tokens=max_tokens, temperature=float(temperature), seed=seed,
                            top_p=None if top_p is None else float(top_p),
                            top_k=None if top_k in (None, -1) else top_k)
        return _Job(prompt, sampling, None if model == self.base_name else model, model, _stops(body), stream,
                    include_usage)

    # -- answering --------------------------------------------------------------------------------------------------

    def _submit(self, job: _Job) -> tuple[Any, asyncio.Queue]:
        """Start decoding; the queue gets (token_id, None) per token and (None, finish) at the end."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def on_token(token: int | None, finish: str | None) -> None:  # on the engine's thread: must not block
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (token, finish))
            except RuntimeError:  # the event loop has closed (the server is stopping): nobody is listening
                pass

        try:
            req = self.engine.submit(job.prompt, job.sampling, on_token, adapter=job.adapter)
        except GemmatuneError as e:
            raise ApiError(404 if job.adapter and job.adapter not in self.engine.adapter_names else 400,
                           str(e)) from e
        self.active.add(req)
        return req, queue

    async def _tokens(self, req: Any, queue: asyncio.Queue, job: _Job, request: Request
                      ) -> AsyncIterator[tuple[str, str | None, int]]:
        """(text to send, finish reason or None, tokens so far) as the answer grows; text cut at a stop string.
        Leaving early (the client went away, a stop string) cancels the engine's request."""
        decoder, stopper, count = StreamDecoder(self.tok), _Stopper(job.stops), 0
        try:
            while True:
                if job.stream:
                    token, finish = await queue.get()  # a disconnect cancels this task (StreamingResponse)
                else:
                    try:  # nothing is sent until the end, so watch for the client leaving meanwhile
                        token, finish = await asyncio.wait_for(queue.get(), 0.5)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            return
                        continue
                if token is None:
                    self.active.discard(req)
                    if finish == "error":  # the engine failed (its message is on the server's stderr)
                        raise ApiError(500, "decoding failed on the server; see its log", kind="server_error")
                    yield stopper.feed(decoder.flush())[0] + stopper.finish(), finish or "stop", count
                    return
                count += 1
                text, stopped = stopper.feed(decoder.feed(token))
                if stopped:
                    yield text, "stop", count
                    return
                if text:
                    yield text, None, count
        finally:
            if req in self.active:  # not finished by the engine: free its slot now
                req.cancel()
                self.active.discard(req)

    async def _answer(self, request: Request, job: _Job, prefix: str, kind: str) -> Response:
        rid, created = f"{prefix}-{uuid.uuid4().hex}", int(time.time())
        chat = kind == "chat.completion"
        # Submitted before the response starts: a request the engine refuses still gets a 4xx status, not a
        # broken stream.
        req, queue = self._submit(job)

        def usage(count: int) -> dict[str, int]:
            return {"prompt_tokens": len(job.prompt), "completion_tokens": count,
                    "total_tokens": len(job.prompt) + count}

        def choice(text: str, finish: str | None) -> dict[str, Any]:  # a whole answer
            if chat:
                return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                        "finish_reason": finish}
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

        def chunk(delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:  # a piece of a stream
            if chat:
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"index": 0, "text": delta.get("content", ""), "logprobs": None, "finish_reason": finish}

        def obj(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
            return {"id": rid, "object": kind + (".chunk" if chat and job.stream else ""), "created": created,
                    "model": job.model, "choices": choices, **extra}

        if not job.stream:
            parts, finish, count = [], None, 0
            async for piece in self._tokens(req, queue, job, request):
                parts.append(piece[0])
                _, finish, count = piece
            if finish is None:  # the client went away; nobody reads this
                return Response(status_code=499)
            return JSONResponse(obj([choice("".join(parts), finish)], usage=usage(count)))

        def event(data: dict[str, Any]) -> str:
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        async def events() -> AsyncIterator[str]:
            if chat:  # the role first, as OpenAI's streams start
                yield event(obj([chunk({"role": "assistant", "content": ""})]))
            count = 0
            try:
                async for piece in self._tokens(req, queue, job, request):
                    text, finish, count = piece
                    if text:
                        yield event(obj([chunk({"content": text})]))
                    if finish is not None:
                        yield event(obj([chunk({}, finish)]))
            except ApiError as e:  # the status is sent already: the error goes in the stream, as OpenAI's do
                yield event(json.loads(e.response().body))
                yield "data: [DONE]\n\n"
                return
            if job.include_usage:
                yield event(obj([], usage=usage(count)))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _unknown_model(name: str, names: list[str]) -> ApiError:
    return ApiError(404, f"the model {name!r} does not exist; this server has {', '.join(map(repr, names))}",
                    param="model", code="model_not_found")


def create_app(api: Api, api_key: str | None = None) -> ASGIApp:
    """The ASGI application: the routes of `api` behind the API key and the body limit."""

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return exc.response()

    async def http_error(request: Request, exc: Exception) -> Response:  # unknown path, wrong method
        assert isinstance(exc, HTTPException)
        return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                        code="not_found" if exc.status_code == 404 else None).response()

    async def internal(request: Request, exc: Exception) -> Response:
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error").response()

    routes = [Route("/health", api.health, methods=["GET"]),
              Route("/v1/models", api.models, methods=["GET"]),
              Route("/v1/models/{name:path}", api.model, methods=["GET"]),
              Route("/v1/chat/completions", api.chat, methods=["POST"]),
              Route("/v1/completions", api.completions, methods=["POST"]),
              Route("/v1/adapters", api.add_adapter, methods=["POST"]),
              Route("/v1/adapters/{name:path}", api.remove_adapter, methods=["DELETE"])]
    app = Starlette(routes=routes, exception_handlers={ApiError: api_error, HTTPException: http_error,
                                                       Exception: internal})
    return _Guard(app, api_key, api.max_body)


# ---------------------------------------------------------------------------------------------------------------
# The server process: load, bind, run


def adapter_specs(specs: Sequence[str]) -> dict[str, str]:
    """--adapter NAME=PATH (or PATH alone: named after its directory) -> {name: path}; names unique."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec.rstrip("/")).name, spec
        if not name or not path:
            raise GemmatuneError(f"--adapter {spec!r}: expected NAME=PATH or a directory path")
        if name in out:
            raise GemmatuneError(f"--adapter {spec!r}: the name {name!r} is given twice; name them NAME=PATH")
        out[name] = path
    return out


def model_name(spec: str) -> str:
    """The name the base model is served under: --model as given, a local path by its directory's name."""
    path = Path(spec).expanduser()
    return path.resolve().name if path.exists() else spec


@dataclasses.dataclass
class Server:
    """A loaded, bound server: `run()` serves until stopped (Ctrl-C, or `stop()` from another thread)."""

    engine: Engine
    api: Api
    uvicorn: uvicorn.Server
    sock: socket.socket
    url: str

    def run(self) -> None:
        try:
            self.uvicorn.run(sockets=[self.sock])
        finally:
            self.engine.close()
            self.sock.close()

    def stop(self) -> None:
        self.uvicorn.should_exit = True


def _bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise GemmatuneError(f"--host {host!r}: not an address of this machine ({e.strerror})") from e
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        why = "is in use (another server?); pick a free one with --port" if e.errno == errno.EADDRINUSE else \
            f"cannot be used ({e.strerror})"
        raise GemmatuneError(f"port {port} on {host} {why}") from e
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def open_server(model: str, adapters: Mapping[str, str] | None = None, *, host: str = "127.0.0.1", port: int = 8000,
                api_key: str | None = None, dtype: str = "auto", slots: int = 8, max_len: int | None = None,
                max_body: int = MAX_BODY, log_level: str = "warning", quant: Quantization | None = None) -> Server:
    """Load the base model and its adapters, start the engine and bind the port (0: any free one); serve with
    `.run()`. Every adapter is checked before the port is taken."""
    from gemmatune.convert import load_model, model_config
    from gemmatune.convert.peft import load_adapter_for
    from gemmatune.hub import resolve_model
    from gemmatune.tokenizer import load_tokenizer

    model_dir = resolve_model(model)
    tok = load_tokenizer(model_dir)
    cfg = model_config(model_dir)
    base = model_name(model)
    loaded = {}
    for name, path in (adapters or {}).items():
        if name == base:
            raise GemmatuneError(f"--adapter {name}={path}: {name!r} is the base model's name; name it otherwise")
        loaded[name] = load_adapter_for(model_dir, path, cfg)
    sock = _bind(host, port)
    try:
        cfg, params = load_model(model_dir, dtype=dtype, stacked=False, quant=quant)  # decoding's layout: no copy
        engine = Engine(cfg, params, stop_ids=(tok.eos_id, tok.end_of_turn_id), slots=slots, max_len=max_len)
        for name, (ab, lora_cfg) in loaded.items():
            engine.add_adapter(name, ab, lora_cfg)
    except BaseException:
        sock.close()
        raise
    api = Api(engine, tok, base_name=base, model_dir=model_dir, cfg=cfg, max_body=max_body)
    config = uvicorn.Config(create_app(api, api_key), log_level=log_level, timeout_graceful_shutdown=5,
                            lifespan="off")
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    engine.start()
    return Server(engine, api, uvicorn.Server(config), sock, f"http://{shown}:{bound_port}")


def serve(model: str, adapters: Mapping[str, str], **kw: Any) -> None:
    """`gemmatune serve`: load, bind, say where, serve until Ctrl-C."""
    t0 = time.perf_counter()
    server = open_server(model, adapters, **kw)
    names = ", ".join([server.api.base_name, *server.engine.adapter_names])
    print(f"loaded in {time.perf_counter() - t0:.1f}s; serving {names} on {server.url}/v1 (OpenAI API; "
          f"{'API key required' if kw.get('api_key') else 'no API key'}); Ctrl-C stops", file=sys.stderr)
    server.run()
