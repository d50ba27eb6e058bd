"""What every route of the HTTP API shares: the request's caller (key, deadline), the gateway's stubs,
the model's chat template, and Generate answered whole or as server-sent events (`Front`); running
blocking gateway calls off the event loop; event streams that end the gateway call with the response.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from memlong.api.decoder.v1 import decoder_pb2 as dpb
from memlong.api.gateway.v1 import gateway_pb2 as pb
from memlong.errors import shown
from memlong.rpc.channel import Deadline

from . import shapes
from .config import HttpConfig
from .errors import ApiError
from .schemas import _Generation
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
        body: _Generation,
        caller: Caller,
        *,
        chat: bool,
        session_id: str | None,
        prompt: str,
        max_tokens: int,
        stops: list[str],
        remember: Callable[[str], str] | None,
    ) -> JSONResponse | EventStream:
        """Run Generate on `prompt` with the body's sampling, memory and streaming options; answer whole
        or as events (a chat.completion or a text_completion). The first token is awaited before
        answering, so a refused request (key, session, limits) gets its HTTP status rather than a failed
        stream. `remember`: the exchange to append to the session's memory, given the reply."""
        req = pb.GenerateRequest(
            session_id=session_id or "",
            prompt=prompt.encode(),
            sampling=self.sampling(body, max_tokens, stops),
            memory_mode=self.memory_mode(body, session_id),
        )
        shape, out = shapes.Shape(chat, self.config.model_id), shapes.TextOut(stops)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        call = self.upstream.stream("Generate", req, caller)
        try:
            first = await in_thread(call.next)
        except BaseException:
            call.cancel()
            raise
        if not body.stream:
            rest = await in_thread(drain, call)
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
            last = drain_last(self.append(session_id, iter([text.encode()]), session.text_bytes, caller))
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


def drain(call: Stream) -> list[Any]:
    """Every message left in `call` (blocking: run it in a worker thread)."""
    out = []
    while (msg := call.next()) is not None:
        out.append(msg)
    return out


def drain_last(call: Stream) -> Any:
    """The last message left in `call`, None if none (blocking: run it in a worker thread)."""
    last = None
    while (msg := call.next()) is not None:
        last = msg
    return last


def _prompt_tokens(last: dpb.GenerateResponse | None) -> int:
    return int(getattr(last, "prompt_tokens", 0)) if last is not None else 0
