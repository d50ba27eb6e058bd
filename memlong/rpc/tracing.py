"""OpenTelemetry tracing for every RPC: a server and a client interceptor, linked through metadata.

`create_server` installs `ServerTelemetry` and `get_channel` wraps channels with `ClientTelemetry`, so
a call gateway -> decoder -> ret-mem becomes one trace: each client span injects W3C `traceparent`
into the call's metadata, each server span is the child of the span found there, and whatever the
handler calls downstream is the child of the server span (the span is current while it runs).

Spans carry rpc.* attributes and a few memlong ones read from allow-listed request/response fields:
session id, chunk counts and sequence range, top_k, query rows, evicted counts. Never text, tokens,
embeddings, K/V or API keys: only the fields named in `_REQUEST_FIELDS` are ever read.

Exporters come from the standard variables, read once per process (`ensure_telemetry`):
OTEL_TRACES_EXPORTER (otlp, console, none; default none), OTEL_METRICS_EXPORTER (see metrics.py),
OTEL_SERVICE_NAME and OTEL_EXPORTER_OTLP_*. Tests install an in-memory exporter with
`set_tracer_provider`.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from memlong.errors import InvalidArgument

from . import metrics

TRACER_NAME = "memlong"
PROPAGATOR = TraceContextTextMapPropagator()
# Not traced: probes and reflection would drown the traces that matter.
UNTRACED_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)
# Methods whose server time is recorded as retrieval latency.
RETRIEVAL_METHODS = frozenset({"Search", "Retrieve"})

# ------------------------------------------------------------------------------- providers

_lock = threading.Lock()
_provider: TracerProvider | None = None
_configured = False


def set_tracer_provider(provider: TracerProvider | None) -> None:
    """Use `provider` for memlong's spans (None: the global OpenTelemetry provider)."""
    global _provider
    with _lock:
        _provider = provider


def tracer() -> trace.Tracer:
    return (_provider or trace.get_tracer_provider()).get_tracer(TRACER_NAME)


def ensure_telemetry(env: Mapping[str, str] | None = None) -> None:
    """Install exporters from OTEL_* variables, once per process (later calls do nothing)."""
    global _configured, _provider
    with _lock:
        if _configured:
            return
        _configured = True
    env = os.environ if env is None else env
    traces = env.get("OTEL_TRACES_EXPORTER", "none").strip().lower()
    metrics_exporter = env.get("OTEL_METRICS_EXPORTER", "none").strip().lower()
    if traces in ("", "none") and metrics_exporter in ("", "none"):
        return
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", "memlong")})
    provider = build_tracer_provider(traces, resource)
    if provider is not None:
        with _lock:
            _provider = _provider or provider
    meter_provider = metrics.build_meter_provider(metrics_exporter, env, resource)
    if meter_provider is not None:
        metrics.set_meter_provider(meter_provider)


def build_tracer_provider(exporter: str, resource: Any) -> TracerProvider | None:
    """An SDK TracerProvider exporting to `exporter` (otlp, console); None for none."""
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    if exporter in ("", "none"):
        return None
    if exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        span_exporter: Any = OTLPSpanExporter()
    elif exporter == "console":
        span_exporter = ConsoleSpanExporter()
    else:
        raise InvalidArgument("OTEL_TRACES_EXPORTER", f"must be otlp, console or none: {exporter!r}")
    provider = SdkTracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    return provider


def in_current_context(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` bound to the caller's context: submit this to an executor so spans made on the worker
    thread stay in the caller's trace (threads do not inherit context by themselves)."""
    ctx = contextvars.copy_context()
    return lambda *a, **kw: ctx.run(fn, *a, **kw)


# ------------------------------------------------------------------------------- attributes

# request field -> how it becomes attributes. Only these fields are read.
_REQUEST_FIELDS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "session_id": lambda v: {"memlong.session.id": v} if v else {},
    "chunks": lambda v: {
        "memlong.chunk.count": len(v),
        **(
            {"memlong.chunk.first_seq": v[0].seq, "memlong.chunk.last_seq": v[-1].seq}
            if v and hasattr(v[0], "seq")
            else {}
        ),
    },
    "seq": lambda v: {"memlong.chunk.seq": v},
    "ids": lambda v: {"memlong.chunk.count": len(v)},
    "top_k": lambda v: {"memlong.retrieval.top_k": v} if v else {},
    "queries": lambda v: {"memlong.retrieval.queries": v.shape[0]} if len(v.shape) else {},
    "n_free": lambda v: {"memlong.evict.requested": v},
}
_RESPONSE_FIELDS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "appended": lambda v: {"memlong.chunk.appended": v},
    "evicted_ids": lambda v: {"memlong.evict.count": len(v)},
    "num_chunks": lambda v: {"memlong.chunk.total": v},
}


def _fields(message: Any, table: Mapping[str, Callable[[Any], dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    descriptor = getattr(message, "DESCRIPTOR", None)
    if descriptor is None:
        return out
    for name, to_attrs in table.items():
        field = descriptor.fields_by_name.get(name)
        if field is None:
            continue
        if field.message_type is not None and not _is_repeated(field) and not message.HasField(name):
            continue
        try:
            out.update(to_attrs(getattr(message, name)))
        except (AttributeError, IndexError, TypeError):
            continue
    return out


def _is_repeated(field: Any) -> bool:
    return getattr(field, "is_repeated", None) or getattr(field, "label", None) == 3


def _split(full_method: str | bytes) -> tuple[str, str]:
    if isinstance(full_method, bytes):
        full_method = full_method.decode()
    service, _, method = full_method.lstrip("/").partition("/")
    return service, method


def _rpc_attributes(service: str, method: str) -> dict[str, Any]:
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}


# ---------------------------------------------------------------------------------- server


class ServerTelemetry(grpc.ServerInterceptor):
    """One SERVER span per call, child of the caller's span from `traceparent`; duration and bytes."""

    def intercept_service(self, continuation, handler_call_details):  # noqa: ANN001
        handler = continuation(handler_call_details)
        service, method = _split(handler_call_details.method)
        if handler is None or service in UNTRACED_SERVICES:
            return handler
        carrier = {k: v for k, v in (handler_call_details.invocation_metadata or ()) if isinstance(v, str)}
        call = _ServerCall(service, method, PROPAGATOR.extract(carrier))
        # Bytes are counted where gRPC (de)serializes anyway: asking a message its ByteSize costs
        # as much as serializing it again (250 us for one 768 KiB retrieval reply).
        handler = handler._replace(
            request_deserializer=_counting(
                handler.request_deserializer, call.attributes, "received", out=False
            ),
            response_serializer=_counting(handler.response_serializer, call.attributes, "sent", out=True),
        )
        if handler.unary_unary:
            return handler._replace(unary_unary=call.unary(handler.unary_unary, streaming_request=False))
        if handler.stream_unary:
            return handler._replace(stream_unary=call.unary(handler.stream_unary, streaming_request=True))
        if handler.unary_stream:
            return handler._replace(unary_stream=call.stream(handler.unary_stream, streaming_request=False))
        return handler._replace(stream_stream=call.stream(handler.stream_stream, streaming_request=True))


def _counting(
    convert: Callable[[Any], Any] | None, attributes: dict[str, Any], direction: str, out: bool
) -> Callable[[Any], Any]:
    """Wrap a (de)serializer so each message's wire bytes are added to memlong.rpc.bytes."""
    labels = {**attributes, "direction": direction, "side": "server"}
    counter = metrics.instruments().rpc_bytes

    def wrapped(value: Any) -> Any:
        result = value if convert is None else convert(value)
        counter.add(len(result if out else value), labels)
        return result

    return wrapped


class _ServerCall:
    def __init__(self, service: str, method: str, parent: Any) -> None:
        self.service, self.method, self.parent = service, method, parent
        self.attributes = _rpc_attributes(service, method)

    def _start(self) -> Span:
        return tracer().start_span(
            f"{self.service}/{self.method}",
            context=self.parent,
            kind=SpanKind.SERVER,
            attributes=self.attributes,
        )

    def _requests(self, span: Span, requests: Iterator[Any]) -> Iterator[Any]:
        first = True
        for request in requests:
            if first:
                span.set_attributes(_fields(request, _REQUEST_FIELDS))
                first = False
            yield request

    def _request(self, span: Span, request: Any, streaming: bool) -> Any:
        if streaming:
            return self._requests(span, request)
        span.set_attributes(_fields(request, _REQUEST_FIELDS))
        return request

    @contextlib.contextmanager
    def _span(self, context: grpc.ServicerContext) -> Iterator[Span]:
        """The call's span, ended with the call's outcome (whatever ends it, a generator's close too)."""
        span, start = self._start(), time.perf_counter()
        try:
            yield span
        except BaseException as exc:
            self._finish(span, context, start, exc)
            raise
        self._finish(span, context, start, None)

    @staticmethod
    def _current(span: Span):
        """`span` is the current span inside the block; ending it and recording errors stay with `_span`."""
        return trace.use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False)

    def unary(self, behavior: Callable[..., Any], streaming_request: bool) -> Callable[..., Any]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            with self._span(context) as span:
                with self._current(span):
                    response = behavior(self._request(span, request, streaming_request), context)
                span.set_attributes(_fields(response, _RESPONSE_FIELDS))
                return response

        return wrapped

    def stream(self, behavior: Callable[..., Any], streaming_request: bool) -> Callable[..., Any]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            with self._span(context) as span:
                # The span is current only while the handler runs, not while the reply is written.
                responses = behavior(self._request(span, request, streaming_request), context)
                while True:
                    with self._current(span):
                        response = next(responses, _END)
                    if response is _END:
                        return
                    yield response

        return wrapped

    def _finish(
        self, span: Span, context: grpc.ServicerContext, start: float, error: BaseException | None
    ) -> None:
        elapsed = time.perf_counter() - start
        code = _server_code(context, error)
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code is not grpc.StatusCode.OK:
            span.set_status(Status(StatusCode.ERROR, code.name))
        span.end()
        labels = {**self.attributes, "rpc.grpc.status_code": code.value[0]}
        inst = metrics.instruments()
        inst.server_duration.record(elapsed, labels)
        if self.method in RETRIEVAL_METHODS:
            inst.retrieval_duration.record(elapsed, labels)


_END = object()


def _server_code(context: grpc.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    code = None
    try:
        code = context.code()
    except (AttributeError, NotImplementedError):
        code = getattr(getattr(context, "_state", None), "code", None)
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(error, GeneratorExit):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN if error is not None else grpc.StatusCode.OK


# ---------------------------------------------------------------------------------- client


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class ClientTelemetry(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """One CLIENT span per call; its context travels to the server as `traceparent` metadata."""

    def _start(
        self, details: grpc.ClientCallDetails, request: Any | None
    ) -> tuple[Span, grpc.ClientCallDetails, dict]:
        service, method = _split(details.method)
        attributes = _rpc_attributes(service, method)
        span = tracer().start_span(f"{service}/{method}", kind=SpanKind.CLIENT, attributes=attributes)
        if request is not None:
            span.set_attributes(_fields(request, _REQUEST_FIELDS))
        carrier: dict[str, str] = {}
        PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        metadata = [*(details.metadata or ()), *carrier.items()]
        new = _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )
        return span, new, attributes

    def _intercept(
        self,
        continuation: Callable[..., Any],
        details: grpc.ClientCallDetails,
        request: Any,
        unary_request: bool,
    ) -> Any:
        span, new, attributes = self._start(details, request if unary_request else None)
        start = time.perf_counter()
        try:
            call = continuation(new, request)
        except BaseException:
            _end_client(span, attributes, start, grpc.StatusCode.UNKNOWN)
            raise
        call.add_done_callback(lambda c: _end_client(span, attributes, start, _client_code(c)))
        return call

    def intercept_unary_unary(self, continuation, client_call_details, request):  # noqa: ANN001
        return self._intercept(continuation, client_call_details, request, unary_request=True)

    def intercept_unary_stream(self, continuation, client_call_details, request):  # noqa: ANN001
        return self._intercept(continuation, client_call_details, request, unary_request=True)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):  # noqa: ANN001
        return self._intercept(continuation, client_call_details, request_iterator, unary_request=False)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):  # noqa: ANN001
        return self._intercept(continuation, client_call_details, request_iterator, unary_request=False)


def _client_code(call: Any) -> grpc.StatusCode:
    try:
        code = call.code()
    except Exception:  # noqa: BLE001 - a failed outcome without a code
        return grpc.StatusCode.UNKNOWN
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def _end_client(span: Span, attributes: dict[str, Any], start: float, code: grpc.StatusCode) -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code is not grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, code.name))
    span.end()
    metrics.instruments().client_duration.record(
        time.perf_counter() - start, {**attributes, "rpc.grpc.status_code": code.value[0]}
    )
