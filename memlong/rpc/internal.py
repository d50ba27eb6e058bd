"""Internal services (ret-mem, the decoder) accept calls only from their own installation.

A per-installation secret travels as metadata `x-memlong-internal`; a server given the secret refuses
every call without it (UNAUTHENTICATED), health and reflection excepted so probes keep working. The
embedded default (`memlong up`) keeps the secret in `<data dir>/internal.key`, readable by its owner
only; other deployments pass it as MEMLONG_INTERNAL_TOKEN or MEMLONG_INTERNAL_TOKEN_FILE. A server
without a secret trusts its network (the behaviour behind mTLS or a network policy).
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from memlong.atomic import write_atomic
from memlong.errors import InvalidArgument

HEADER = "x-memlong-internal"
MIN_TOKEN_CHARS = 16
EXEMPT = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def token_from_env() -> str | None:
    """MEMLONG_INTERNAL_TOKEN, else the contents of MEMLONG_INTERNAL_TOKEN_FILE, else None.

    A secret everyone could know is refused (InvalidArgument): one shorter than MIN_TOKEN_CHARS, or
    a placeholder left in place (k8s/secrets.example.yaml's "REPLACE: ...")."""
    name, token = "MEMLONG_INTERNAL_TOKEN", os.environ.get("MEMLONG_INTERNAL_TOKEN")
    if not token and os.environ.get("MEMLONG_INTERNAL_TOKEN_FILE"):
        name = "MEMLONG_INTERNAL_TOKEN_FILE"
        token = Path(os.environ[name]).read_text()
    token = (token or "").strip()
    if token.startswith("REPLACE"):
        raise InvalidArgument(name, "is the placeholder; create the real secret (k8s/README.md)")
    if token and len(token) < MIN_TOKEN_CHARS:
        raise InvalidArgument(name, f"too short to be a secret (under {MIN_TOKEN_CHARS} characters)")
    return token or None


def installation_token(data_dir: Path) -> str:
    """The installation's secret in `<data_dir>/internal.key`, created (owner-only) on first use.

    Several processes may start at once (Ray replicas): the first link wins and all read its secret."""
    path = Path(data_dir) / "internal.key"
    if not path.is_file():
        write_atomic(path, secrets.token_urlsafe(32), mode=0o600, replace=False)
    return path.read_text().strip()


class RequireToken(grpc.ServerInterceptor):
    """Refuse every call that does not carry the installation's secret (health and reflection pass)."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        if details.method.startswith(EXEMPT):
            return continuation(details)
        sent = dict(details.invocation_metadata or ()).get(HEADER, "")
        if hmac.compare_digest(str(sent).encode(), self._token):
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None

        def refuse(_request: Any, context: grpc.ServicerContext) -> None:
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED, f"internal service: caller not authenticated ({HEADER})"
            )

        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(refuse)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(refuse)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(refuse)
        return grpc.unary_unary_rpc_method_handler(refuse)


class _Details(grpc.ClientCallDetails):
    def __init__(self, base: grpc.ClientCallDetails, metadata: list) -> None:
        self.method, self.timeout, self.credentials = base.method, base.timeout, base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)
        self.metadata = metadata


class SendToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Attach the installation's secret to every call on the channel."""

    def __init__(self, token: str) -> None:
        self._token = token

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _Details(details, [*(details.metadata or ()), (HEADER, self._token)])

    def intercept_unary_unary(self, continuation, details, request):  # noqa: ANN001
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):  # noqa: ANN001
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):  # noqa: ANN001
        return continuation(self._with_token(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):  # noqa: ANN001
        return continuation(self._with_token(details), request_iterator)
