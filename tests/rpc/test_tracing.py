"""One trace per request with linked spans from gateway, decoder and ret-mem (in-memory exporter),
on the real serving stack (tiny model, gRPC on loopback). Also: attributes never carry text or keys,
and the metrics (retrieval latency, bytes moved, memory size, evictions) are recorded."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from memlong.rpc import metrics, tracing
from tests.services.stack import KEYS, Stack, start_stack

GATEWAY = "memlong.gateway.v1.Gateway"
DECODER = "memlong.decoder.v1.Decoder"
RETMEM = "memlong.retmem.v1.RetMem"
BOOK = " ".join(["alpha beta gamma delta"] * 12)
PASSAGE = "gamma delta alpha beta"


@pytest.fixture
def telemetry() -> Iterator[tuple[InMemorySpanExporter, InMemoryMetricReader]]:
    exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.set_tracer_provider(provider)
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    yield exporter, reader
    tracing.set_tracer_provider(None)
    metrics.set_meter_provider(None)


@pytest.fixture
def traced_stack(telemetry, tmp_path: Path) -> Iterator[Stack]:
    stack = start_stack(tmp_path)
    yield stack
    stack.stop()


def traces(spans: tuple[ReadableSpan, ...]) -> dict[int, list[ReadableSpan]]:
    out: dict[int, list[ReadableSpan]] = defaultdict(list)
    for s in spans:
        out[s.context.trace_id].append(s)
    return out


def check_linked(trace: list[ReadableSpan]) -> ReadableSpan:
    """Exactly one root; every other span's parent is in the same trace. Returns the root."""
    ids = {s.context.span_id for s in trace}
    roots = [s for s in trace if s.parent is None]
    assert len(roots) == 1, [s.name for s in roots]
    for s in trace:
        assert s.parent is None or s.parent.span_id in ids, f"{s.name} has a parent outside its trace"
    return roots[0]


def services_in(trace: list[ReadableSpan], kind: SpanKind) -> set[str]:
    return {s.attributes["rpc.service"] for s in trace if s.kind == kind}


def test_one_trace_links_gateway_decoder_and_retmem(traced_stack: Stack, telemetry) -> None:
    exporter, reader = telemetry
    client = traced_stack.client()
    sid = client.create_session("h1").session_id
    exporter.clear()
    client.append(sid, BOOK)
    client.score(sid, PASSAGE)
    spans = exporter.get_finished_spans()

    by_trace = traces(spans)
    requests = defaultdict(list)
    for trace in by_trace.values():
        # Every trace starts at a gateway call: no orphaned span (e.g. from a prefetch thread).
        root = check_linked(trace)
        assert root.kind == SpanKind.CLIENT and root.attributes["rpc.service"] == GATEWAY, root.name
        requests[root.attributes["rpc.method"]].append(trace)
    assert len(requests["Append"]) == 1 and len(requests["Score"]) == 1
    for method in ("Append", "Score"):
        (trace,) = requests[method]
        assert services_in(trace, SpanKind.SERVER) == {GATEWAY, DECODER, RETMEM}, method
        # The chain: ret-mem server span <- decoder client span <- decoder server span <- gateway.
        by_id = {s.context.span_id: s for s in trace}
        for retmem in (
            s for s in trace if s.kind == SpanKind.SERVER and s.attributes["rpc.service"] == RETMEM
        ):
            chain, span = [], retmem
            while span is not None:
                chain.append((span.attributes["rpc.service"], span.kind))
                span = by_id.get(span.parent.span_id) if span.parent else None
            services = [svc for svc, kind in chain if kind == SpanKind.SERVER]
            assert services[0] == RETMEM and services[-1] == GATEWAY, chain
    retmem_spans = [
        s for s in spans if s.attributes.get("rpc.service") == RETMEM and s.kind == SpanKind.SERVER
    ]
    assert any(s.attributes.get("memlong.chunk.count", 0) > 0 for s in retmem_spans)  # appends
    assert any("memlong.retrieval.top_k" in s.attributes for s in retmem_spans)  # searches
    # Every session call names its session (Attach, the same-host transport's one probe, has none).
    assert all(s.attributes.get("memlong.session.id") for s in retmem_spans if s.name != f"{RETMEM}/Attach")
    assert all(s.attributes["rpc.grpc.status_code"] == 0 for s in spans)

    # Never text or keys in any attribute.
    secrets = [*KEYS, BOOK[:20], PASSAGE]
    for s in spans:
        for value in s.attributes.values():
            assert not any(secret in str(value) for secret in secrets), (s.name, value)

    names = {}
    for rm in reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                names[m.name] = m.data.data_points
    for name in (
        "memlong.rpc.server.duration",
        "memlong.rpc.client.duration",
        "memlong.retrieval.duration",
        "memlong.rpc.bytes",
        "memlong.memory.chunks",
        "memlong.memory.bytes",
        "memlong.memory.sessions",
        "memlong.memory.evicted_chunks",
    ):
        assert names.get(name), f"metric {name} not recorded"
    assert sum(p.count for p in names["memlong.retrieval.duration"]) > 0
    chunks = {p.attributes["shard"]: p.value for p in names["memlong.memory.chunks"]}
    assert chunks.get("shard0", 0) > 0


def test_trace_context_crosses_a_client_to_retmem_hop(telemetry, tmp_path: Path) -> None:
    """The same link on the smallest hop: a client span and its ret-mem server span share a trace."""
    import numpy as np

    from memlong.services.retmem.client import RetMemClient
    from memlong.services.retmem.server import RetMemConfig, RetMemServer
    from tests.services.retmem.servers import chunks, tiny_spec

    exporter, _ = telemetry
    server = RetMemServer(RetMemConfig(data_dir=tmp_path))
    server.start()
    try:
        client = RetMemClient({"shard0": server.address()})
        spec = tiny_spec()
        with tracing.tracer().start_as_current_span("request") as root:
            client.create_session("hop", spec)
            client.append("hop", *chunks(np.random.default_rng(0), spec, 0, 3))
            client.search("hop", np.ones((1, spec.dim), np.float32), 2)
        spans = [
            s for s in exporter.get_finished_spans() if s.context.trace_id == root.get_span_context().trace_id
        ]
        assert check_linked(spans).name == "request"
        # (Attach: the same-host transport's probe before the first K/V call, where /dev/shm exists)
        server_spans = [
            s for s in spans if s.kind == SpanKind.SERVER and s.attributes["rpc.method"] != "Attach"
        ]
        methods = [s.attributes["rpc.method"] for s in server_spans]
        assert methods[:2] == ["CreateSession", "Append"] and methods[2] in tracing.RETRIEVAL_METHODS
        assert server_spans[1].attributes["memlong.chunk.count"] == 3
        assert server_spans[1].attributes["memlong.chunk.last_seq"] == 2
    finally:
        server.stop(grace_s=1)


def test_exporters_are_configurable_and_unknown_names_refused() -> None:
    from opentelemetry.sdk.resources import Resource
    from prometheus_client import REGISTRY, generate_latest

    from memlong.errors import InvalidArgument

    resource = Resource.create({"service.name": "test"})
    assert tracing.build_tracer_provider("none", resource) is None
    for name in ("console", "otlp"):
        provider = tracing.build_tracer_provider(name, resource)
        assert provider is not None
        provider.shutdown()
    for name in ("console", "otlp"):
        meter_provider = metrics.build_meter_provider(name, {}, resource)
        assert meter_provider is not None
        meter_provider.shutdown()
    prom = metrics.build_meter_provider("prometheus", {"OTEL_EXPORTER_PROMETHEUS_PORT": "0"}, resource)
    assert prom is not None
    prom.get_meter("t").create_counter("memlong.test.calls").add(3)
    exposition = generate_latest(REGISTRY).decode()  # what Prometheus scrapes from :9464/metrics
    assert any(
        line.startswith("memlong_test_calls_total{") and line.endswith(" 3.0")
        for line in exposition.splitlines()
    )
    prom.shutdown()
    with pytest.raises(InvalidArgument, match="OTEL_TRACES_EXPORTER"):
        tracing.build_tracer_provider("zipkin", resource)
    with pytest.raises(InvalidArgument, match="OTEL_METRICS_EXPORTER"):
        metrics.build_meter_provider("statsd", {}, resource)
