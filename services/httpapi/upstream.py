"""The gateway's gRPC API as the HTTP front calls it: the caller's API key and deadline on every call.

The front keeps no state of its own: it forwards the key it was given (the gateway authenticates it
and finds the tenant) and a timeout from the request's deadline, over one shared channel from the
channel factory. Failures come back as `ApiError` (errors.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memlong.api.gateway.v1 import gateway_pb2_grpc as pb_grpc
from memlong.client import GATEWAY_SERVICE, IDEMPOTENT
from memlong.errors import MemLongError
from memlong.rpc.channel import DEFAULT_MAX_MESSAGE_BYTES, ChannelOptions, Deadline, get_channel
from memlong.rpc.tls import TlsConfig

from .errors import ApiError, from_exception, from_rpc_error


@dataclass(frozen=True)
class Caller:
    """Who asks (their API key, as sent; None when they sent none) and until when."""

    api_key: str | None
    deadline: Deadline

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("x-api-key", self.api_key),) if self.api_key else ()

    def timeout(self) -> float:
        """Seconds left for the next call; ApiError 504 when none are."""
        try:
            return self.deadline.timeout()
        except MemLongError as exc:
            raise from_exception(exc) from None


class Stream:
    """A server-streaming gateway call read one message at a time (from a worker thread)."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._it: Iterator[Any] = iter(call)

    def next(self) -> Any | None:
        """The next message, or None at the end; ApiError when the call fails."""
        try:
            return next(self._it, None)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def cancel(self) -> None:
        """Stop the call (the client went away): the gateway cancels the decoder's work too."""
        self._call.cancel()


class Upstream:
    """Stubs of one gateway, shared by every request."""

    def __init__(
        self, address: str, tls: TlsConfig | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    ) -> None:
        options = ChannelOptions(max_message_bytes=max_message_bytes, idempotent_methods=IDEMPOTENT, tls=tls)
        channel = get_channel(address, options)
        self.stub = pb_grpc.GatewayStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)

    def unary(self, method: str, request: Any, caller: Caller) -> Any:
        try:
            return getattr(self.stub, method)(request, timeout=caller.timeout(), metadata=caller.metadata())
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def stream(self, method: str, request: Any, caller: Caller) -> Stream:
        """A streaming call (`request` is an iterator of messages for Append)."""
        call = getattr(self.stub, method)(request, timeout=caller.timeout(), metadata=caller.metadata())
        return Stream(call)

    def ready(self, timeout_s: float = 2.0) -> bool:
        """The gateway's own health says SERVING."""
        try:
            reply = self.health.Check(
                health_pb2.HealthCheckRequest(service=GATEWAY_SERVICE), timeout=timeout_s
            )
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING


def api_error(exc: BaseException) -> ApiError | None:
    """`exc` as an ApiError when it is one the front answers with (None: a bug, answered 500)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, MemLongError):
        return from_exception(exc)
    if isinstance(exc, grpc.RpcError):
        return from_rpc_error(exc)
    return None
