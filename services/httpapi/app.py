"""The HTTP API (FastAPI): OpenAI's chat and text completions with a session's memory, sessions,
documents, models and health. Every route turns into gateway calls (upstream.py) made from worker
threads; streamed answers are server-sent events.

    POST /v1/chat/completions          messages -> the model's chat template -> Generate
    POST /v1/completions               prompt -> Generate; max_tokens=0 + echo: Score (prompt log-probs)
    GET  /v1/models
    POST /v1/sessions                  {"name", "retrieval"} -> CreateSession
    GET  /v1/sessions                  ListSessions
    GET | DELETE /v1/sessions/{id}
    POST /v1/sessions/{id}/documents   raw UTF-8 body streamed into Append; ?stream=true: progress events
    GET  /healthz (process up)   /readyz and /health (the gateway answers SERVING)

Auth: `Authorization: Bearer KEY` (or `x-api-key`), passed to the gateway as is. Deadline: the
header `X-Request-Timeout` (seconds), else the configured default; the gateway caps it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from memlong.decoder.v1 import decoder_pb2 as dpb
from memlong.errors import shown
from memlong.gateway.v1 import gateway_pb2 as pb
from memlong.rpc.channel import Deadline

from . import shapes
from .config import HttpConfig
from .errors import ERROR_TYPE, ApiError
from .schemas import ChatCompletionRequest, CompletionRequest, SessionCreateRequest, _Generation
from .template import ChatTemplate
from .upstream import Caller, Stream, Upstream, api_error

log = logging.getLogger(__name__)

SESSION_HEADER = "x-session-id"
TIMEOUT_HEADER = "x-request-timeout"
MEMORY_MODES = {
    "required": dpb.MEMORY_MODE_REQUIRED,
    "if_available": dpb.MEMORY_MODE_IF_AVAILABLE,
    "off": dpb.MEMORY_MODE_OFF,
}
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class EventStream(StreamingResponse):
    """Server-sent events from an async generator that is closed when the response ends, however it
    ends: a client that goes away runs the generator's `finally` (which cancels the gateway call, and
    so the decoder's work) at once, not whenever the garbage collector gets to it."""

    def __init__(self, events: AsyncIterator[str]) -> None:
        super().__init__(events, media_type="text/event-stream", headers=SSE_HEADERS)
        self._events = events

    async def stream_response(self, send: Any) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self._events.aclose()  # type: ignore[attr-defined]


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers())


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking gateway call off the event loop."""
    return await anyio.to_thread.run_sync(fn, *args)


class Front:
    """What every route shares: settings, the gateway's stubs, the model's chat template."""

    def __init__(self, config: HttpConfig, template: ChatTemplate | None, upstream: Upstream) -> None:
        self.config = config
        self.template = template
        self.upstream = upstream

    # -- request plumbing ---------------------------------------------------------------------------

    def caller(self, request: Request) -> Caller:
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        key = key or request.headers.get("x-api-key", "")
        seconds = self.config.default_timeout_s
        if raw := request.headers.get(TIMEOUT_HEADER):
            try:
                seconds = float(raw)
            except ValueError:
                seconds = -1.0
            if not 0 < seconds < float("inf"):
                raise ApiError(
                    400, f"{TIMEOUT_HEADER}: expected seconds > 0, got {shown(raw)}", param=TIMEOUT_HEADER
                )
        return Caller(key or None, Deadline.after(seconds))

    def check_model(self, model: str) -> None:
        if model != self.config.model_id:
            raise ApiError(
                404,
                f"model {shown(model)} not found; this server serves {self.config.model_id!r}",
                param="model",
                code="model_not_found",
            )

    @staticmethod
    def session_of(body: _Generation, request: Request) -> str | None:
        """The session the request reads: the body's session_id or the X-Session-Id header."""
        header = request.headers.get(SESSION_HEADER)
        if body.session_id and header and body.session_id != header:
            raise ApiError(
                400, f"session_id: the body and {SESSION_HEADER} name different sessions", param="session_id"
            )
        session_id = body.session_id or header or None
        if body.remember and not session_id:
            raise ApiError(400, "remember: needs a session (session_id or X-Session-Id)", param="remember")
        return session_id

    @staticmethod
    def memory_mode(body: _Generation, session_id: str | None) -> int:
        """The body's `memory`; by default required with a session and off without (nothing to read)."""
        if body.memory is not None:
            return MEMORY_MODES[body.memory]
        return dpb.MEMORY_MODE_REQUIRED if session_id else dpb.MEMORY_MODE_OFF

    @staticmethod
    def sampling(body: _Generation, max_tokens: int, stops: list[str]) -> dpb.SamplingParams:
        return dpb.SamplingParams(
            max_new_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,  # OpenAI's default
            top_p=body.top_p or 1.0,
            top_k=body.top_k or 0,
            seed=body.seed or 0,
            has_seed=body.seed is not None,
            stop_strings=stops,
        )

    # -- generation ---------------------------------------------------------------------------------

    async def generate(
        self,
        req: pb.GenerateRequest,
        caller: Caller,
        shape: shapes.Shape,
        out: shapes.TextOut,
        *,
        stream: bool,
        include_usage: bool,
        remember: Callable[[str], str] | None,
    ) -> JSONResponse | EventStream:
        """Run Generate; answer whole or as events. The first token is awaited before answering, so a
        refused request (key, session, limits) gets its HTTP status rather than a failed stream."""
        call = self.upstream.stream("Generate", req, caller)
        try:
            first = await in_thread(call.next)
        except BaseException:
            call.cancel()
            raise
        session_id = req.session_id or None
        if not stream:
            rest = await in_thread(_drain, call)
            msgs = [m for m in (first, *rest) if m is not None]
            for m in msgs:
                out.push(m.token.text)
            out.finish()
            last = msgs[-1].token if msgs else None
            info = shapes.memory_info(session_id, last.memory if last is not None else None)
            if remember is not None:
                info.update(await in_thread(self.remember, caller, session_id, remember(out.visible)))
            use = shapes.usage(_prompt_tokens(last), len(msgs))
            return JSONResponse(shape.full(out.visible, shapes.finish_reason(out, last), use, info))
        events = self._events(call, first, caller, shape, out, include_usage, remember, session_id)
        return EventStream(events)

    async def _events(
        self,
        call: Stream,
        first: Any,
        caller: Caller,
        shape: shapes.Shape,
        out: shapes.TextOut,
        include_usage: bool,
        remember: Callable[[str], str] | None,
        session_id: str | None,
    ) -> AsyncIterator[str]:
        try:
            if shape.chat:
                yield shapes.sse(shape.chunk(role=True))
            msg, last, count = first, None, 0
            while msg is not None:
                last, count = msg.token, count + 1
                if piece := out.push(msg.token.text):
                    yield shapes.sse(shape.chunk(piece))
                if out.stopped:
                    break
                msg = await in_thread(call.next)
            if tail := out.finish():
                yield shapes.sse(shape.chunk(tail))
            info = shapes.memory_info(session_id, last.memory if last is not None else None)
            if remember is not None:
                info.update(await in_thread(self.remember, caller, session_id, remember(out.visible)))
            yield shapes.sse(shape.chunk(finish=shapes.finish_reason(out, last), memlong=info))
            if include_usage:
                yield shapes.sse(shape.usage_chunk(shapes.usage(_prompt_tokens(last), count)))
            yield shapes.SSE_DONE
        except Exception as exc:  # noqa: BLE001 - after the 200: the error goes in the stream
            err = api_error(exc)
            if err is None:
                log.exception("internal error while streaming")
                err = ApiError(500, "internal error; the server logged it")
            yield shapes.sse(err.body())
        finally:
            call.cancel()  # the client left, or we stopped early: the gateway stops the decoder

    def remember(self, caller: Caller, session_id: str, text: str) -> dict[str, Any]:
        """Append `text` to the session's memory (worker thread). Its outcome goes in the reply's
        `memlong` extension: the answer is not lost when storing it fails."""
        try:
            session = self.upstream.unary("GetSession", pb.GetSessionRequest(session_id=session_id), caller)
            last = _drain_last(self.append(session_id, iter([text.encode()]), session.text_bytes, caller))
            return {"remembered": True, "text_bytes": last.text_bytes if last is not None else None}
        except ApiError as err:
            return {"remembered": False, "remember_error": err.body()["error"]}

    def append(self, session_id: str, data: Iterator[bytes], offset: int, caller: Caller) -> Stream:
        """An Append call sending `data` (any piece sizes) from `offset` in pieces of the configured size."""
        size = self.config.upload_piece_bytes

        def pieces() -> Iterator[pb.AppendRequest]:
            pos, buf, sent = offset, b"", False
            for block in data:
                buf += block
                while len(buf) >= size:
                    yield pb.AppendRequest(session_id=session_id, offset=pos, text=buf[:size])
                    pos, buf, sent = pos + size, buf[size:], True
            if buf or not sent:  # an empty body still makes one message: the gateway refuses it
                yield pb.AppendRequest(session_id=session_id, offset=pos, text=buf)

        return self.upstream.stream("Append", pieces(), caller)


def _drain(call: Stream) -> list[Any]:
    out = []
    while (msg := call.next()) is not None:
        out.append(msg)
    return out


def _drain_last(call: Stream) -> Any:
    last = None
    while (msg := call.next()) is not None:
        last = msg
    return last


def _prompt_tokens(last: dpb.GenerateResponse | None) -> int:
    return int(getattr(last, "prompt_tokens", 0)) if last is not None else 0


# ------------------------------------------------------------------------------------------ the app


def create_app(
    config: HttpConfig, template: ChatTemplate | None, upstream: Upstream | None = None
) -> FastAPI:
    """The ASGI app of the HTTP API (served by uvicorn in `server.py`, or by Ray Serve's proxy)."""
    front = Front(config, template, upstream or Upstream(config.gateway, config.gateway_tls))
    app = FastAPI(title="memlong", docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            param, message = None, "the body is not valid JSON"
        else:
            message = f"{param or 'body'}: {first.get('msg', 'invalid')}"
        return error_response(ApiError(400, message, param=param, code="invalid_request"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        code = "too_large" if status == 413 else None
        message = f"request body over {config.max_body_bytes} bytes" if status == 413 else str(exc.detail)
        return error_response(ApiError(status, message, code=code))

    @app.exception_handler(Exception)
    async def _other(request: Request, exc: Exception) -> JSONResponse:
        err = api_error(exc)
        if err is None:
            log.exception("internal error in %s %s", request.method, request.url.path)
            err = ApiError(500, "internal error; the server logged it")
        return error_response(err)

    # -- completions --------------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        body.unsupported()
        front.check_model(body.model)
        caller = front.caller(request)
        if front.template is None:
            raise ApiError(
                400, "this server has no chat template for its model: use /v1/completions", param="messages"
            )
        session_id = front.session_of(body, request)
        messages = [m.for_template() for m in body.messages]
        prompt = front.template.render(messages)  # InvalidArgument (400) when the template refuses them
        stops = body.stops()
        max_tokens = body.max_completion_tokens or body.max_tokens or config.chat_max_tokens
        req = pb.GenerateRequest(
            session_id=session_id or "",
            prompt=prompt.encode(),
            sampling=front.sampling(body, max_tokens, stops),
            memory_mode=front.memory_mode(body, session_id),
        )

        def turn(reply: str) -> str:  # the exchange as the model reads it, for the session's memory
            return front.template.render([*messages, {"role": "assistant", "content": reply}], False)

        try:
            return await front.generate(
                req,
                caller,
                shapes.Shape(True, config.model_id),
                shapes.TextOut(stops),
                stream=body.stream,
                include_usage=bool(body.stream_options and body.stream_options.include_usage),
                remember=turn if body.remember else None,
            )
        except ApiError as err:
            raise _renamed(err, "prompt", "messages") from None

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        body.unsupported()
        front.check_model(body.model)
        caller = front.caller(request)
        session_id = front.session_of(body, request)
        text = body.text()
        mode = front.memory_mode(body, session_id)
        if body.scoring():
            req = pb.ScoreRequest(
                session_id=session_id or "",
                text=text.encode(),
                memory_mode=mode,
                return_logprobs=body.logprobs is not None,
            )
            r = await in_thread(front.upstream.unary, "Score", req, caller)
            info = shapes.memory_info(session_id, r.memory)
            info.update(perplexity=r.perplexity, scored_tokens=r.scored_tokens)
            shape = shapes.Shape(False, config.model_id)
            logprobs = shapes.score_logprobs(r) if body.logprobs is not None else None
            use = shapes.usage(r.scored_tokens + 1, 0)
            return JSONResponse(shape.full(text, "length", use, info, logprobs))
        stops = body.stops()
        req = pb.GenerateRequest(
            session_id=session_id or "",
            prompt=text.encode(),
            sampling=front.sampling(body, body.max_tokens or config.completion_max_tokens, stops),
            memory_mode=mode,
        )
        return await front.generate(
            req,
            caller,
            shapes.Shape(False, config.model_id),
            shapes.TextOut(stops),
            stream=body.stream,
            include_usage=bool(body.stream_options and body.stream_options.include_usage),
            remember=(lambda reply: text + reply) if body.remember else None,
        )

    @app.get("/v1/models")
    async def models():
        model = {"id": config.model_id, "object": "model", "created": 0, "owned_by": "memlong"}
        return {"object": "list", "data": [model]}

    # -- sessions -----------------------------------------------------------------------------------

    @app.post("/v1/sessions")
    async def create_session(request: Request, body: SessionCreateRequest | None = None):
        body = body or SessionCreateRequest()
        req = pb.CreateSessionRequest(name=body.name, retrieval=body.retrieval or "")
        s = await in_thread(front.upstream.unary, "CreateSession", req, front.caller(request))
        return shapes.session_obj(s)

    @app.get("/v1/sessions")
    async def list_sessions(request: Request):
        r = await in_thread(
            front.upstream.unary, "ListSessions", pb.ListSessionsRequest(), front.caller(request)
        )
        return {"object": "list", "data": [shapes.session_obj(s) for s in r.sessions]}

    @app.get("/v1/sessions/{session_id}")
    async def get_session(session_id: str, request: Request):
        req = pb.GetSessionRequest(session_id=session_id)
        return shapes.session_obj(
            await in_thread(front.upstream.unary, "GetSession", req, front.caller(request))
        )

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(session_id: str, request: Request):
        req = pb.DeleteSessionRequest(session_id=session_id)
        await in_thread(front.upstream.unary, "DeleteSession", req, front.caller(request))
        return {"id": session_id, "object": "session.deleted", "deleted": True}

    @app.post("/v1/sessions/{session_id}/documents")
    async def upload(session_id: str, request: Request, offset: int | None = None, stream: bool = False):
        """The body (UTF-8 text, any length up to the gateway's limit) goes to Append as it arrives."""
        caller = front.caller(request)
        if offset is None:  # append at the end
            s = await in_thread(
                front.upstream.unary, "GetSession", pb.GetSessionRequest(session_id=session_id), caller
            )
            offset = s.text_bytes
        call = front.append(session_id, _body_blocks(request, asyncio.get_running_loop()), offset, caller)
        try:
            first = await in_thread(call.next)  # the gateway reads the whole body before answering
        except BaseException:
            call.cancel()
            raise
        if not stream:
            last = first
            for msg in await in_thread(_drain, call):
                last = msg
            return {"id": session_id, "object": "session.document", **shapes.progress_obj(last)}

        async def events() -> AsyncIterator[str]:
            try:
                msg = first
                while msg is not None:
                    yield shapes.sse(shapes.progress_obj(msg))
                    msg = await in_thread(call.next)
            except ApiError as err:
                yield shapes.sse(err.body())
            finally:
                call.cancel()

        return EventStream(events())

    # -- health -------------------------------------------------------------------------------------

    @app.get("/healthz")
    async def live():
        return {"status": "ok"}

    @app.get("/readyz")
    @app.get("/health")
    async def ready():
        if await in_thread(front.upstream.ready):
            return {"status": "ok"}
        err = ApiError(503, "the gateway is not serving")
        return error_response(err)

    app.state.front = front
    return app


class _TooLarge(StarletteHTTPException):
    def __init__(self) -> None:
        super().__init__(413, "request body too large")


class BodyLimit:
    """ASGI middleware: 413 for a JSON body over `max_bytes`, by its Content-Length or, when it has none,
    as soon as more arrives (the body is never held whole). Uploads stream to the gateway, whose
    limit on an append holds there."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"].endswith("/documents"):
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            err = ApiError(413, f"request body over {self.max_bytes} bytes", code="too_large")
            return await error_response(err)(scope, receive, send)
        seen = 0

        async def limited() -> Any:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge()  # an HTTPException: FastAPI passes it to the handler below
            return message

        await self.app(scope, limited, send)


def _body_blocks(request: Request, loop: asyncio.AbstractEventLoop) -> Iterator[bytes]:
    """The request body as a blocking iterator for gRPC's sending thread (read on the event loop)."""
    body = request.stream().__aiter__()

    async def next_block() -> bytes | None:
        try:
            return await body.__anext__()
        except StopAsyncIteration:
            return None

    while (block := asyncio.run_coroutine_threadsafe(next_block(), loop).result()) is not None:
        if block:
            yield block


def _renamed(err: ApiError, old: str, new: str) -> ApiError:
    """`err` with the gRPC field name `old` told as the HTTP request's `new`."""
    if err.param == old:
        err.param = new
        err.message = err.message.replace(f"{old}:", f"{new}:", 1)
    return err


__all__ = ["ERROR_TYPE", "Front", "create_app"]
