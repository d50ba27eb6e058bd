"""The same-host K/V transport (shared memory, calls on gRPC) against K/V in the gRPC messages: the same
bytes either way, chosen from the address, off when asked, and a damaged region is an error, never
data."""

from __future__ import annotations

import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from memlong.api.retmem.v1 import retmem_pb2 as pb
from memlong.api.retmem.v1 import retmem_pb2_grpc as pb_grpc
from memlong.errors import DataLoss, InvalidArgument
from memlong.rpc import metrics
from memlong.rpc.channel import CallScope
from memlong.services.common import tensor
from memlong.services.retmem import rawwire, shm
from memlong.services.retmem.client import GRPC, SHM, RetMemClient
from memlong.services.retmem.server import RetMemConfig, RetMemServer
from memlong.services.retmem.shard import Shard
from memlong.services.retmem.store import SessionSpec

from .servers import chunks

pytestmark = pytest.mark.skipif(shm.default_dir() is None, reason="no /dev/shm on this host")

# Two memory layers: 2 x 2 x 2 heads x 8 tokens x 4 dims, bf16 = 1 KiB records
SPEC = SessionSpec(dim=16, kv_shape=(2, 2, 2, 8, 4), kv_dtype="bfloat16", memory_size=64)


def _clients(server: RetMemServer) -> tuple[RetMemClient, RetMemClient]:
    target = {"shard0": server.address()}
    return RetMemClient(target, timeout_s=20, shared_memory=True), RetMemClient(
        target, timeout_s=20, shared_memory=False
    )


def _same(a, b) -> None:
    for name in ("ids", "scores", "records", "lengths"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape and x.dtype == y.dtype, name
        assert np.array_equal(x, y), name


def _segments() -> set[str]:
    return {p.name for p in shm.DEFAULT_DIR.glob(f"{shm.PREFIX}{os.getpid()}-*")}


def test_shared_memory_returns_the_bytes_grpc_does(server: RetMemServer) -> None:
    fast, plain = _clients(server)
    rng = np.random.default_rng(0)
    fast.create_session("t1", SPEC)
    ids, emb, rec, lengths = chunks(rng, SPEC, 0, 12)
    assert fast.append("t1", ids[:6], emb[:6], rec[:6], lengths[:6]) == 6  # through shared memory
    assert plain.append("t1", ids[6:], emb[6:], rec[6:], lengths[6:]) == 6  # in the messages
    assert (fast.transport("t1"), plain.transport("t1")) == (SHM, GRPC)
    queries = rng.standard_normal((3, SPEC.dim)).astype(np.float32)
    for q, k in ((queries, 4), (queries[:1], 8), (queries[:1], 20)):  # k=20 > 12 stored: padding
        a, b = fast.search("t1", q, k), plain.search("t1", q, k)
        _same(a, b)
        assert not a.records.flags.writeable
        for row in range(len(q)):
            for col, i in enumerate(a.ids[row]):
                want = rec[i] if i >= 0 else np.zeros(SPEC.record_bytes, np.uint8)
                assert np.array_equal(a.records[row, col], want)
    assert fast.transport_stats[(SHM, "Append")] == [1, 6 * SPEC.record_bytes]
    assert fast.transport_stats[(SHM, "Retrieve")][0] == 3
    assert plain.transport_stats[(GRPC, "Retrieve")][0] == 3
    assert (GRPC, "Retrieve") not in fast.transport_stats
    # A replay through either path is compared with the stored bytes.
    assert fast.append("t1", ids[6:], emb[6:], rec[6:], lengths[6:]) == 0
    assert plain.append("t1", ids[:6], emb[:6], rec[:6], lengths[:6]) == 0


def test_chosen_from_the_address(server: RetMemServer, monkeypatch) -> None:
    for local in ("127.0.0.1:5", "localhost:5", "[::1]:5", "unix:/run/x.sock", "ipv4:127.0.0.9:7"):
        assert shm.is_local_address(local), local
    for remote in ("10.1.2.3:50061", "retmem-0.retmem.memlong.svc:50061", "[2001:db8::1]:5"):
        assert not shm.is_local_address(remote), remote
    attached = []
    table = server.servicer.segments
    real = table.nonce
    monkeypatch.setattr(table, "nonce", lambda *a: attached.append(1) or real(*a))
    fast, _ = _clients(server)
    rng = np.random.default_rng(1)
    fast.create_session("t2", SPEC)
    assert fast.transport("t2") == SHM and attached == [1]
    fast.append("t2", *chunks(rng, SPEC, 0, 3))
    assert fast.transport("t2") == SHM and attached == [1]  # decided once per address
    # The same server reached through an address that does not look local: plain gRPC, never Attach.
    monkeypatch.setattr(shm, "is_local_address", lambda target: False)
    remote, _ = _clients(server)
    remote.search("t2", np.ones((1, SPEC.dim), np.float32), 2)
    assert remote.transport("t2") == GRPC and attached == [1]
    assert list(remote.transport_stats) == [(GRPC, "Retrieve")]


def test_turned_off_it_falls_back_to_grpc(server: RetMemServer, tmp_path: Path, monkeypatch) -> None:
    rng = np.random.default_rng(2)
    batch = chunks(rng, SPEC, 0, 5)
    query = batch[1][:1]
    fast, plain = _clients(server)
    fast.create_session("t3", SPEC)
    fast.append("t3", *batch)
    want = fast.search("t3", query, 3)
    # Off in the client: by argument, by the process-wide switch.
    monkeypatch.setenv(shm.ENV_SWITCH, "0")
    by_env = RetMemClient({"shard0": server.address()}, timeout_s=20)
    for client in (plain, by_env):
        _same(client.search("t3", query, 3), want)
        assert client.transport("t3") == GRPC
    # Off in the server: Attach is refused, the client keeps K/V in the messages.
    off = RetMemServer(RetMemConfig(data_dir=tmp_path / "off", shared_memory=False))
    off.start()
    try:
        client = RetMemClient({"shard0": off.address()}, timeout_s=20, shared_memory=True)
        client.create_session("t3", SPEC)
        client.append("t3", *batch)
        assert client.transport("t3") == GRPC
        _same(client.search("t3", query, 3), want)
        # Turned off after the client chose shared memory: the refused call is made again over gRPC.
        off.servicer.segments = server.servicer.segments.__class__(None)
        client._transports[client._target("t3")] = SHM
        _same(client.search("t3", query, 3), want)
        assert client.transport("t3") == GRPC
    finally:
        off.stop(grace_s=1)


def test_a_damaged_record_or_torn_region_is_an_error_not_data(server: RetMemServer, monkeypatch) -> None:
    fast, plain = _clients(server)
    rng = np.random.default_rng(3)
    fast.create_session("t4", SPEC)
    batch = chunks(rng, SPEC, 0, 6)
    fast.append("t4", *batch)
    query = batch[1][2:3]  # chunk 2's own embedding: chunk 2 is retrieved
    want = plain.search("t4", query, 4)
    assert 2 in want.ids

    # Damaged on disk: the server finds it as it reads the record into the region.
    (kv_file,) = (server.config.data_dir / "shard0").rglob("*.kv")
    at = 2 * SPEC.record_bytes + 7  # chunk 2 (the one append wrote chunks 0..5 in order)

    def flip() -> None:
        with open(kv_file, "r+b") as f:
            f.seek(at)
            b = f.read(1)
            f.seek(at)
            f.write(bytes([b[0] ^ 0x20]))

    flip()
    before = _segments()
    with pytest.raises(DataLoss, match="K/V record in file .* fails its CRC-32"):  # the server's check
        fast.search("t4", query, 4)
    assert not (_segments() - before)  # the segment of the failed call is dropped, not reused
    flip()
    _same(fast.search("t4", query, 4), want)

    # A server that does not check them (older than records_checked), and a region changed after it
    # was written (a torn write): the client checks every record itself.
    servicer, shard = server.servicer, server.shards["shard0"]
    real, real_rows = shard.search, servicer._rows

    def torn(*args, **kw):
        result = real(*args, **kw)
        if kw.get("into") is not None:
            kw["into"][0, 1, 5] ^= 0xFF
        return result

    def unchecked(*args, **kw):
        for row in real_rows(*args, **kw):
            msg = pb.SearchResponse.FromString(row)
            msg.records_checked = False
            yield msg.SerializeToString()

    monkeypatch.setattr(servicer, "_rows", unchecked)
    _same(fast.search("t4", query, 4), want)  # checked by the client, and right
    monkeypatch.setattr(shard, "search", torn)
    before = _segments()
    with pytest.raises(DataLoss, match="fail the CRC-32 they were stored with"):  # the client's check
        fast.search("t4", query, 4)
    assert not (_segments() - before)  # the damaged segment is dropped, not reused
    monkeypatch.setattr(shard, "search", real)
    monkeypatch.setattr(servicer, "_rows", real_rows)
    _same(fast.search("t4", query, 4), want)

    # A segment shorter than the region named: refused before anything touches it.
    pool = fast._segments()
    real_lease = pool.lease

    def short(nbytes: int) -> shm.Lease:
        lease = real_lease(nbytes)
        os.truncate(lease.segment.path, 16)
        return lease

    monkeypatch.setattr(pool, "lease", short)
    with pytest.raises(InvalidArgument, match="past the segment"):
        fast.search("t4", query, 4)
    monkeypatch.setattr(pool, "lease", real_lease)

    # An append whose region changes between the client's CRC-32 and the server's read: refused whole.
    rows = chunks(rng, SPEC, 6, 2)

    class Tearing:
        def __init__(self, stub):
            self.stub = stub

        def __getattr__(self, name):
            return getattr(self.stub, name)

        def Append(self, req, timeout=None):  # noqa: N802
            region = req.chunks[1].kv_region
            with open(shm.DEFAULT_DIR / region.segment, "r+b") as f:
                f.seek(region.offset + 3)
                b = f.read(1)
                f.seek(region.offset + 3)
                f.write(bytes([b[0] ^ 1]))
            return self.stub.Append(req, timeout=timeout)

    stub_of = fast._stub
    monkeypatch.setattr(fast, "_stub", lambda sid: Tearing(stub_of(sid)))
    with pytest.raises(InvalidArgument) as err:
        fast.append("t4", *rows)
    assert err.value.field == "chunks[1].kv.checksum"
    monkeypatch.setattr(fast, "_stub", stub_of)
    assert fast.info("t4").num_chunks == 6  # nothing of the request was stored
    assert fast.append("t4", *rows) == 2


def test_a_result_keeps_its_region_until_dropped(server: RetMemServer) -> None:
    """Two sessions' results held at once use different regions; a region serves again only after
    every view of the records it holds is gone."""
    fast, plain = _clients(server)
    rng = np.random.default_rng(4)
    for sid in ("tenant-a", "tenant-b"):
        fast.create_session(sid, SPEC)
        fast.append(sid, *chunks(rng, SPEC, 0, 6))
    query = rng.standard_normal((1, SPEC.dim)).astype(np.float32)
    a = fast.search("tenant-a", query, 4)
    b = fast.search("tenant-b", query, 4)
    _same(a, plain.search("tenant-a", query, 4))  # b's retrieval did not overwrite a's records
    _same(b, plain.search("tenant-b", query, 4))
    view = a.records[0, 1]
    del a
    again = fast.search("tenant-b", query, 4)
    assert np.array_equal(view, plain.search("tenant-a", query, 4).records[0, 1])  # still a's bytes
    del view, again, b
    used = len(_segments())
    for _ in range(5):
        fast.search("tenant-a", query, 4)  # each result dropped at once: its region is reused
    assert len(_segments()) == used


def test_segments_are_private_and_the_server_opens_only_its_own(server: RetMemServer, tmp_path: Path) -> None:
    fast, _ = _clients(server)
    fast.create_session("t6", SPEC)
    lease = fast._segments().lease(64)
    st = os.stat(lease.segment.path)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    stub = pb_grpc.RetMemStub(grpc.insecure_channel(server.address()))

    def attach(name: str) -> grpc.StatusCode:
        try:
            stub.Attach(pb.AttachRequest(segment=name, nonce_bytes=16), timeout=5)
        except grpc.RpcError as err:
            return err.code()
        return grpc.StatusCode.OK

    assert attach(lease.segment.name) == grpc.StatusCode.OK
    os.chmod(lease.segment.path, 0o640)  # readable by the group: refused
    assert attach(lease.segment.name) == grpc.StatusCode.FAILED_PRECONDITION
    os.chmod(lease.segment.path, 0o600)
    link = shm.DEFAULT_DIR / f"{shm.PREFIX}{os.getpid()}-{'0' * 32}"
    os.symlink(lease.segment.path, link)
    try:
        assert attach(link.name) == grpc.StatusCode.FAILED_PRECONDITION  # never through a link
    finally:
        link.unlink()
    for bad in ("../etc/passwd", "memlong-kv-1-xyz", f"{shm.PREFIX}1-{'a' * 31}"):
        assert attach(bad) == grpc.StatusCode.INVALID_ARGUMENT
    lease.discard()


def test_transport_is_in_the_metrics(server: RetMemServer) -> None:
    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    try:
        fast, plain = _clients(server)
        rng = np.random.default_rng(5)
        fast.create_session("t7", SPEC)
        batch = chunks(rng, SPEC, 0, 3)
        fast.append("t7", *batch)
        plain.search("t7", batch[1][:1], 2)
        points: dict[tuple, float] = {}
        for rm in reader.get_metrics_data().resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name.startswith("memlong.retmem.transport."):
                        for p in m.data.data_points:
                            a = p.attributes
                            key = (m.name, a["side"], a["transport"], a["rpc.method"])
                            points[key] = p.value
    finally:
        metrics.set_meter_provider(None)
    nbytes = 3 * SPEC.record_bytes
    assert points[("memlong.retmem.transport.bytes", "client", "shm", "Append")] == nbytes
    assert points[("memlong.retmem.transport.bytes", "server", "shm", "Append")] == nbytes
    assert points[("memlong.retmem.transport.calls", "client", "grpc", "Retrieve")] == 1
    assert points[("memlong.retmem.transport.bytes", "client", "grpc", "Retrieve")] == 2 * SPEC.record_bytes


def test_rawwire_messages_read_as_protobuf() -> None:
    """The hand-framed messages are plain protobuf to any parser, and read back by rawwire."""
    rng = np.random.default_rng(6)
    data = [rng.integers(0, 256, 300, np.uint8).tobytes() for _ in range(3)]
    metas = []
    for i, d in enumerate(data):
        m = pb.Chunk(seq=i, length=2, embedding=tensor.encode(np.ones(4, np.float32)))
        m.kv.dtype, m.kv.checksum = tensor.dtype_code("uint8"), tensor.checksum(d)
        m.kv.shape[:] = [300]
        metas.append(m)
    body = rawwire.append_request("s-1", list(zip(metas, data, strict=True)))
    parsed = pb.AppendRequest.FromString(body)
    assert parsed.session_id == "s-1" and [c.kv.data for c in parsed.chunks] == data
    assert [c.kv.checksum for c in parsed.chunks] == [m.kv.checksum for m in metas]
    raw = rawwire.parse_append(parsed.SerializeToString())  # a plain protobuf client's bytes
    assert [bytes(c.data) for c in raw.chunks] == data and raw.chunks[2].meta.seq == 2
    assert not raw.chunks[0].meta.kv.data
    head = pb.SearchResponse(row=0, ids=[1, 2], scores=[0.5, 0.25], lengths=[3, 4])
    head.kv.shape[:] = [600]
    reply = rawwire.retrieve_response([(head, data[0] + data[1])])
    msg = pb.RetrieveResponse.FromString(reply)
    assert msg.rows[0].kv.data == data[0] + data[1] and list(msg.rows[0].ids) == [1, 2]
    ((row, view),) = rawwire.parse_rows(reply)
    assert bytes(view) == data[0] + data[1] and list(row.lengths) == [3, 4]
    assert tensor.concat_checksum([tensor.checksum(d) for d in data[:2]], 300) == tensor.checksum(
        data[0] + data[1]
    )
    for bad in (b"\x0a\xff", b"\x12\x05ab", b"\x0f"):
        with pytest.raises(ValueError):
            rawwire.parse_append(bad)


def test_a_unix_socket_address_is_local(tmp_path: Path) -> None:
    """ret-mem listening on a Unix socket (host "unix:/path"): a client of that address moves K/V
    through shared memory, with the same bytes."""
    sock = tmp_path / "retmem.sock"
    server = RetMemServer(RetMemConfig(data_dir=tmp_path / "data", host=f"unix:{sock}"))
    server.start()
    try:
        assert server.address() == f"unix:{sock}"
        fast = RetMemClient({"shard0": server.address()}, timeout_s=20, shared_memory=True)
        plain = RetMemClient({"shard0": server.address()}, timeout_s=20, shared_memory=False)
        rng = np.random.default_rng(7)
        fast.create_session("u1", SPEC)
        batch = chunks(rng, SPEC, 0, 4)
        fast.append("u1", *batch)
        assert fast.transport("u1") == SHM
        _same(fast.search("u1", batch[1][:2], 3), plain.search("u1", batch[1][:2], 3))
    finally:
        server.stop(grace_s=1)


def test_large_replies_over_grpc_come_in_pieces(server: RetMemServer) -> None:
    """Over gRPC a reply above STREAM_ABOVE is streamed a few records per message (first_slot) and
    joined on arrival: the same result as one message, and as shared memory."""
    fast, plain = _clients(server)
    rng = np.random.default_rng(8)
    fast.create_session("t8", SPEC)
    fast.append("t8", *chunks(rng, SPEC, 0, 10))
    queries = rng.standard_normal((2, SPEC.dim)).astype(np.float32)
    whole = {q: plain.search("t8", queries[:q], 5) for q in (1, 2)}  # unary Retrieve
    for c in (fast, plain):
        c.stream_above, c.piece_bytes = 0, 2 * SPEC.record_bytes
    for q in (1, 2):
        _same(plain.search("t8", queries[:q], 5), whole[q])
        _same(fast.search("t8", queries[:q], 5), whole[q])
    assert plain.transport_stats[(GRPC, "Search")][0] == 2
    stub = pb_grpc.RetMemStub(grpc.insecure_channel(server.address()))
    req = pb.SearchRequest(
        session_id="t8", queries=tensor.encode(queries[:1]), top_k=5, max_records_per_message=2
    )
    pieces = list(stub.Search(req, timeout=5))
    assert [(m.first_slot, m.kv.shape[0]) for m in pieces] == [(0, 2), (2, 2), (4, 1)]
    assert b"".join(m.kv.data for m in pieces) == whole[1].records.tobytes()
    with pytest.raises(grpc.RpcError) as err:
        list(
            stub.Search(
                pb.SearchRequest(session_id="t8", queries=req.queries, top_k=5, max_records_per_message=-1)
            )
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_no_room_in_shared_memory_keeps_the_call_in_the_messages(server: RetMemServer, monkeypatch) -> None:
    """/dev/shm full (segments are reserved whole when created, so that is an error, never a fault):
    the call keeps its K/V in the messages, the address stays same-host."""
    fast, plain = _clients(server)
    rng = np.random.default_rng(10)
    fast.create_session("t10", SPEC)
    assert fast.transport("t10") == SHM

    def full(nbytes: int) -> shm.Lease:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fast._segments(), "lease", full)
    batch = chunks(rng, SPEC, 0, 5)
    assert fast.append("t10", *batch) == 5
    _same(fast.search("t10", batch[1][:1], 3), plain.search("t10", batch[1][:1], 3))
    assert {t for t, _ in fast.transport_stats} == {GRPC} and fast.transport("t10") == SHM


@pytest.mark.parametrize("path", ["shm", "grpc", "grpc streamed"])
def test_a_search_whose_calls_are_cancelled_ends_cancelled_at_once(
    server: RetMemServer, monkeypatch, path: str
) -> None:
    """A search given up (a decoder's retrieval started ahead and not used) is cancelled while the shard
    still works on it: the caller gets CANCELLED without waiting for the shard, and the client goes on
    (a shared region the server may still write into is never used again)."""
    fast, plain = _clients(server)
    client = fast if path == "shm" else plain
    if path == "grpc streamed":
        client.stream_above = 0
    rng = np.random.default_rng(11)
    client.create_session("c", SPEC)
    client.append("c", *chunks(rng, SPEC, 0, 10))
    queries = rng.standard_normal((1, SPEC.dim)).astype(np.float32)
    want = client.search("c", queries, 3)
    entered, go = threading.Event(), threading.Event()
    search = Shard.search

    def waiting(self, *args, **kwargs):
        entered.set()
        assert go.wait(60)
        return search(self, *args, **kwargs)

    monkeypatch.setattr(Shard, "search", waiting)
    calls = CallScope()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.search, "c", queries, 3, None, calls)
        assert entered.wait(60)
        calls.cancel()
        with pytest.raises(grpc.RpcError) as err:
            pending.result(timeout=60)  # returns while the shard still waits
        assert err.value.code() == grpc.StatusCode.CANCELLED
        assert not go.is_set()
        go.set()
    monkeypatch.undo()
    _same(client.search("c", queries, 3), want)
    with pytest.raises(grpc.RpcError) as err:
        client.search("c", queries, 3, calls=calls)  # a scope cancelled already cancels a new call
    assert err.value.code() == grpc.StatusCode.CANCELLED
