"""Over gRPC: bad and oversized requests, unknown or deleted sessions, health, graceful stop, routing,
export/import."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memlong import errors
from memlong.api.common.v1 import tensor_pb2
from memlong.api.retmem.v1 import retmem_pb2 as pb
from memlong.api.retmem.v1 import retmem_pb2_grpc as pb_grpc
from memlong.services.common import tensor
from memlong.services.retmem import wire
from memlong.services.retmem.client import RetMemClient
from memlong.services.retmem.routing import Ring
from memlong.services.retmem.server import SERVICE_NAME, RetMemConfig, RetMemServer
from memlong.services.retmem.shard import Shard
from memlong.services.retmem.store import SessionSpec

from .servers import chunks, tiny_spec

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health_status(target: str) -> int:
    with grpc.insecure_channel(target) as ch:
        req = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        return health_pb2_grpc.HealthStub(ch).Check(req, timeout=2).status


def stub_for(server: RetMemServer) -> pb_grpc.RetMemStub:
    return pb_grpc.RetMemStub(grpc.insecure_channel(server.address()))


def test_random_bytes_get_invalid_argument_and_the_server_keeps_serving(server, client) -> None:
    """Bytes that are no request message are a client mistake (INVALID_ARGUMENT), never INTERNAL, and the
    server goes on answering."""
    spec = tiny_spec()
    client.create_session("c1", spec)
    rng = np.random.default_rng(11)
    with grpc.insecure_channel(server.address()) as ch:
        for method in ("Append", "CreateSession", "GetSession"):
            call = ch.unary_unary(f"/{SERVICE_NAME}/{method}")  # no serializer: raw bytes on the wire
            for _ in range(5):
                junk = b"\x07" + rng.integers(0, 256, int(rng.integers(1, 300)), dtype=np.uint8).tobytes()
                with pytest.raises(grpc.RpcError) as e:
                    call(junk, timeout=5)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # the client's bytes, not a bug
    assert health_status(server.address()) == SERVING
    assert client.append("c1", *chunks(rng, spec, 0, 2)) == 2


def _bad_tensor(t: tensor_pb2.Tensor, **change) -> tensor_pb2.Tensor:
    out = tensor_pb2.Tensor()
    out.CopyFrom(t)
    for k, v in change.items():
        if k == "shape":
            del out.shape[:]
            out.shape.extend(v)
        else:
            setattr(out, k, v)
    return out


def test_each_bad_field_is_invalid_argument_naming_it(server, client) -> None:
    spec = tiny_spec()
    client.create_session("c2", spec)
    rng = np.random.default_rng(12)
    client.append("c2", *chunks(rng, spec, 0, 4))
    queries = rng.standard_normal((3, spec.dim)).astype(np.float32)
    before = client.search("c2", queries, 3)
    stats_before = client.info("c2").num_chunks
    ids, emb, rec, lengths = chunks(rng, spec, 10, 1)
    code = tensor.dtype_code("bfloat16")
    good_emb = tensor.encode(emb[0])
    good_kv = tensor.encode_bytes(rec[0].tobytes(), code, spec.kv_shape)

    def chunk(**kw) -> pb.Chunk:
        c = pb.Chunk(seq=10, embedding=good_emb, kv=good_kv, length=2)
        for k, v in kw.items():
            getattr(c, k).CopyFrom(v) if isinstance(v, tensor_pb2.Tensor) else setattr(c, k, v)
        return c

    nan = emb[0].copy()
    nan[3] = np.nan
    cases = {
        "chunks[0].embedding.dtype": chunk(embedding=tensor.encode(emb[0].astype(np.float16))),
        "chunks[0].embedding.data": chunk(embedding=_bad_tensor(good_emb, shape=[spec.dim + 1])),
        "chunks[0].embedding.shape": chunk(embedding=tensor.encode(np.zeros(spec.dim + 2, np.float32))),
        "chunks[0].kv.shape": chunk(kv=_bad_tensor(good_kv, shape=[-1, 1, 4, 2])),
        "chunks[0].kv.checksum": chunk(kv=_bad_tensor(good_kv, checksum=good_kv.checksum ^ 1)),
        "chunks[0].kv.dtype": chunk(kv=_bad_tensor(good_kv, dtype=tensor.dtype_code("float16"))),
        "chunks[0].kv.dtype ": chunk(kv=_bad_tensor(good_kv, dtype=0)),
        "embeddings": chunk(embedding=tensor.encode(nan)),
        "lengths": chunk(length=0),
        "lengths ": chunk(length=spec.chunk_tokens + 1),
        "ids": chunk(seq=-5),
    }
    stub = stub_for(server)
    huge = _bad_tensor(good_kv, shape=[1 << 40, 1 << 40, 1, 1])
    cases["chunks[0].kv.shape "] = chunk(kv=huge)
    for field, bad in cases.items():
        with pytest.raises(grpc.RpcError) as e:
            stub.Append(pb.AppendRequest(session_id="c2", chunks=[bad]), timeout=5)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert e.value.details().startswith(field.strip()), (field, e.value.details())
    for sid in ("", "x" * 4096, "bad id/with slash"):
        with pytest.raises(grpc.RpcError) as e:
            stub.Append(pb.AppendRequest(session_id=sid, chunks=[chunk()]), timeout=5)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith(
            "session_id"
        )
    bad_requests = {
        "queries.shape": pb.SearchRequest(session_id="c2", queries=tensor.encode(queries[:, :-1]), top_k=2),
        "top_k": pb.SearchRequest(session_id="c2", queries=tensor.encode(queries), top_k=0),
        "queries.checksum": pb.SearchRequest(
            session_id="c2", queries=_bad_tensor(tensor.encode(queries), checksum=1), top_k=2
        ),
    }
    for field, req in bad_requests.items():
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Search(req, timeout=5))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith(field), (
            field
        )
    bad_evicts = {
        "n_free": pb.EvictRequest(session_id="c2", n_free=-1),
        "n_free ": pb.EvictRequest(session_id="c2", n_free=2, from_chunk_id=0, to_chunk_id=3),
        "from_chunk_id": pb.EvictRequest(session_id="c2", from_chunk_id=-3, to_chunk_id=3),
    }
    for field, req in bad_evicts.items():
        with pytest.raises(grpc.RpcError) as e:
            stub.Evict(req, timeout=5)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith(
            field.strip()
        ), field
    bad_spec = wire.spec_to_proto(spec)
    bad_spec.kv_dtype = 0
    with pytest.raises(grpc.RpcError) as e:
        stub.CreateSession(pb.CreateSessionRequest(session_id="c2b", spec=bad_spec), timeout=5)
    assert e.value.details().startswith("spec.kv_dtype")
    # Zero state change: same stored chunks, same answers (counters aside).
    assert client.info("c2").num_chunks == stats_before
    after = client.search("c2", queries, 3)
    assert np.array_equal(before.ids, after.ids) and np.array_equal(before.records, after.records)
    with pytest.raises(errors.NotFound):
        client.info("c2b")


def test_a_message_over_the_size_limit_is_resource_exhausted(tmp_path: Path) -> None:
    server = RetMemServer(RetMemConfig(data_dir=tmp_path, max_message_bytes=1 << 20))
    server.start()
    try:
        client = RetMemClient({"shard0": server.address()})  # client allows 64 MiB
        spec = tiny_spec(memory_size=100_000)
        client.create_session("c3", spec)
        rng = np.random.default_rng(13)
        with pytest.raises(errors.ResourceExhausted):
            client.append("c3", *chunks(rng, spec, 0, 20_000))  # ~2.5 MB request
        assert health_status(server.address()) == SERVING
        assert client.append("c3", *chunks(rng, spec, 0, 10)) == 10
    finally:
        server.stop(grace_s=1)


def test_unknown_deleted_and_deleted_before_a_restart_sessions_are_not_found(tmp_path: Path) -> None:
    config = RetMemConfig(data_dir=tmp_path)
    server = RetMemServer(config)
    server.start()
    client = RetMemClient({"shard0": server.address()})
    spec, q = tiny_spec(), np.zeros((1, 16), np.float32)
    client.create_session("del", spec)
    client.append("del", *chunks(np.random.default_rng(14), spec, 0, 3))
    with pytest.raises(errors.NotFound):
        client.search("never", q, 1)
    client.delete_session("del")
    with pytest.raises(errors.NotFound):
        client.search("del", q, 1)
    server.stop(grace_s=1)
    server = RetMemServer(config)
    server.start()
    client = RetMemClient({"shard0": server.address()})
    for call in (
        lambda: client.search("del", q, 1),
        lambda: client.info("del"),
        lambda: client.delete_session("del"),
    ):
        with pytest.raises(errors.NotFound):
            call()
    with pytest.raises(errors.AlreadyExists):  # ids of deleted sessions are never reused
        client.create_session("del", spec)
    server.stop(grace_s=1)


def test_a_repeated_append_stores_nothing_and_changed_bytes_are_refused(client: RetMemClient) -> None:
    """Appends are idempotent by chunk id: a repeated batch stores nothing, an overlapping one stores only
    its new chunks, and a stored id sent with other bytes is ALREADY_EXISTS."""
    spec, rng = tiny_spec(), np.random.default_rng(15)
    client.create_session("c5", spec)
    batch = chunks(rng, spec, 0, 6)
    assert client.append("c5", *batch) == 6
    assert client.append("c5", *batch) == 0
    ids, emb, rec, lengths = batch
    more = chunks(rng, spec, 6, 3)
    overlap = [np.concatenate([a[3:], b]) for a, b in zip(batch, more, strict=True)]
    assert client.append("c5", *overlap) == 3
    rec2 = rec.copy()
    rec2[2, 0] ^= 0xFF
    with pytest.raises(errors.AlreadyExists):
        client.append("c5", ids, emb, rec2, lengths)
    assert client.info("c5").num_chunks == 9


def test_a_late_append_is_refused_not_dropped(client: RetMemClient) -> None:
    """A chunk sent out of order (below the highest seq, never stored) would be lost silently."""
    spec, rng = tiny_spec(), np.random.default_rng(16)
    client.create_session("late", spec)
    ids, emb, rec, lengths = chunks(rng, spec, 0, 8)
    keep = np.array([0, 1, 2, 5, 6, 7])  # 3 and 4 held back by the client
    assert client.append("late", ids[keep], emb[keep], rec[keep], lengths[keep]) == 6
    with pytest.raises(errors.FailedPrecondition, match="never stored") as e:
        client.append("late", ids[3:5], emb[3:5], rec[3:5], lengths[3:5])
    assert "[3, 4]" in str(e.value)
    _, state = client.export_session("late")
    assert state["ids"].tolist() == keep.tolist()


def _append_request(spec, session_id: str, batch) -> pb.AppendRequest:
    return wire.append_request(spec, session_id, *batch)


def test_a_write_without_time_for_it_is_refused_and_stores_nothing(server, client) -> None:
    spec, rng = tiny_spec(), np.random.default_rng(17)
    client.create_session("tight", spec)
    stub = pb_grpc.RetMemStub(grpc.insecure_channel(server.address()))
    for k in range(10):
        req = _append_request(spec, "tight", chunks(rng, spec, k, 1))
        with pytest.raises(grpc.RpcError) as err:
            stub.Append(req, timeout=0.001)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert client.info("tight").num_chunks == 0  # refused before anything was written, 10 of 10


def test_a_write_that_outlives_its_deadline_may_be_applied_and_a_retry_stores_it_once(
    server, client, monkeypatch
) -> None:
    """The contract in retmem.proto: DEADLINE_EXCEEDED on a write means "maybe applied"; retry."""
    spec, rng = tiny_spec(), np.random.default_rng(18)
    client.create_session("slow", spec)
    batch = chunks(rng, spec, 0, 4)
    shard = server.shards["shard0"]
    real, applied = shard.append, threading.Event()
    release = threading.Event()

    def slow_append(*args):
        n = real(*args)  # durable now
        applied.set()
        release.wait(30)  # the reply is held back past the caller's deadline
        return n

    monkeypatch.setattr(shard, "append", slow_append)
    stub = pb_grpc.RetMemStub(grpc.insecure_channel(server.address()))
    with pytest.raises(grpc.RpcError) as err:
        stub.Append(_append_request(spec, "slow", batch), timeout=1.0)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert applied.wait(30)
    release.set()
    monkeypatch.setattr(shard, "append", real)
    assert client.append("slow", *batch) == 0  # the retry finds it applied
    _, state = client.export_session("slow")
    assert state["ids"].tolist() == batch[0].tolist()


def test_health_is_not_serving_while_the_shards_recover(tmp_path: Path, monkeypatch) -> None:
    gate = threading.Event()
    real_open = Shard.open
    monkeypatch.setattr(Shard, "open", lambda self: gate.wait(30) and real_open(self))
    server = RetMemServer(RetMemConfig(data_dir=tmp_path))
    server.start(recover_in_background=True)
    target = server.address()
    try:
        assert health_status(target) == NOT_SERVING
        client = RetMemClient({"shard0": target}, timeout_s=2)
        with pytest.raises(errors.Unavailable):
            client.create_session("d4", tiny_spec())
        gate.set()
        assert server.recovered.wait(30)
        assert health_status(target) == SERVING
        client.create_session("d4", tiny_spec())
        # The probe answers promptly under write load.
        rng = np.random.default_rng(16)
        stop = threading.Event()

        def writer() -> None:
            i = 0
            while not stop.is_set():
                client.append("d4", *chunks(rng, tiny_spec(), i, 8))
                i += 8

        t = threading.Thread(target=writer)
        t.start()
        statuses = [health_status(target) for _ in range(20)]
        stop.set()
        t.join(30)
        assert statuses == [SERVING] * 20
    finally:
        gate.set()
        server.stop(grace_s=1)


def test_graceful_stop_finishes_calls_in_flight_and_refuses_new_ones(tmp_path: Path, monkeypatch) -> None:
    """Stopping flips health to NOT_SERVING while the listener is open, refuses new calls with
    UNAVAILABLE, and lets the calls already running finish."""
    server = RetMemServer(RetMemConfig(data_dir=tmp_path))
    server.start()
    target = server.address()
    client = RetMemClient({"shard0": target}, timeout_s=30)
    spec, rng = tiny_spec(), np.random.default_rng(17)
    client.create_session("a3", spec)
    client.append("a3", *chunks(rng, spec, 0, 10))
    entered, release = threading.Semaphore(0), threading.Event()
    real_search = Shard.search

    def slow_search(self, *a, **kw):
        entered.release()
        release.wait(30)
        return real_search(self, *a, **kw)

    monkeypatch.setattr(Shard, "search", slow_search)
    results: list = []

    def in_flight() -> None:
        results.append(client.search("a3", rng.standard_normal((1, spec.dim)).astype(np.float32), 4))

    callers = [threading.Thread(target=in_flight) for _ in range(3)]
    for t in callers:
        t.start()
    for _ in callers:
        assert entered.acquire(timeout=30)
    watch = health_pb2_grpc.HealthStub(grpc.insecure_channel(target)).Watch(
        health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=30
    )
    assert next(watch).status == SERVING
    server.begin_stop()  # what SIGTERM does first
    assert next(watch).status == NOT_SERVING  # health flips while the listener is still open
    with pytest.raises(errors.Unavailable):  # new calls are refused once stopping
        RetMemClient({"shard0": target}, timeout_s=5).info("a3")
    watch.cancel()  # the watch is itself an in-flight call
    stopper = threading.Thread(target=server.finish_stop, kwargs={"grace_s": 30})
    stopper.start()
    release.set()
    for t in callers:
        t.join(30)
    stopper.join(30)
    assert len(results) == 3 and all(r.ids.shape == (1, 4) for r in results)


def test_routing_refuses_foreign_sessions_and_client_routes(tmp_path: Path) -> None:
    # Two processes' worth of servers, one shard each, plus the client ring over both.
    a = RetMemServer(RetMemConfig(data_dir=tmp_path, shards=("a",)))
    b = RetMemServer(RetMemConfig(data_dir=tmp_path, shards=("b",)))
    a.start()
    b.start()
    addrs = {"a": a.address(), "b": b.address()}
    try:
        for srv in (a, b):  # tell each server the whole ring
            srv.placement.__init__(srv.config.shards, addrs)
        client = RetMemClient(addrs)
        ring = Ring(["a", "b"])
        spec = tiny_spec()
        sids = [f"sess-{i}" for i in range(40)]
        for sid in sids:
            client.create_session(sid, spec)
            assert client.info(sid).shard == ring.owner(sid)
        assert {ring.owner(s) for s in sids} == {"a", "b"}
        foreign = next(s for s in sids if ring.owner(s) == "b")
        wrong = RetMemClient({"a": addrs["a"]})  # a client with a stale ring sends b's session to a
        with pytest.raises(errors.FailedPrecondition, match="shard 'b'"):
            wrong.info(foreign)
    finally:
        a.stop(grace_s=1)
        b.stop(grace_s=1)


def test_one_process_hosts_several_shards_and_sessions_move(tmp_path: Path) -> None:
    server = RetMemServer(RetMemConfig(data_dir=tmp_path, shards=("x", "y", "z")))
    server.start()
    addr = server.address()
    client = RetMemClient({"x": addr, "y": addr, "z": addr})
    spec, rng = tiny_spec(), np.random.default_rng(18)
    owners = set()
    for i in range(30):
        client.create_session(f"m{i}", spec)
        owners.add(client.info(f"m{i}").shard)
    assert owners == {"x", "y", "z"}
    client.append("m0", *chunks(rng, spec, 0, 12))
    q = rng.standard_normal((2, spec.dim)).astype(np.float32)
    before = client.search("m0", q, 5)
    exported_spec, state = client.export_session("m0")
    other = RetMemServer(RetMemConfig(data_dir=tmp_path / "other", shards=("x", "y", "z")))
    other.start()
    dest = RetMemClient({n: other.address() for n in ("x", "y", "z")})
    assert dest.import_session("m0", exported_spec, state) == 12
    other.stop(grace_s=1)
    other = RetMemServer(RetMemConfig(data_dir=tmp_path / "other", shards=("x", "y", "z")))
    other.start()  # the import is durable
    dest = RetMemClient({n: other.address() for n in ("x", "y", "z")})
    after = dest.search("m0", q, 5)
    assert np.array_equal(before.ids, after.ids) and np.array_equal(before.records, after.records)
    other.stop(grace_s=1)
    server.stop(grace_s=1)


def test_retrieve_equals_search_and_large_replies_stream(tmp_path: Path) -> None:
    """The unary Retrieve (per-chunk call) and the streamed Search answer alike; a reply over the
    message limit is RESOURCE_EXHAUSTED from Retrieve and the client streams it with Search."""
    server = RetMemServer(RetMemConfig(data_dir=tmp_path, max_message_bytes=1 << 20))
    server.start()
    try:
        spec = SessionSpec(dim=16, kv_shape=(2, 2, 64, 64), kv_dtype="bfloat16", memory_size=64)  # 32 KiB
        client = RetMemClient({"shard0": server.address()}, timeout_s=20, max_message_bytes=1 << 20)
        client.create_session("r", spec)
        rng = np.random.default_rng(21)
        client.append("r", *chunks(rng, spec, 0, 20))
        stub = stub_for(server)
        queries = rng.standard_normal((3, spec.dim)).astype(np.float32)
        req = pb.SearchRequest(session_id="r", queries=tensor.encode(queries), top_k=4)
        unary = stub.Retrieve(req, timeout=10).rows
        streamed = list(stub.Search(req, timeout=10))
        assert [m.SerializeToString() for m in unary] == [m.SerializeToString() for m in streamed]
        big = rng.standard_normal((10, spec.dim)).astype(np.float32)  # 10 x 8 x 32 KiB > 1 MiB
        with pytest.raises(grpc.RpcError) as e:
            stub.Retrieve(pb.SearchRequest(session_id="r", queries=tensor.encode(big), top_k=8), timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        res = client.search("r", big, 8)  # streamed row by row
        for row in range(len(big)):
            one = client.search("r", big[row : row + 1], 8)  # unary
            np.testing.assert_array_equal(one.ids[0], res.ids[row])
            np.testing.assert_array_equal(one.records[0], res.records[row])
    finally:
        server.stop(grace_s=1)


@pytest.mark.parametrize("package", ["grpc.reflection.v1", "grpc.reflection.v1alpha"])
def test_reflection_answers_v1_and_v1alpha(server, package: str) -> None:
    """grpcurl and other tools ask grpc.reflection.v1 first; v1alpha stays for older ones."""
    from grpc_reflection.v1alpha import reflection_pb2 as rpb

    channel = grpc.insecure_channel(server.address())
    call = channel.stream_stream(
        f"/{package}.ServerReflection/ServerReflectionInfo",
        request_serializer=rpb.ServerReflectionRequest.SerializeToString,
        response_deserializer=rpb.ServerReflectionResponse.FromString,
    )
    requests = [
        rpb.ServerReflectionRequest(list_services=""),
        rpb.ServerReflectionRequest(file_containing_symbol="memlong.retmem.v1.RetMem"),
    ]
    listed, described = call(iter(requests), timeout=10)
    names = {s.name for s in listed.list_services_response.service}
    assert {"memlong.retmem.v1.RetMem", "grpc.reflection.v1.ServerReflection"} <= names
    files = described.file_descriptor_response.file_descriptor_proto
    assert any(b"memlong/api/retmem/v1/retmem.proto" in f for f in files)
    channel.close()


def test_a_server_started_where_an_earlier_one_stopped_answers_the_first_call(tmp_path: Path) -> None:
    """A cached channel to a stopped server sits in reconnect backoff, failing calls fast; a new server
    at the same address in this process drops it from the cache, so the first call (not retried:
    CreateSession is not idempotent) reaches the new server."""
    first = RetMemServer(RetMemConfig(data_dir=tmp_path / "a", shards=("s0",)))
    first.start()
    port = first.port
    client = RetMemClient({"s0": first.address()})
    client.create_session("before", tiny_spec())
    first.stop(grace_s=0)
    for i in range(8):  # failures push the channel's reconnect backoff to its maximum (1 s)
        with pytest.raises(errors.Unavailable):
            client.create_session(f"down-{i}", tiny_spec())
        threading.Event().wait(0.2)
    second = RetMemServer(RetMemConfig(data_dir=tmp_path / "b", shards=("s0",), port=port))
    second.start()
    try:
        client.create_session("after", tiny_spec())
        assert client.info("after").shard == "s0"
    finally:
        second.stop(grace_s=0)
