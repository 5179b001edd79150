"""The HTTP API (FastAPI): OpenAI-compatible chat completions plus the session endpoints.

    POST   /v1/chat/completions          OpenAI's body; `session` (or header X-Tmem-Session): whose
                                         fast weights answer (none: the bare model); `stream` (SSE)
    POST   /v1/sessions                  create a session ({"id": ...}, or a generated id)
    GET    /v1/sessions                  the caller's sessions
    GET    /v1/sessions/{id}             counters: writes, cards, context tokens, pending writes, bytes
    DELETE /v1/sessions/{id}             reset (no memory, empty context); ?remove=true deletes it
    POST   /v1/sessions/{id}/messages    append turns; crossing l_max (or write: true) queues a memory write
    POST   /v1/sessions/{id}/memories    explicit flashcards, one write (waits for it unless wait=false)
    GET    /v1/sessions/{id}/memories    every flashcard trained into the session
    POST   /v1/sessions/{id}/release     hand the session to whichever server sharing the store asks next
    GET    /v1/models, /v1/models/{id}, /health, /metrics

API keys (`Authorization: Bearer KEY`) map to tenants; session ids are scoped to the tenant, so a
tenant can only ever name its own sessions. Errors are OpenAI-shaped JSON ({"error": {"message",
"type", "param", "code"}}) with a 4xx status for anything the client can fix, and 503 (`server_busy`, with
Retry-After) for a session that cannot be loaded while every loaded one is busy at --max-loaded. A path
with a trailing slash is the same path (no redirect: clients do not follow a POST's 307 with its body).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from tmem_runtime.serve.batcher import Request as BatchRequest
from tmem_runtime.serve.batcher import RowResult
from tmem_runtime.serve.service import (
    ContextLengthError,
    CorruptSessionError,
    LeaseHeldError,
    MemoryService,
    ServerBusyError,
    SessionExistsError,
    SessionGoneError,
    UnknownSessionError,
)
from tmem_runtime.serve.store import check_id

logger = logging.getLogger("tmem.serve")
DEFAULT_TENANT = "default"


class ApiError(Exception):
    """An error answered as OpenAI's body: status, message, type (`kind`), code, and the request field at
    fault (`param`, e.g. "model"; None for none)."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 headers: Mapping[str, str] | None = None, param: str | None = None) -> None:
        self.status, self.message, self.kind, self.code, self.headers = status, message, kind, code, headers
        self.param = param
        super().__init__(message)


# ---------------------------------------------------------------- request bodies
class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str = Field(max_length=100_000)


MessageContent = Annotated[str, Field(max_length=100_000)] | Annotated[list[ContentPart], Field(max_length=256)]


class ChatMessage(BaseModel):
    """One message of a chat. An assistant message's content may be null or absent (OpenAI's, for one that
    made tool calls or refused): an empty assistant turn, as content "". Every other role needs content."""

    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: MessageContent | None = None
    name: str | None = Field(None, max_length=64)

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content: a {self.role} message needs content (a string or a list of text parts); "
                             "only an assistant message may have null content")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


StopText = Annotated[str, Field(min_length=1, max_length=200)]


class StreamOptions(BaseModel):
    """OpenAI's `stream_options` (only with `stream: true`). include_usage: a last chunk of its own (no
    choice) carries the usage, and every other chunk `"usage": null`; without it no chunk has usage."""

    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool | None = Field(None, strict=True)  # a JSON boolean ("true" or 1 is a 400, as OpenAI)


class ChatRequest(BaseModel):
    """OpenAI's chat completion body. Every field's JSON type is checked as OpenAI does (strict, as every
    request body here: "3" or true for max_tokens, "true" or 1 for stream is a 400, never read as 3, 1 or
    True). Decoding is greedy: temperature, top_p and seed are checked (type and OpenAI's range: 400
    otherwise) and change nothing; `stop` (up to 4 texts) ends the answer where the first of them begins;
    what greedy decoding of text cannot honour (several choices, logprobs, tools, a JSON response format,
    logit bias, penalties, audio) is refused (400), never ignored. Any option may be null (as absent)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    session: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream: bool | None = False
    n: int | None = Field(None, ge=1, le=1)
    stream_options: StreamOptions | None = None
    stop: StopText | Annotated[list[StopText], Field(max_length=4)] | None = None
    temperature: float | None = Field(None, ge=0, le=2)  # OpenAI's ranges: checked, then unused (greedy)
    top_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None
    logprobs: bool | None = None  # the options below are refused unless absent, null or neutral
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None
    function_call: str | dict | None = None
    response_format: dict | None = None
    logit_bias: dict | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    modalities: list[str] | None = None
    audio: dict | None = None

    @model_validator(mode="after")
    def _honourable(self) -> ChatRequest:
        no_tools = (None, "none", "auto")
        asked = {
            "logprobs": bool(self.logprobs or self.top_logprobs),
            "tools": bool(self.tools or self.functions) or self.tool_choice not in no_tools
            or self.function_call not in no_tools,
            "response_format": (self.response_format or {}).get("type", "text") != "text",
            "logit_bias": bool(self.logit_bias),
            "frequency_penalty": bool(self.frequency_penalty),
            "presence_penalty": bool(self.presence_penalty),
            "audio": self.audio is not None or any(m != "text" for m in self.modalities or ()),
        }
        if any(asked.values()):
            refused = ", ".join(name for name, given in asked.items() if given)
            raise ValueError(f"{refused}: not supported by this server (greedy decoding of text)")
        if self.stream_options is not None and not self.stream:  # OpenAI's 400
            raise ValueError("stream_options: only allowed when stream is true")
        return self


class Turn(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: str = Field("user", min_length=1, max_length=32)
    name: str | None = Field(None, min_length=1, max_length=64)
    content: str = Field(min_length=1, max_length=20_000)

    @field_validator("role", "name", "content")
    @classmethod
    def _has_text(cls, value: str | None) -> str | None:
        """A speaker and a turn hold text: a blank one (whitespace only) rendered a line with no speaker
        (": hi") or no words ("User:"), stored as a turn of the session."""
        if value is not None and not value.strip():
            raise ValueError("must hold text, not only whitespace")
        return value

    def line(self) -> str:
        """The turn as one context line, `Speaker: text` (the agent's rendering of a turn)."""
        speaker = self.name or self.role.capitalize()
        return " ".join(f"{speaker}: {self.content}".split())


class MessagesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    messages: list[Turn] = Field(default_factory=list, max_length=256)
    date: str | None = Field(None, min_length=1, max_length=200)
    write: bool = False  # then write the working context into memory now, whatever its length
    wait: bool = False

    @field_validator("date")
    @classmethod
    def _one_line(cls, date: str | None) -> str | None:
        """The date as its DATE line renders it: one line (line breaks as spaces, as a turn's), with text. A
        line break in it made context lines of its own, which the card writer read as turns of the session."""
        if date is None:
            return None
        if not (date := " ".join(date.split())):
            raise ValueError("a date needs text (or leave it out)")
        return date

    @model_validator(mode="after")
    def _something_to_do(self) -> MessagesRequest:
        if not self.messages and not self.write:
            raise ValueError("messages needs at least one turn (or write: true, to write the context as it is)")
        return self


class Flashcard(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    question: str = Field(min_length=1, max_length=1000)
    answer: str = Field(min_length=1, max_length=400)


class MemoriesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    memories: list[Flashcard] = Field(min_length=1, max_length=256)
    wait: bool = True


class CreateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    id: str | None = None


# ---------------------------------------------------------------- the app
class SameWithoutSlash:
    """ASGI middleware: a path with trailing slashes is routed as the path without them (POST
    /v1/chat/completions/ is POST /v1/chat/completions), never redirected: OpenAI's API does not redirect,
    and clients do not follow a POST's 307 with its body."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] == "http" and len(path) > 1 and path.endswith("/"):
            scope["path"] = path.rstrip("/") or "/"  # (in place: the outer middleware reads the route it gets)
            if isinstance(scope.get("raw_path"), bytes):
                scope["raw_path"] = scope["raw_path"].rstrip(b"/") or b"/"
        return await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` (declared or streamed) gets 413 before the app
    sees it; a body within the limit is read whole and handed on."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = f"request body over the limit of {self.max_bytes} bytes"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await _send_error(send, 413, too_big)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await _send_error(send, 413, too_big)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # e.g. a streaming response waiting for the client to leave
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        return await self.app(scope, replay, send)


async def _send_error(send, status: int, message: str) -> None:
    body = json.dumps(_error_body(ApiError(status, message))).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(service: MemoryService, model_name: str, api_keys: Mapping[str, str] | None = None,
               max_body: int = 1 << 20) -> FastAPI:
    """The API over `service`. api_keys: key -> tenant (None or empty: no auth, one tenant "default")."""
    keys = {_digest(k): check_id("tenant", t) for k, t in (api_keys or {}).items()}
    app = FastAPI(title="tmem serve", version="1", docs_url=None, redoc_url=None, openapi_url=None,
                  redirect_slashes=False)
    app.add_middleware(BodyLimit, max_bytes=max_body)
    app.add_middleware(SameWithoutSlash)
    _install_error_handlers(app)
    cfg = service.config

    def tenant(authorization: str | None = Header(None), x_api_key: str | None = Header(None)) -> str:
        if not keys:
            return DEFAULT_TENANT
        key = x_api_key or (authorization[7:].strip() if authorization and authorization[:7].lower() == "bearer "
                            else None)
        found = keys.get(_digest(key)) if key else None
        if found is None:
            raise ApiError(401, "missing or invalid API key (Authorization: Bearer KEY)", "authentication_error",
                           "invalid_api_key")
        return found

    def session_id(session: str) -> str:
        return check_id("session", session)

    def get(path: str, **options):
        """A GET route that answers HEAD too (the same status and headers, no body), as HTTP asks of every
        GET resource: e.g. a load balancer's `HEAD /health` check."""
        return app.api_route(path, methods=["GET", "HEAD"], **options)

    @app.middleware("http")
    async def count(request: Request, call_next):
        try:
            response = await call_next(request)
        except Exception as exc:  # unexpected: answered (and counted) here, as Starlette's last resort would close
            response = _respond(_as_api_error(exc))  # the connection after its 500
        route = request.scope.get("route")
        service.metrics.inc("requests_total", route=getattr(route, "path", "unmatched"), code=str(response.status_code))
        return response

    @get("/health")
    def health() -> dict:
        return {"status": "ok", "server": cfg.server_id, "model": model_name, "naive": cfg.naive,
                "sessions_loaded": len(service.convs), "sessions_unloaded_idle": service.upkeep.unloaded}

    @get("/metrics", response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(service.metrics_text(), media_type="text/plain; version=0.0.4")

    served = {"id": model_name, "object": "model", "owned_by": "tmem", "created": 0}

    def check_model(model: str | None) -> None:
        """A request's model: the served one (what /v1/models lists) or none named; else OpenAI's 404."""
        if model is not None and model != model_name:
            raise ApiError(404, f"the model {model!r} does not exist here: this server serves {model_name!r} "
                           "(GET /v1/models)", "invalid_request_error", "model_not_found", param="model")

    @get("/v1/models")
    def models(t: str = Depends(tenant)) -> dict:
        return {"object": "list", "data": [served]}

    @get("/v1/models/{model:path}")
    def model(model: str, t: str = Depends(tenant)) -> dict:
        check_model(model)
        return served

    @app.post("/v1/sessions", status_code=201)
    def create(body: CreateRequest | None = None, t: str = Depends(tenant)) -> dict:
        sid = check_id("session", body.id) if body is not None and body.id is not None else uuid.uuid4().hex
        service.create(t, sid)
        return service.stats(t, sid)

    @get("/v1/sessions")
    def list_sessions(t: str = Depends(tenant)) -> dict:
        return {"object": "list", "data": service.sessions(t)}

    @get("/v1/sessions/{session}")
    def stats(session: str, t: str = Depends(tenant)) -> dict:
        return service.stats(t, session_id(session))

    @app.delete("/v1/sessions/{session}")
    def reset(session: str, remove: bool = False, t: str = Depends(tenant)) -> dict:
        sid = session_id(session)
        if remove:
            service.remove(t, sid)
            return {"id": sid, "removed": True}
        return {"id": sid, "reset": True, **service.reset(t, sid)}

    @app.post("/v1/sessions/{session}/release")
    def release(session: str, t: str = Depends(tenant)) -> dict:
        sid = session_id(session)
        service.release(t, sid)
        return {"id": sid, "released": True, "server": cfg.server_id}

    @app.post("/v1/sessions/{session}/messages")
    async def messages(session: str, body: MessagesRequest, t: str = Depends(tenant)) -> dict:
        sid = session_id(session)
        summary, jobs = await run_in_threadpool(service.append, t, sid, [m.line() for m in body.messages], body.date,
                                                body.write)  # fmt: skip
        out = {"id": sid, **summary, "triggered": [j.id for j in jobs]}
        if body.wait and jobs:
            out["writes_done"] = [await _settled(j.done) for j in jobs]
            out.update(await run_in_threadpool(service.stats, t, sid))
        return out

    @app.post("/v1/sessions/{session}/memories")
    async def remember(session: str, body: MemoriesRequest, t: str = Depends(tenant)):
        sid = session_id(session)
        cards = [(c.question.strip(), c.answer.strip()) for c in body.memories]
        if not all(q and a for q, a in cards):
            raise ApiError(400, "every memory needs a non-blank question and answer")
        job = await run_in_threadpool(service.remember, t, sid, cards)
        if not body.wait:
            return JSONResponse({"id": job.id, "status": "pending"}, status_code=202)
        outcome = await _settled(job.done)
        return {**outcome, "status": "committed" if outcome["error"] is None else "rolled_back"}

    @get("/v1/sessions/{session}/memories")
    def memories(session: str, t: str = Depends(tenant)) -> dict:
        cards = service.memories(t, session_id(session))
        return {"object": "list", "data": [{"question": q, "answer": a} for q, a in cards]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: Request, t: str = Depends(tenant),
                   x_tmem_session: str | None = Header(None)):
        check_model(body.model)
        sid = body.session if body.session is not None else x_tmem_session
        sid = None if sid is None else session_id(sid)  # "" is an invalid id, never the bare model
        max_tokens = body.max_completion_tokens or body.max_tokens  # None: as many as fit (service.answer)
        if max_tokens is not None and max_tokens > cfg.max_tokens:
            raise ApiError(400, f"max_tokens={max_tokens} is over this server's limit of {cfg.max_tokens}")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        on_text = (lambda s: loop.call_soon_threadsafe(pieces.put_nowait, s)) if body.stream else None
        t0 = time.perf_counter()
        stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
        request = await run_in_threadpool(service.answer, t, sid, messages, max_tokens, on_text, stop)
        include_usage = body.stream_options is not None and bool(body.stream_options.include_usage)
        completion = _Completion(model_name, sid, include_usage)
        prompt_tokens = len(request.prefix) + len(request.rows[0].ids)  # the cached chat preamble is in the prompt
        if not body.stream:
            results = await _unless_disconnected(request, http)
            if results is None:
                return Response(status_code=499)  # nobody reads it (nginx's "client closed request")
            result = results[0]
            _count_answer(service, result, t0)
            return completion.response(result, prompt_tokens)
        request.future.add_done_callback(lambda f: loop.call_soon_threadsafe(pieces.put_nowait, None))

        async def events() -> AsyncIterator[str]:
            try:
                yield completion.chunk({"role": "assistant", "content": ""})
                while (piece := await pieces.get()) is not None:
                    yield completion.chunk({"content": piece})
                try:
                    result = request.future.result()[0]
                except Exception as exc:  # the batch failed after the stream began
                    yield f"data: {json.dumps(_error_body(_as_api_error(exc)))}\n\n"
                else:
                    _count_answer(service, result, t0)
                    yield completion.chunk({}, result.finish_reason)
                    if include_usage:
                        yield completion.usage_chunk(result, prompt_tokens)
                yield "data: [DONE]\n\n"
            finally:  # the client went away mid-stream: its row stops at the next token (or never runs)
                request.cancelled.set()
                request.future.cancel()

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache",
                                                                                  "X-Accel-Buffering": "no"})

    return app


class _Completion:
    """OpenAI chat.completion / chat.completion.chunk bodies of one answer."""

    def __init__(self, model: str, session: str | None, include_usage: bool = False) -> None:
        self.id, self.created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        self.model, self.session, self.include_usage = model, session, include_usage

    def _usage(self, result: RowResult, prompt_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": result.tokens,
                "total_tokens": prompt_tokens + result.tokens}

    def response(self, result: RowResult, prompt_tokens: int) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "session": self.session, "usage": self._usage(result, prompt_tokens),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": result.finish_reason, "logprobs": None}]}

    def chunk(self, delta: dict, finish: str | None = None) -> str:
        """One SSE event of the choice's `delta`: `"usage": null` if the usage comes last (include_usage),
        else no usage field (OpenAI's layouts)."""
        return self._event([{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], None)

    def usage_chunk(self, result: RowResult, prompt_tokens: int) -> str:
        """The SSE event OpenAI sends last (before `[DONE]`) with include_usage: no choice, the usage."""
        return self._event([], self._usage(result, prompt_tokens))

    def _event(self, choices: list[dict], usage: dict | None) -> str:
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "session": self.session, "choices": choices}
        if self.include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"


def _count_answer(service: MemoryService, result: RowResult, t0: float) -> None:
    service.metrics.inc("answer_tokens_total", result.tokens)
    service.metrics.observe("answer_seconds", time.perf_counter() - t0)


async def _settled(future):
    return await asyncio.wrap_future(future)


async def _unless_disconnected(request: BatchRequest, http: Request) -> list[RowResult] | None:
    """The request's results, or None if the client disconnects first: the request is then cancelled
    (never batched if it still waits; else its rows stop at their next token)."""
    answer = asyncio.wrap_future(request.future)
    gone = asyncio.ensure_future(_disconnected(http))
    try:
        await asyncio.wait((answer, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if answer.done():
        return answer.result()
    request.cancelled.set()
    answer.cancel()  # cancels the request's future too while it waits in the queue
    return None


async def _disconnected(http: Request) -> None:
    """Returns once the client has disconnected (the body has been read: all that comes is the disconnect)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _as_api_error(exc: Exception) -> ApiError:
    """The client-facing status of an exception from the service (500 only for the unexpected)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, UnknownSessionError):
        return ApiError(404, str(exc), "not_found_error", "session_not_found")
    if isinstance(exc, SessionExistsError):
        return ApiError(409, str(exc), "conflict_error", "session_exists")
    if isinstance(exc, LeaseHeldError):
        return ApiError(409, str(exc), "conflict_error", "session_elsewhere", {"X-Tmem-Server": exc.url or exc.owner})
    if isinstance(exc, SessionGoneError):
        return ApiError(409, str(exc), "conflict_error", "session_gone")
    if isinstance(exc, ServerBusyError):  # (nothing changed: the client may send it again as it is)
        return ApiError(503, str(exc), "server_error", "server_busy",
                        {"Retry-After": str(max(1, math.ceil(exc.waited)))})
    if isinstance(exc, CorruptSessionError):  # the store's paths stay in the server's log
        logger.error("%s", exc)
        return ApiError(500, f"session {exc.session!r} cannot be loaded: its stored files are unreadable (the "
                        "server's log says which); they are kept as they are", "server_error", "session_corrupt")
    if isinstance(exc, ContextLengthError):
        return ApiError(400, str(exc), code="context_length_exceeded")
    if isinstance(exc, ValueError):
        return ApiError(400, str(exc))
    logger.exception("unexpected error", exc_info=exc)
    return ApiError(500, f"internal error: {type(exc).__name__}", "server_error")


def _error_body(err: ApiError) -> dict:
    return {"error": {"message": err.message, "type": err.kind, "param": err.param, "code": err.code}}


def _respond(err: ApiError) -> JSONResponse:
    return JSONResponse(_error_body(err), status_code=err.status, headers=dict(err.headers or {}))


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts, params = [], []
        for e in exc.errors()[:5]:
            loc = [x for x in e.get("loc", ()) if x != "body"]
            where = ".".join(str(x) for x in loc)
            params.append(".".join(f"[{x}]" if isinstance(x, int) else str(x) for x in loc) or None)  # OpenAI's form
            msg = str(e.get("msg")).removeprefix("Value error, ")  # a validator's own ValueError
            if tuple(e.get("loc", ())) == ("body",) and e.get("type") == "model_attributes_type":  # not an object,
                msg = "the body must be a JSON object, sent with Content-Type: application/json"  # or not read as JSON
            parts.append(f"{where}: {msg}" if where else msg)
        # param: the first field at fault, as OpenAI names it ("messages.[0].content")
        return _respond(ApiError(400, "invalid request: " + "; ".join(parts), param=params[0] if params else None))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # Allow: every method of the path (Starlette's names its first route's only)
            headers["Allow"] = ", ".join(sorted({m for route in app.router.routes
                                                 if route.matches(request.scope)[0] != Match.NONE
                                                 for m in getattr(route, "methods", None) or ()}))
        return _respond(ApiError(exc.status_code, str(exc.detail), "invalid_request_error", headers=headers))

    async def known(request: Request, exc: Exception) -> JSONResponse:
        return _respond(_as_api_error(exc))

    for kind in (ApiError, UnknownSessionError, SessionExistsError, LeaseHeldError, SessionGoneError,
                 ServerBusyError, CorruptSessionError, ValueError):
        app.add_exception_handler(kind, known)
