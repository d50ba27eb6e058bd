"""Build a gRPC server the same way in every service: explicit message limits, health, reflection,
TLS / mTLS, telemetry.

    server, port = create_server("127.0.0.1:0", [Service(name, add_fn, servicer)], health=health)

Tests bind port 0 and read the port back. Health starts NOT_SERVING for every service; the owner
flips it to SERVING once it can answer (e.g. after recovery) and back before it stops.

TLS comes from `options.tls`, else the process default of the server's policy: internal
(`tls.internal_tls()`) for the decoder and ret-mem, public (`tls.process_tls()`) for the gateway.
When TLS is on, the kubelet cannot probe the service port (its gRPC probe speaks plaintext), so
`options.health_address` (default MEMLONG_HEALTH_ADDRESS) adds a plaintext port that serves only
grpc.health.v1 from the same HealthServicer. Every server records spans and metrics through
`tracing.ServerTelemetry` (exporters from OTEL_* variables, see tracing.py).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from memlong.rpc import internal, tracing
from memlong.rpc.channel import DEFAULT_MAX_MESSAGE_BYTES, forget_channels
from memlong.rpc.status import RequestDecoding
from memlong.rpc.tls import TlsConfig, internal_tls, process_tls


@dataclass(frozen=True)
class ServerOptions:
    """Settings shared by every service's server."""

    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_workers: int = 16
    interceptors: tuple[grpc.ServerInterceptor, ...] = ()
    extra: tuple[tuple[str, Any], ...] = field(default_factory=tuple)
    tls: TlsConfig | None = None  # None: the process default of the policy below; tls.PLAINTEXT: off
    internal: bool = False  # an internal service (decoder, ret-mem): the internal TLS policy
    # Plaintext health-only listener ("host:port"); None: MEMLONG_HEALTH_ADDRESS if set; "": none.
    health_address: str | None = None
    telemetry: bool = True  # spans and metrics for every call (ServerTelemetry first in the chain)
    internal_token: str | None = None  # internal services: callers must send it (memlong.rpc.internal)

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


class ServerWithHealthPort:
    """A started server plus its plaintext health-only server; behaves as the main grpc.Server."""

    def __init__(self, server: grpc.Server, health_server: grpc.Server, health_port: int) -> None:
        self.server = server
        self.health_server = health_server
        self.health_port = health_port

    def stop(self, grace: float | None) -> threading.Event:
        """Stop both; the returned event is set once both have stopped."""
        done = threading.Event()
        main, probe = self.server.stop(grace), self.health_server.stop(grace)

        def wait() -> None:
            main.wait()
            probe.wait()
            done.set()

        threading.Thread(target=wait, name="server-stop", daemon=True).start()
        return done

    def __getattr__(self, name: str) -> Any:
        return getattr(self.server, name)


# grpcio-reflection serves only v1alpha; grpc.reflection.v1 has the same messages under a new package
# name, so the same servicer answers both (tools such as grpcurl ask v1 first).
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def enable_reflection(names: Sequence[str], server: grpc.Server) -> None:
    """Serve grpc.reflection.v1 and v1alpha, listing `names` and both reflection services."""
    names = [*names, reflection.SERVICE_NAME, REFLECTION_V1]
    servicer = reflection.ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": v1}),)
    )


T = TypeVar("T")


def closed_on_termination(context: grpc.ServicerContext, items: Iterator[T]) -> Iterator[T]:
    """Yield from the generator `items`, closing it as soon as the call ends.

    gRPC stops pulling the response generator of a cancelled or expired call but does not close it,
    so whatever the generator holds (an admission slot, a session's write lock, a running ingest)
    would stay held. Closing it runs its `finally` blocks at once. A lock orders the close with the
    pulls: a call that ends while `items` computes its next item is closed right after it."""
    lock, ended = threading.Lock(), threading.Event()

    def close_now() -> None:
        with lock:
            items.close()

    def close() -> None:  # on gRPC's callback thread: never wait there for a pull to finish
        ended.set()
        if lock.acquire(blocking=False):
            try:
                items.close()
            finally:
                lock.release()
        else:
            threading.Thread(target=close_now, name="close-on-end", daemon=True).start()

    if not context.add_callback(close):
        close()
    while True:
        with lock:
            if ended.is_set():
                items.close()
                return
            try:
                item = next(items)
            except StopIteration:
                return
        yield item


def create_server(
    address: str,
    services: Sequence[Service],
    options: ServerOptions | None = None,
    health_servicer: health.HealthServicer | None = None,
) -> tuple[grpc.Server, int]:
    """Create and start a server on `address` ("host:0" picks a free port); return (server, port).

    Health (grpc.health.v1) and reflection are always added; every service starts NOT_SERVING.
    With TLS on, the port requires TLS (and a client certificate under mTLS); with a health address,
    the returned server is a `ServerWithHealthPort` whose `stop` stops both listeners.
    """
    options = options or ServerOptions()
    interceptors = tuple(options.interceptors)
    if options.internal_token:
        interceptors = (internal.RequireToken(options.internal_token), *interceptors)
    if options.telemetry:
        tracing.ensure_telemetry()
        interceptors = (tracing.ServerTelemetry(), *interceptors)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=options.max_workers, thread_name_prefix="grpc"),
        options=options.grpc_options(),
        interceptors=interceptors,
    )
    health_servicer = health_servicer or health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for svc in services:
        svc.add(svc.servicer, server)
    set_health(health_servicer, [s.name for s in services], serving=False)
    enable_reflection([s.name for s in services] + [health.SERVICE_NAME], server)
    tls = options.tls
    if tls is None:
        tls = internal_tls() if options.internal else process_tls()
    port = (
        server.add_secure_port(address, tls.server_credentials())
        if tls.enabled
        else server.add_insecure_port(address)
    )
    if port == 0:
        raise OSError(f"cannot bind {address}")
    health_address = options.health_address
    if health_address is None:
        health_address = os.environ.get("MEMLONG_HEALTH_ADDRESS", "")
    if not health_address:
        server.start()
        return server, port
    probe = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, probe)
    probe_port = probe.add_insecure_port(health_address)
    if probe_port == 0:
        raise OSError(f"cannot bind health address {health_address}")
    probe.start()
    server.start()
    return ServerWithHealthPort(server, probe, probe_port), port  # type: ignore[return-value]


class ServiceProcess:
    """One service behind one listener, with health: the lifecycle every service process shares.

    Subclasses set `config` (with host, port and grace_s) and say which servicer they
    serve in `_service()`. `serve` listens and flips health to SERVING; a service that must get ready
    first (ret-mem recovers its shards) calls `listen`, then `set_serving(True)` once it can answer.
    `stop` is `begin_stop` (health NOT_SERVING), `drain_s` for probes to see that, then `finish_stop`
    (the listener closes; in-flight calls get `grace_s` to finish). Every service parses requests
    through `RequestDecoding` (innermost), so undecodable bytes are INVALID_ARGUMENT.
    """

    def __init__(self, drain_s: float = 0.0) -> None:
        self.health = health.HealthServicer()
        self.server: grpc.Server | None = None
        self.port = 0
        self.drain_s = drain_s

    def _service(self) -> Service:
        raise NotImplementedError

    def listen(self, options: ServerOptions) -> int:
        """Start the listener with health NOT_SERVING; returns the bound port."""
        options = replace(options, interceptors=(*options.interceptors, RequestDecoding()))
        address = self.config.host if _is_unix(self.config.host) else f"{self.config.host}:{self.config.port}"
        self.server, self.port = create_server(address, [self._service()], options, self.health)
        forget_channels([self.address()])  # channels cached for an earlier server at this address
        return self.port

    def set_serving(self, serving: bool) -> None:
        set_health(self.health, [self._service().name], serving=serving)

    def serve(self, options: ServerOptions) -> int:
        """Listen and serve at once."""
        port = self.listen(options)
        self.set_serving(True)
        return port

    def begin_stop(self) -> None:
        """Phase 1: health NOT_SERVING; in-flight calls go on."""
        self.set_serving(False)

    def finish_stop(self, grace_s: float | None = None) -> None:
        """Phase 2: close the listener and wait up to `grace_s` (default config.grace_s) for calls."""
        if self.server is not None:
            self.server.stop(self.config.grace_s if grace_s is None else grace_s).wait()

    def stop(self, grace_s: float | None = None) -> None:
        """Graceful stop: begin_stop, let probes see NOT_SERVING for drain_s, finish_stop."""
        self.begin_stop()
        if self.drain_s > 0:
            threading.Event().wait(self.drain_s)
        self.finish_stop(grace_s)

    def address(self) -> str:
        """Where callers reach it: host:port, or the Unix socket a host of "unix:/path" names."""
        return self.config.host if _is_unix(self.config.host) else f"{self.config.host}:{self.port}"


def _is_unix(host: str) -> bool:
    """A host given as a gRPC Unix socket address ("unix:/run/memlong/retmem.sock"): the listener is
    that socket (port ignored); put it in a directory only the service's user can reach."""
    return host.startswith(("unix:", "unix-abstract:"))
