"""gRPC statuses as HTTP statuses, in OpenAI's error shape.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": "..."}}

Every error reaches the client through one path: a domain exception raised here is first given its
gRPC status by the services' table (`memlong.rpc.status.status_for`), and a gRPC status (from the
gateway, or from that table) becomes an HTTP status by `HTTP_STATUS`. RESOURCE_EXHAUSTED is two things
over HTTP: a request over a size limit (413; the gateway marks it with the trailing metadata
`memlong-reason: too_large`) and a quota or a busy server (429). A client mistake never becomes 500.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc

from memlong.errors import MemLongError, TooLarge
from memlong.rpc.status import status_for
from memlong.services.gateway.interceptors import REASON_KEY

HTTP_STATUS: Mapping[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,  # e.g. an append is running on the session
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,  # 413 with reason too_large
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}  # INTERNAL, UNKNOWN, DATA_LOSS: 500

ERROR_TYPE: Mapping[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "cancelled",
    501: "not_implemented_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}

# Field names of the gRPC API -> the OpenAI request's names (the `param` of an error).
PARAM_NAMES: Mapping[str, str] = {
    "sampling.max_new_tokens": "max_tokens",
    "sampling.temperature": "temperature",
    "sampling.top_p": "top_p",
    "sampling.top_k": "top_k",
    "sampling.seed": "seed",
    "sampling.stop_strings": "stop",
    "memory_mode": "memory",
}

UNAUTHENTICATED_HINT = "send the API key as 'Authorization: Bearer KEY'"


class ApiError(Exception):
    """An error answer: HTTP status and OpenAI's error object."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    @property
    def type(self) -> str:
        return ERROR_TYPE.get(self.status, "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        """The OpenAI client retries 408/409/429/5xx by itself: 409 here is a state that a retry of the
        same request does not change, and 429 says when to come back."""
        if self.status == 409:
            return {"x-should-retry": "false"}
        if self.status in (429, 503):
            return {"retry-after": "1"}
        return {}


def for_status(code: grpc.StatusCode, details: str, reason: str | None = None) -> ApiError:
    """The HTTP error for a gRPC status with its details (and the gateway's `memlong-reason`)."""
    status = HTTP_STATUS.get(code, 500)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and reason == TooLarge.reason:
        status = 413
    if status == 500:  # a server bug: nothing of it goes to the client
        return ApiError(500, "internal error; the server logged it", code=code.name.lower())
    param = None
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        field, sep, _ = details.partition(": ")
        if sep and " " not in field:
            param = PARAM_NAMES.get(field, field)
    message = details or code.name
    if code is grpc.StatusCode.UNAUTHENTICATED:
        message = f"missing or unknown API key: {UNAUTHENTICATED_HINT}"
        return ApiError(401, message, code="invalid_api_key")
    return ApiError(status, message, param=param, code="too_large" if status == 413 else code.name.lower())


def from_rpc_error(err: grpc.RpcError) -> ApiError:
    """The HTTP error for a failed gateway call."""
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    details = err.details() if callable(getattr(err, "details", None)) else ""
    trailing = err.trailing_metadata() if callable(getattr(err, "trailing_metadata", None)) else None
    reason = dict(trailing or ()).get(REASON_KEY)
    return for_status(code, details or "", reason)


def from_exception(exc: MemLongError) -> ApiError:
    """The HTTP error for a domain exception raised by the front itself (through the gRPC table)."""
    return for_status(status_for(exc), str(exc), getattr(exc, "reason", None))
