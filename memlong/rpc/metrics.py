"""OpenTelemetry metrics: the instruments every service records, memory gauges, and exporters.

Recorded by the interceptors in `tracing.py` (so every service gets them with no code of its own):

    memlong.rpc.server.duration   histogram, s   per rpc.service / rpc.method / rpc.grpc.status_code
    memlong.rpc.client.duration   histogram, s   same, measured by the caller
    memlong.retrieval.duration    histogram, s   retrieval calls only (ret-mem Search, Retrieve), server side
    memlong.rpc.bytes             counter,   By  message bytes per method and direction (received, sent)

Recorded by ret-mem's client and server for the calls that carry K/V (Append, Retrieve, Search):

    memlong.retmem.transport.calls   counter       calls per transport ("shm": K/V through shared
                                                   memory, "grpc": K/V in the messages) and method
    memlong.retmem.transport.bytes   counter, By   K/V bytes moved, same labels plus direction

Observed from every registered `MemoryReporter` (ret-mem registers itself with `observe_memory`), at
each collection:

    memlong.memory.sessions / .chunks / .bytes / .evicted_chunks   gauges per shard
    memlong.memory.sessions_lost   sessions recovery could not restore (answering DATA_LOSS), per shard

Exporters come from OTEL_METRICS_EXPORTER (otlp, prometheus, console, none; default none), with the
standard OTEL_EXPORTER_OTLP_* and OTEL_EXPORTER_PROMETHEUS_HOST/PORT variables.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation

from memlong.errors import InvalidArgument

log = logging.getLogger(__name__)

METER_NAME = "memlong"
# Latency buckets (s): retrieval is sub-millisecond to a few hundred ms; a decoder call takes minutes.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300,
)  # fmt: skip


@dataclass(frozen=True)
class Instruments:
    """The instruments of one meter provider."""

    server_duration: Any
    client_duration: Any
    retrieval_duration: Any
    rpc_bytes: Any
    transport_calls: Any
    transport_bytes: Any

    @classmethod
    def create(cls, meter: Meter) -> Instruments:
        def histogram(name: str, description: str) -> Any:
            try:
                return meter.create_histogram(
                    name,
                    unit="s",
                    description=description,
                    explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
                )
            except TypeError:  # API without bucket advice
                return meter.create_histogram(name, unit="s", description=description)

        instruments = cls(
            server_duration=histogram("memlong.rpc.server.duration", "time to serve one RPC"),
            client_duration=histogram("memlong.rpc.client.duration", "time of one RPC seen by the caller"),
            retrieval_duration=histogram("memlong.retrieval.duration", "time to serve one retrieval"),
            rpc_bytes=meter.create_counter(
                "memlong.rpc.bytes", unit="By", description="serialized message bytes moved"
            ),
            transport_calls=meter.create_counter(
                "memlong.retmem.transport.calls", description="K/V-carrying ret-mem calls per transport"
            ),
            transport_bytes=meter.create_counter(
                "memlong.retmem.transport.bytes", unit="By", description="K/V bytes moved per transport"
            ),
        )
        for name, description in (
            ("sessions", "sessions held"),
            ("chunks", "chunks stored"),
            ("bytes", "bytes of K/V, embeddings and lengths stored"),
            ("evicted_chunks", "chunks evicted from the sessions held"),
            ("sessions_lost", "sessions recovery could not restore; their calls answer DATA_LOSS"),
        ):
            meter.create_observable_gauge(
                f"memlong.memory.{name}", callbacks=[_memory_callback(name)], description=description
            )
        return instruments


# ---------------------------------------------------------------------------------- providers

_lock = threading.Lock()
_provider: MeterProvider | None = None
_instruments: tuple[MeterProvider, Instruments] | None = None


def set_meter_provider(provider: MeterProvider | None) -> None:
    """Use `provider` for memlong's instruments (None: the global OpenTelemetry provider)."""
    global _provider, _instruments
    with _lock:
        _provider, _instruments = provider, None


def meter_provider() -> MeterProvider:
    return _provider or metrics.get_meter_provider()


def instruments() -> Instruments:
    """The instruments of the current provider (created once per provider)."""
    global _instruments
    provider = meter_provider()
    with _lock:
        if _instruments is None or _instruments[0] is not provider:
            _instruments = (provider, Instruments.create(provider.get_meter(METER_NAME)))
        return _instruments[1]


def build_meter_provider(exporter: str, env: Mapping[str, str], resource: Any) -> MeterProvider | None:
    """An SDK MeterProvider exporting to `exporter` (otlp, prometheus, console); None for none."""
    from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader

    if exporter in ("", "none"):
        return None
    if exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        reader: Any = PeriodicExportingMetricReader(OTLPMetricExporter())
    elif exporter == "console":
        reader = PeriodicExportingMetricReader(ConsoleMetricExporter())
    elif exporter == "prometheus":
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server

        host = env.get("OTEL_EXPORTER_PROMETHEUS_HOST", "0.0.0.0")
        port = int(env.get("OTEL_EXPORTER_PROMETHEUS_PORT", "9464"))
        start_http_server(port, addr=host)
        reader = PrometheusMetricReader()
    else:
        raise InvalidArgument(
            "OTEL_METRICS_EXPORTER", f"must be otlp, prometheus, console or none: {exporter!r}"
        )
    return SdkMeterProvider(resource=resource, metric_readers=[reader])


# ------------------------------------------------------------------------------ memory gauges

MEMORY_KEYS = ("sessions", "chunks", "bytes", "evicted_chunks", "sessions_lost")


class MemoryReporter(Protocol):
    """What holds memory and reports it: ret-mem's server, per shard."""

    def memory_report(self) -> Mapping[str, Mapping[str, float]]:
        """Shard name -> {key: value} for every key of MEMORY_KEYS; shards not observable now left out."""
        ...


# Observed reporters; weak, so a stopped server is not kept alive.
_observed: weakref.WeakSet[Any] = weakref.WeakSet()


def observe_memory(reporter: MemoryReporter) -> None:
    """Report `reporter`'s memory in the memlong.memory.* gauges from now on."""
    _observed.add(reporter)


def unobserve_memory(reporter: MemoryReporter) -> None:
    """Stop reporting `reporter` (its server stopped). Weak references alone are not enough: a stopped
    reporter that is not yet collected would report its closed shards as empty, under the same shard
    names as the server that replaced it."""
    _observed.discard(reporter)


def _memory_callback(key: str):
    def callback(_options: CallbackOptions) -> Iterable[Observation]:
        for reporter in list(_observed):
            for shard, totals in reporter.memory_report().items():
                yield Observation(totals[key], {"shard": shard})

    return callback
