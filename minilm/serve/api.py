"""The OpenAI API subset real clients use, over the batching engine: ``POST /v1/completions``,
``POST /v1/chat/completions`` (``stream: true`` = server-sent events), ``GET /v1/models``, ``GET /health``
(with the engine's batch-size counters) and the web chat page at ``/``.

Every error is ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status (malformed JSON,
a wrong-typed field, an out-of-range control, a prompt that does not fit, an unknown model, a missing or
wrong API key, an OpenAI feature it does not implement such as ``logprobs`` or ``tools``) and the
server goes on serving; other unknown fields are ignored. Beyond OpenAI's fields a request may set
minilm's controls ``top_k``, ``repetition_penalty``, ``ban_window``, ``no_repeat_ngram`` and
``min_tokens`` (the openai client passes them with ``extra_body``); unset controls take
:class:`~minilm.config.SampleConfig`'s defaults, with no minimum length.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from importlib import resources
from typing import Literal

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..chat import instruction_marker, messages_to_turns, render_turns
from ..config import SampleConfig
from . import ServeConfig
from .engine import Engine, Event, Request


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, param=self.param, code=self.code, type=self.type)


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   type: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status)


# --------------------------------------------------------------------------------------------------
# request bodies (strict types: "0.5" is not a number, true is not an integer; unknown fields ignored)


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    ban_window: int | None = None
    no_repeat_ngram: int | None = None
    min_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = 1
    frequency_penalty: float | None = None
    presence_penalty: float | None = None


class CompletionBody(_Body):
    prompt: str | list[str]


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: str
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None


# OpenAI fields this server does not implement: refused when set, rather than silently ignored
UNSUPPORTED = ("echo", "suffix", "logprobs", "top_logprobs", "logit_bias", "best_of", "tools", "tool_choice",
               "functions", "function_call", "response_format")


async def parse(request: HTTPRequest, cls: type[_Body]) -> _Body:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON ({err}); send a JSON object",
                       code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}",
                       code="invalid_json")
    for name in UNSUPPORTED:
        value = data.get(name)
        if value and value != {"type": "text"}:
            raise APIError(400, f"{name} is not supported by minilm-serve; leave it out", param=name,
                           code="unsupported")
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = [str(x) for x in first["loc"] if not str(x).startswith(("str", "list[", "union["))]
        param = ".".join(loc) or None
        value = f" (got {json.dumps(first.get('input'))[:80]})" if first["type"] != "missing" else ""
        raise APIError(400, f"{param}: {first['msg']}{value}", param=param, code="invalid_type"
                       if first["type"] != "missing" else "missing_field") from None


# --------------------------------------------------------------------------------------------------
# the app


@dataclasses.dataclass
class Served:
    """What the handlers share: the engine, its tokenizer and template, the limits."""

    engine: Engine
    cfg: ServeConfig
    template: str
    api_key: str | None = None
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def sample_config(self, body: _Body, prompt_len: int, max_tokens: int | None, stops: list[str]
                      ) -> SampleConfig:
        """The request's controls, checked: a 400 naming the field when one is out of range."""
        ctx = self.engine.context_length
        if prompt_len >= ctx:
            raise APIError(400, f"this model's maximum context length is {ctx} tokens; the prompt has "
                           f"{prompt_len} tokens; shorten it", param="prompt", code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(self.cfg.default_max_tokens, ctx - prompt_len)
        elif not 1 <= max_tokens <= self.cfg.max_tokens:
            raise APIError(400, f"max_tokens must be in 1..{self.cfg.max_tokens}, got {max_tokens}",
                           param="max_tokens", code="invalid_value")
        elif prompt_len + max_tokens > ctx:
            raise APIError(400, f"this model's maximum context length is {ctx} tokens; the prompt has "
                           f"{prompt_len} and max_tokens asks for {max_tokens}; lower max_tokens or "
                           "shorten the prompt", param="max_tokens", code="context_length_exceeded")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(body, name):
                raise APIError(400, f"{name} is not supported; use repetition_penalty (1 = off) or "
                               "ban_window", param=name, code="unsupported")
        if body.n != 1:
            raise APIError(400, f"n must be 1, got {body.n}", param="n", code="unsupported")
        user_stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(user_stops) > 4 or any(not s for s in user_stops):
            raise APIError(400, "stop takes at most 4 non-empty strings", param="stop", code="invalid_value")
        d = SampleConfig()
        values = {"temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k,
                  "repetition_penalty": body.repetition_penalty, "ban_window": body.ban_window,
                  "no_repeat_ngram": body.no_repeat_ngram, "min_new_tokens": body.min_tokens}
        values = {k: (getattr(d, k) if k != "min_new_tokens" else 0) if v is None else v
                  for k, v in values.items()}
        cfg = SampleConfig(**values, max_new_tokens=max_tokens, stop=user_stops + stops, seed=body.seed)
        for problem in cfg.problems():
            field = problem.split(" ", 1)[0]
            param = {"min_new_tokens": "min_tokens", "max_new_tokens": "max_tokens"}.get(field, field)
            raise APIError(400, problem.replace("min_new_tokens", "min_tokens")
                           .replace("max_new_tokens", "max_tokens"), param=param, code="invalid_value")
        return cfg


def create_app(served: Served) -> FastAPI:
    app = FastAPI(title="minilm", docs_url=None, redoc_url=None, openapi_url=None)
    _errors(app)
    _auth(app, served)
    name = served.cfg.model_name

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("minilm").joinpath("static/chat.html").read_text("utf-8"))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": name, "context_length": served.engine.context_length,
                "max_batch": served.engine.max_batch, "auth": served.api_key is not None,
                "engine": served.engine.snapshot()}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": served.created,
                                            "owned_by": "minilm"}]}

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = await parse(request, CompletionBody)
        _check_model(body.model, name)
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not texts:
            raise APIError(400, "prompt must not be an empty list", param="prompt", code="invalid_value")
        tok = served.engine.tokenizer
        prompts = [tok.encode(t, bos=True, eos=False) for t in texts]
        cfg = served.sample_config(body, max(len(p) for p in prompts), body.max_tokens, [])
        return await _respond(served, body, prompts, cfg, "text_completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        body = await parse(request, ChatBody)
        _check_model(body.model, name)
        try:
            turns = messages_to_turns({"role": m.role, "content": m.text()} for m in body.messages)
        except ValueError as err:
            raise APIError(400, str(err), param="messages", code="invalid_value") from None
        ids = render_turns(served.engine.tokenizer, served.template, turns)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        cfg = served.sample_config(body, len(ids), max_tokens, [instruction_marker(served.template)])
        return await _respond(served, body, [ids], cfg, "chat.completion")

    return app


def _check_model(asked: str, name: str) -> None:
    if asked != name:
        raise APIError(404, f"the model {asked!r} does not exist; this server serves {name!r}",
                       param="model", code="model_not_found")


def _errors(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request, err: APIError):
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, err: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return error_response(err.status_code, f"{request.method} {request.url.path}: {err.detail}",
                              code=code)

    @app.exception_handler(Exception)
    async def server_error(request, err: Exception):
        return error_response(500, f"internal error: {type(err).__name__}: {err}", type="server_error")


def _auth(app: FastAPI, served: Served) -> None:
    @app.middleware("http")
    async def check_key(request: HTTPRequest, call_next):
        if served.api_key is not None and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {served.api_key}".encode()):
                return error_response(401, "incorrect or missing API key; send 'Authorization: Bearer "
                                      "<key>'", code="invalid_api_key")
        return await call_next(request)


# --------------------------------------------------------------------------------------------------
# answering: one engine request per prompt, events bridged from the engine thread to the event loop


def _submit(served: Served, prompts: list[list[int]], cfg: SampleConfig
            ) -> tuple[asyncio.Queue, list[Request]]:
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def sink(index: int):
        def on_event(ev: Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, (index, ev))
            except RuntimeError:      # the loop is gone (server shutting down)
                pass
        return on_event

    reqs = [served.engine.submit(Request(p, cfg, sink(i))) for i, p in enumerate(prompts)]
    return events, reqs


def _finish_reason(ev: Event) -> str:
    if ev.finish_reason == "error":
        raise APIError(500, f"decoding failed: {ev.text}", type="server_error")
    return ev.finish_reason


async def _respond(served: Served, body: _Body, prompts: list[list[int]], cfg: SampleConfig, kind: str):
    events, reqs = _submit(served, prompts, cfg)
    meta = {"id": f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "created": int(time.time()), "model": served.cfg.model_name}
    if body.stream:
        return StreamingResponse(_stream(events, reqs, kind, meta), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    done: dict[int, Event] = {}
    try:
        while len(done) < len(reqs):
            index, ev = await events.get()
            if ev.kind == "done":
                done[index] = ev
    finally:
        for r in reqs:
            r.cancel()             # a client that went away stops its rows (a no-op once done)
    choices = []
    for i in range(len(reqs)):
        ev = done[i]
        if kind == "chat.completion":
            choices.append({"index": i, "message": {"role": "assistant", "content": ev.text},
                            "finish_reason": _finish_reason(ev), "logprobs": None})
        else:
            choices.append({"index": i, "text": ev.text, "finish_reason": _finish_reason(ev),
                            "logprobs": None})
    used = sum(ev.tokens for ev in done.values())
    prompt_tokens = sum(len(p) for p in prompts)
    return {**meta, "object": kind, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": used,
                      "total_tokens": prompt_tokens + used}}


async def _stream(events: asyncio.Queue, reqs: list[Request], kind: str, meta: dict) -> AsyncIterator[str]:
    chat = kind == "chat.completion"
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(index: int, text: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
        return f"data: {json.dumps({**meta, 'object': obj, 'choices': [choice]})}\n\n"

    try:
        if chat:
            yield chunk(0, None, None, first=True)
        left = len(reqs)
        while left:
            index, ev = await events.get()
            if ev.kind == "text":
                yield chunk(index, ev.text, None)
                continue
            left -= 1
            if ev.finish_reason == "error":
                err = {"error": {"message": f"decoding failed: {ev.text}", "type": "server_error",
                                 "param": None, "code": None}}
                yield f"data: {json.dumps(err)}\n\n"
                return
            yield chunk(index, None, ev.finish_reason)
        yield "data: [DONE]\n\n"
    finally:
        for r in reqs:
            r.cancel()
