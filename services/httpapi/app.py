"""The HTTP API (FastAPI): OpenAI's chat and text completions with a session's memory, sessions,
documents, models and health. Every route turns into gateway calls (upstream.py) made from worker
threads (front.py); streamed answers are server-sent events. The session routes are in sessions.py.

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

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from memlong.api.gateway.v1 import gateway_pb2 as pb

from . import shapes
from .config import HttpConfig
from .errors import ERROR_TYPE, ApiError
from .front import Front, error_response, in_thread
from .schemas import ChatCompletionRequest, CompletionRequest
from .sessions import session_routes
from .template import ChatTemplate
from .upstream import Upstream, api_error

log = logging.getLogger(__name__)


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

        def turn(reply: str) -> str:  # the exchange as the model reads it, for the session's memory
            return front.template.render([*messages, {"role": "assistant", "content": reply}], False)

        try:
            return await front.generate(
                body,
                caller,
                chat=True,
                session_id=session_id,
                prompt=prompt,
                max_tokens=max_tokens,
                stops=stops,
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
        return await front.generate(
            body,
            caller,
            chat=False,
            session_id=session_id,
            prompt=text,
            max_tokens=body.max_tokens or config.completion_max_tokens,
            stops=body.stops(),
            remember=(lambda reply: text + reply) if body.remember else None,
        )

    @app.get("/v1/models")
    async def models():
        model = {"id": config.model_id, "object": "model", "created": 0, "owned_by": "memlong"}
        return {"object": "list", "data": [model]}

    app.include_router(session_routes(front))

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
    limit on an append holds there.

    Before a 413 the rest of the body is read and dropped, up to `DRAIN_BYTES` past the limit: a server
    that closes while the client still sends makes the client's kernel reset the connection, and a reset
    discards the 413 the client had not read yet. A body longer than that is cut off."""

    DRAIN_BYTES = 1 << 20

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"].endswith("/documents"):
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            if int(length) <= self.max_bytes + self.DRAIN_BYTES:
                await self._drain(receive, 0)
            err = ApiError(413, f"request body over {self.max_bytes} bytes", code="too_large")
            return await error_response(err)(scope, receive, send)
        seen = 0

        async def limited() -> Any:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                if message.get("more_body"):
                    await self._drain(receive, seen)
                raise _TooLarge()  # an HTTPException: FastAPI passes it to the handler below
            return message

        await self.app(scope, limited, send)

    async def _drain(self, receive: Any, seen: int) -> None:
        """Read and drop the rest of a body still arriving (`seen` bytes of it so far) until it ends, the
        client leaves, or `DRAIN_BYTES` past the limit."""
        while seen <= self.max_bytes + self.DRAIN_BYTES:
            message = await receive()
            seen += len(message.get("body", b""))
            if not message.get("more_body"):  # its end, or http.disconnect
                return


def _renamed(err: ApiError, old: str, new: str) -> ApiError:
    """`err` with the gRPC field name `old` told as the HTTP request's `new`."""
    if err.param == old:
        err.param = new
        err.message = err.message.replace(f"{old}:", f"{new}:", 1)
    return err


__all__ = ["ERROR_TYPE", "Front", "create_app"]
