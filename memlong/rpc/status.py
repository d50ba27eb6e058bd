"""The one table from domain exceptions to gRPC status codes, and the decorator that applies it.

Client mistakes map to INVALID_ARGUMENT / NOT_FOUND / ALREADY_EXISTS / RESOURCE_EXHAUSTED /
FAILED_PRECONDITION, never UNKNOWN or INTERNAL. Anything else is a server bug: logged with its
traceback and reported as INTERNAL without internals in the message. `RequestDecoding` does the same
for requests that do not parse: INVALID_ARGUMENT, not gRPC's INTERNAL.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from memlong import errors

log = logging.getLogger(__name__)

STATUS_TABLE: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.DataLoss, grpc.StatusCode.DATA_LOSS),
    (errors.ModelUnavailable, grpc.StatusCode.FAILED_PRECONDITION),
)

# gRPC status code -> exception raised on the client side (inverse of the table).
EXCEPTION_FOR_CODE: dict[grpc.StatusCode, type[Exception]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.DATA_LOSS: errors.DataLoss,
}


def status_for(exc: BaseException) -> grpc.StatusCode:
    """gRPC code for an exception (INTERNAL for anything not in the table)."""
    for kind, code in STATUS_TABLE:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


def _abort(context: grpc.ServicerContext, exc: Exception, method: str) -> None:
    if isinstance(exc, grpc.RpcError) and exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
        # A downstream call ran out of the time this call handed it: this call is out of time too.
        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"{method}: a downstream call ran out of time")
    code = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("internal error in %s", method)
        context.abort(code, f"internal error in {method}")
    context.abort(code, str(exc))


F = TypeVar("F", bound=Callable[..., Any])


def grpc_errors(method: F) -> F:
    """Decorate a servicer method (unary or streaming reply) so core exceptions become statuses."""
    name = method.__name__
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                yield from method(self, request, context)
            except errors.MemLongError as exc:
                _abort(context, exc, name)
            except Exception as exc:  # noqa: BLE001 - mapped to INTERNAL, logged
                if _already_aborted(context):
                    raise
                _abort(context, exc, name)

        return stream  # type: ignore[return-value]

    @functools.wraps(method)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except errors.MemLongError as exc:
            _abort(context, exc, name)
        except Exception as exc:  # noqa: BLE001
            if _already_aborted(context):
                raise
            _abort(context, exc, name)

    return unary  # type: ignore[return-value]


def _already_aborted(context: grpc.ServicerContext) -> bool:
    # context.abort() raises a bare Exception after recording the status; keep that status.
    return bool(getattr(getattr(context, "_state", None), "aborted", False))


def raise_for_rpc_error(err: grpc.RpcError) -> None:
    """Client side: re-raise a gRPC error as the matching domain exception (or leave it)."""
    code = err.code()
    kind = EXCEPTION_FOR_CODE.get(code)
    if kind is None:
        raise err
    detail = err.details() or ""
    if kind is errors.InvalidArgument:
        field, _, msg = detail.partition(": ")
        raise errors.InvalidArgument(field, msg) from err
    raise kind(detail) from err


# ------------------------------------------------------------------------------- request decoding


class _Undecodable:
    """What a request that does not parse becomes, so that the handler can refuse it with a status."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _refuse(context: grpc.ServicerContext, request: _Undecodable) -> None:
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid message ({request.error})")


class RequestDecoding(grpc.ServerInterceptor):
    """A request that does not parse (corrupt bytes, a string field that is not UTF-8) is INVALID_ARGUMENT.

    gRPC answers a deserializer's exception with INTERNAL "Exception deserializing request!", which
    reads as a server bug. Here the deserializer returns a marker instead, and the handler aborts when
    it meets one: before the servicer runs for a unary request, at that message for a stream. Install
    it innermost, so that authentication still answers first.
    """

    def intercept_service(self, continuation, details):  # noqa: ANN001
        handler = continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer

        def deserialize(data: bytes) -> Any:
            try:
                return parse(data)
            except Exception as exc:  # noqa: BLE001 - any parse failure is the client's bytes
                return _Undecodable(exc)

        handler = handler._replace(request_deserializer=deserialize)
        if handler.unary_unary:
            return handler._replace(unary_unary=_checked_unary(handler.unary_unary))
        if handler.unary_stream:
            return handler._replace(unary_stream=_checked_unary_stream(handler.unary_stream))
        if handler.stream_unary:
            return handler._replace(stream_unary=_checked_stream(handler.stream_unary))
        return handler._replace(stream_stream=_checked_stream(handler.stream_stream))


def _checked_unary(behavior: Callable) -> Callable:
    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, _Undecodable):
            _refuse(context, request)
        return behavior(request, context)

    return unary


def _checked_unary_stream(behavior: Callable) -> Callable:
    def stream(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, _Undecodable):
            _refuse(context, request)
        yield from behavior(request, context)

    return stream


def _checked_stream(behavior: Callable) -> Callable:
    def requests(iterator: Any, context: grpc.ServicerContext) -> Any:
        for request in iterator:
            if isinstance(request, _Undecodable):
                _refuse(context, request)
            yield request

    def call(iterator: Any, context: grpc.ServicerContext) -> Any:
        return behavior(requests(iterator, context), context)

    return call
