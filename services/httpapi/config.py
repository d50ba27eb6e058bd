"""The HTTP front's settings: one frozen dataclass, validated; built from CLI flags in one place."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, replace
from pathlib import Path

from memlong.errors import InvalidArgument, check_port, check_positive
from memlong.rpc.tls import TlsConfig

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class HttpConfig:
    """Where the front listens, which gateway it calls, and the defaults of the OpenAI API."""

    gateway: str  # host:port of the gateway's gRPC API
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port
    model_id: str = DEFAULT_MODEL_ID  # what /v1/models lists and what requests must name
    default_timeout_s: float = 600.0  # deadline of a request without X-Request-Timeout (gateway caps it)
    max_body_bytes: int = 16 << 20  # JSON bodies; an upload streams and only the gateway's limit holds
    upload_piece_bytes: int = 256 << 10  # Append pieces sent to the gateway
    chat_max_tokens: int = 256  # max_tokens of a chat completion that names none
    completion_max_tokens: int = 16  # OpenAI's default for /v1/completions
    grace_s: float = 5.0  # in-flight requests get this long to finish on stop
    tls: TlsConfig | None = None  # the HTTP port's TLS; None: the process's public policy
    gateway_tls: TlsConfig | None = None  # the channel to the gateway; None: the public policy

    def __post_init__(self) -> None:
        if not self.gateway or ":" not in self.gateway:
            raise InvalidArgument("http.gateway", f"expected host:port, got {self.gateway!r}")
        check_port(self.port, "http.port")
        if not self.model_id:
            raise InvalidArgument("http.model_id", "must not be empty")
        check_positive(
            self, ("default_timeout_s", "max_body_bytes", "upload_piece_bytes", "grace_s"), "http."
        )
        for name in ("chat_max_tokens", "completion_max_tokens"):
            if not 1 <= getattr(self, name) <= 4096:
                raise InvalidArgument(f"http.{name}", "must be in 1..4096")


def model_id_for(model: str | None) -> str:
    """The name the HTTP API serves a model under: the packaged one's, or a checkpoint dir's name."""
    return DEFAULT_MODEL_ID if not model else Path(model).name or DEFAULT_MODEL_ID


def add_arguments(p: argparse.ArgumentParser, default_port: int, standalone: bool = False) -> None:
    """The --http-* flags of a command that starts the front beside its gateway (`standalone`: a
    gateway on its own host, where the front's address and the gateway's TLS name can differ)."""
    env = os.environ.get
    p.add_argument(
        "--http-port",
        type=int,
        default=int(env("MEMLONG_HTTP_PORT", str(default_port))),
        help="port of the OpenAI-compatible HTTP API (0: a free port; -1: no HTTP API)",
    )
    if not standalone:
        return
    p.add_argument(
        "--http-host", default=env("MEMLONG_HTTP_HOST"), help="address it listens on (default: the gateway's)"
    )
    p.add_argument(
        "--http-gateway-server-name",
        default=env("MEMLONG_HTTP_GATEWAY_SERVER_NAME"),
        help="with TLS: the name the gateway's certificate carries (the front calls it on loopback)",
    )


def config_from_args(
    args: argparse.Namespace, gateway_host: str, gateway_port: int, model: str | None, tls: TlsConfig
) -> HttpConfig | None:
    """The front's config for a gateway on gateway_host:gateway_port serving `model` (None when
    --http-port is -1). It calls the gateway on loopback when the gateway listens on every address."""
    if args.http_port < 0:
        return None
    host = "127.0.0.1" if gateway_host in ("0.0.0.0", "") else "::1" if gateway_host == "::" else gateway_host
    address = f"[{host}]:{gateway_port}" if ":" in host else f"{host}:{gateway_port}"
    gateway_tls = tls
    server_name = getattr(args, "http_gateway_server_name", None)
    if server_name and tls.enabled:
        gateway_tls = replace(tls, server_name=server_name)
    return HttpConfig(
        gateway=address,
        host=getattr(args, "http_host", None) or gateway_host,
        port=args.http_port,
        model_id=model_id_for(model),
        tls=tls,
        gateway_tls=gateway_tls,
    )
