"""The session routes of the HTTP API: create, list, get and delete sessions, and upload documents
into one (the body streamed into Append as it arrives; `?stream=true` reports progress as events).

    POST /v1/sessions                  {"name", "retrieval"} -> CreateSession
    GET  /v1/sessions                  ListSessions
    GET | DELETE /v1/sessions/{id}
    POST /v1/sessions/{id}/documents   raw UTF-8 body streamed into Append; ?stream=true: progress events
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

from fastapi import APIRouter, Request

from memlong.api.gateway.v1 import gateway_pb2 as pb

from . import shapes
from .errors import ApiError
from .front import EventStream, Front, drain_last, in_thread
from .schemas import SessionCreateRequest


def session_routes(front: Front) -> APIRouter:
    """The session routes, served with `front`'s gateway stubs."""
    router = APIRouter()

    @router.post("/v1/sessions")
    async def create_session(request: Request, body: SessionCreateRequest | None = None):
        body = body or SessionCreateRequest()
        req = pb.CreateSessionRequest(name=body.name, retrieval=body.retrieval or "")
        s = await in_thread(front.upstream.unary, "CreateSession", req, front.caller(request))
        return shapes.session_obj(s)

    @router.get("/v1/sessions")
    async def list_sessions(request: Request):
        r = await in_thread(
            front.upstream.unary, "ListSessions", pb.ListSessionsRequest(), front.caller(request)
        )
        return {"object": "list", "data": [shapes.session_obj(s) for s in r.sessions]}

    @router.get("/v1/sessions/{session_id}")
    async def get_session(session_id: str, request: Request):
        req = pb.GetSessionRequest(session_id=session_id)
        return shapes.session_obj(
            await in_thread(front.upstream.unary, "GetSession", req, front.caller(request))
        )

    @router.delete("/v1/sessions/{session_id}")
    async def delete_session(session_id: str, request: Request):
        req = pb.DeleteSessionRequest(session_id=session_id)
        await in_thread(front.upstream.unary, "DeleteSession", req, front.caller(request))
        return {"id": session_id, "object": "session.deleted", "deleted": True}

    @router.post("/v1/sessions/{session_id}/documents")
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
            first = await in_thread(call.next)  # the first progress, or the error that ended the upload
        except BaseException:
            call.cancel()
            raise
        if not stream:
            last = await in_thread(drain_last, call) or first
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

    return router


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
