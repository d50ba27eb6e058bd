"""The one table from domain exceptions to gRPC status codes, and the decorator that applies it.

Client mistakes map to INVALID_ARGUMENT / NOT_FOUND / ALREADY_EXISTS / RESOURCE_EXHAUSTED /
FAILED_PRECONDITION, never UNKNOWN or INTERNAL. Anything else is a server bug: logged with its
traceback and reported as INTERNAL without internals in the message.
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
