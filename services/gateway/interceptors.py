"""The gateway's cross-cutting concerns in one server interceptor: status mapping, auth, deadlines.

`GatewayInterceptor` turns whatever the inner layers raise into a clear status, maps the API key to a
tenant (UNAUTHENTICATED otherwise) and fixes the call's deadline (the client's, capped; a default when
the client sent none). Handlers read both through `current()`. Health and reflection pass untouched.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import grpc

from memlong.errors import MemLongError
from memlong.rpc.channel import Deadline
from memlong.rpc.status import status_for

log = logging.getLogger(__name__)

API_KEY_HEADER = "x-api-key"
REASON_KEY = "memlong-reason"  # trailing metadata: which kind of a status it is (errors.TooLarge.reason)
# Downstream statuses passed through as they are (the gateway adds nothing by re-labelling them).
_PASS_THROUGH = frozenset(
    {
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
    }
)


@dataclass(frozen=True)
class CallInfo:
    """Who is calling and until when."""

    tenant: str
    deadline: Deadline


_CALL: contextvars.ContextVar[CallInfo | None] = contextvars.ContextVar("gateway_call", default=None)


def current() -> CallInfo:
    """The serving call's tenant and deadline (set by the interceptors)."""
    info = _CALL.get()
    if info is None:
        raise RuntimeError("no call info: the gateway interceptors are not installed")
    return info


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _wrap(
    handler: grpc.RpcMethodHandler, decorate: Callable[[Callable, bool], Callable]
) -> grpc.RpcMethodHandler:
    """A handler of the same kind whose behavior is decorate(behavior, streams_response)."""
    ser, de = handler.response_serializer, handler.request_deserializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(decorate(handler.unary_unary, False), de, ser)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(decorate(handler.unary_stream, True), de, ser)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(decorate(handler.stream_unary, False), de, ser)
    return grpc.stream_stream_rpc_method_handler(decorate(handler.stream_stream, True), de, ser)


class GatewayInterceptor(grpc.ServerInterceptor):
    """Status mapping, auth and the deadline of every public call, in one wrapper around the handler.

    In the order they apply: whatever the inner layers raise becomes a clear status (domain exceptions
    -> memlong.rpc.status, never UNKNOWN); the API key (metadata x-api-key, or authorization: Bearer KEY)
    maps to a tenant, else UNAUTHENTICATED; the deadline is fixed (the client's, capped at `max_s`;
    `default_s` when it sent none). One interceptor, not one per concern: gRPC runs every interceptor
    for every call, and each one that wraps builds a new handler and adds a frame to every message
    of a stream. Calls outside `prefix` (health, reflection) pass untouched.
    """

    def __init__(self, prefix: str, key_hashes: Mapping[str, str], default_s: float, max_s: float) -> None:
        self.prefix = prefix  # e.g. "/memlong.gateway.v1.Gateway/": only the public API is guarded
        self.key_hashes = dict(key_hashes)  # sha256(key) -> tenant: keys are not kept in memory
        self.default_s = default_s
        self.max_s = max_s

    def tenant_for(self, metadata) -> str | None:
        values = dict(metadata or ())
        key = values.get(API_KEY_HEADER)
        auth = values.get("authorization", "")
        if not key and auth.lower().startswith("bearer "):
            key = auth[7:].strip()
        return self.key_hashes.get(hash_key(key)) if key else None

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or not details.method.startswith(self.prefix):
            return handler
        method = details.method.rsplit("/", 1)[-1]
        tenant = self.tenant_for(details.invocation_metadata)

        def begin(context: grpc.ServicerContext) -> None:
            if tenant is None:
                context.abort(
                    grpc.StatusCode.UNAUTHENTICATED, "missing or unknown API key (metadata x-api-key)"
                )
            remaining = context.time_remaining()
            seconds = self.default_s if remaining is None else min(remaining, self.max_s)
            _CALL.set(CallInfo(tenant, Deadline.after(seconds)))

        def decorate(behavior: Callable, streams: bool) -> Callable:
            if streams:

                def stream(request, context):
                    try:
                        begin(context)
                        yield from behavior(request, context)
                    except Exception as exc:  # noqa: BLE001 - mapped in _abort_for
                        _abort_for(exc, context, method)

                return stream

            def unary(request, context):
                try:
                    begin(context)
                    return behavior(request, context)
                except Exception as exc:  # noqa: BLE001
                    _abort_for(exc, context, method)

            return unary

        return _wrap(handler, decorate)


def _abort_for(exc: Exception, context: grpc.ServicerContext, method: str) -> None:
    """End the call with the status `exc` stands for (re-raise when the call was aborted already)."""
    if isinstance(exc, MemLongError):
        reason = getattr(exc, "reason", None)  # e.g. too_large: HTTP tells it from a quota
        if reason:
            context.set_trailing_metadata(((REASON_KEY, reason),))
        context.abort(status_for(exc), str(exc))
    if isinstance(exc, grpc.RpcError) and exc.code() in _PASS_THROUGH:
        context.abort(exc.code(), exc.details() or exc.code().name)
    if getattr(getattr(context, "_state", None), "aborted", False):
        raise exc  # context.abort() already set the status
    log.exception("internal error in %s", method)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}")
