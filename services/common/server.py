"""Build a gRPC server the same way in every service: explicit message limits, health, reflection.

    server, port = create_server("127.0.0.1:0", [Service(name, add_fn, servicer)], health=health)

Tests bind port 0 and read the port back. Health starts NOT_SERVING for every service; the owner
flips it to SERVING once it can answer (e.g. after recovery) and back before it stops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

MiB = 1 << 20
DEFAULT_MAX_MESSAGE_BYTES = 64 * MiB


@dataclass(frozen=True)
class ServerOptions:
    """Settings shared by every service's server."""

    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_workers: int = 16
    interceptors: tuple[grpc.ServerInterceptor, ...] = ()
    extra: tuple[tuple[str, Any], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.max_message_bytes <= 0 or self.max_workers <= 0:
            raise ValueError("max_message_bytes and max_workers must be positive")

    def grpc_options(self) -> list[tuple[str, Any]]:
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.so_reuseport", 0),
            *self.extra,
        ]


@dataclass(frozen=True)
class Service:
    """One servicer to register: its full proto name, the generated add_* function and the object."""

    name: str
    add: Callable[[Any, grpc.Server], None]
    servicer: Any


def set_health(servicer: health.HealthServicer, names: Sequence[str], serving: bool) -> None:
    """Set every listed service (and the overall "" entry) SERVING or NOT_SERVING."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", *names):
        servicer.set(name, status)


def create_server(
    address: str,
    services: Sequence[Service],
    options: ServerOptions | None = None,
    health_servicer: health.HealthServicer | None = None,
) -> tuple[grpc.Server, int]:
    """Create and start a server on `address` ("host:0" picks a free port); return (server, port).

    Health (grpc.health.v1) and reflection are always added; every service starts NOT_SERVING.
    """
    options = options or ServerOptions()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=options.max_workers, thread_name_prefix="grpc"),
        options=options.grpc_options(),
        interceptors=options.interceptors,
    )
    health_servicer = health_servicer or health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for svc in services:
        svc.add(svc.servicer, server)
    set_health(health_servicer, [s.name for s in services], serving=False)
    names = [s.name for s in services] + [health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind {address}")
    server.start()
    return server, port
