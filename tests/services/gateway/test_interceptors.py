"""The gateway's interceptor: API key -> tenant, the call's deadline, domain errors -> statuses, all in
one wrapper per call. Served from a bare gRPC server on port 0 with a two-method fake service."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest

from memlong.errors import NotFound
from memlong.services.gateway import interceptors
from memlong.services.gateway.interceptors import GatewayInterceptor, current, hash_key

SERVICE = "test.Fake"
KEY = "k-123"


def _answer(request: bytes, context: grpc.ServicerContext) -> bytes:
    if request == b"missing":
        raise NotFound("no such thing")
    if request == b"boom":
        raise RuntimeError("a bug")
    info = current()
    return f"{info.tenant} {info.deadline.remaining():.1f}".encode()


def _answers(request: bytes, context: grpc.ServicerContext):
    yield _answer(b"ok", context)
    yield _answer(request, context)


@pytest.fixture
def channel():
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        interceptors=(GatewayInterceptor(f"/{SERVICE}/", {hash_key(KEY): "tenant-a"}, 30.0, 60.0),),
    )
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "One": grpc.unary_unary_rpc_method_handler(_answer),
                    "Many": grpc.unary_stream_rpc_method_handler(_answers),
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch
    server.stop(None)


def _one(channel, request: bytes, key: str | None = KEY, timeout: float = 10.0) -> bytes:
    metadata = (("x-api-key", key),) if key else ()
    return channel.unary_unary(f"/{SERVICE}/One")(request, timeout=timeout, metadata=metadata)


def test_a_keyed_call_sees_its_tenant_and_its_deadline_capped(channel):
    tenant, remaining = _one(channel, b"ok", timeout=10.0).decode().split()
    # 10 s asked, under the 30 s cap; the server may see a little more (grpc-timeout is rounded up on
    # the wire), never the cap.
    assert tenant == "tenant-a" and 0 < float(remaining) <= 10.5
    many = channel.unary_stream(f"/{SERVICE}/Many")
    replies = list(many(b"ok", timeout=120.0, metadata=(("authorization", f"Bearer {KEY}"),)))
    assert [r.split()[0] for r in replies] == [b"tenant-a", b"tenant-a"]
    assert all(float(r.split()[1]) <= 60.0 for r in replies)  # 120 s asked, 60 s the cap


@pytest.mark.parametrize("key", [None, "wrong"])
def test_no_or_an_unknown_key_is_unauthenticated_before_the_handler_runs(channel, key):
    with pytest.raises(grpc.RpcError) as e:
        _one(channel, b"boom", key=key)  # the handler would fail: it never runs
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    "request_, code", [(b"missing", grpc.StatusCode.NOT_FOUND), (b"boom", grpc.StatusCode.INTERNAL)]
)
def test_errors_map_to_statuses_in_unary_and_streamed_calls(channel, request_, code):
    with pytest.raises(grpc.RpcError) as e:
        _one(channel, request_)
    assert e.value.code() == code
    many = channel.unary_stream(f"/{SERVICE}/Many")(request_, timeout=10.0, metadata=(("x-api-key", KEY),))
    assert next(many).startswith(b"tenant-a")
    with pytest.raises(grpc.RpcError) as e:
        next(many)
    assert e.value.code() == code


def test_a_call_builds_one_wrapped_handler(channel, monkeypatch):
    """Status mapping, auth and the deadline share one wrapper: gRPC runs every interceptor on every
    call, and each wrap rebuilds the handler and adds a frame to each message of a stream."""
    wraps = []
    real = interceptors._wrap
    monkeypatch.setattr(interceptors, "_wrap", lambda *a: wraps.append(1) or real(*a))
    _one(channel, b"ok")
    assert len(wraps) == 1
