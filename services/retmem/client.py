"""RetMemClient: ret-mem sessions over gRPC, routed by consistent hashing of session ids.

Every call carries a deadline (the client default, or the caller's remaining `Deadline`); only the
idempotent methods are retried, by the channel's service config. Server statuses come back as the
same domain exceptions the in-process store raises, so callers handle both the same way.

K/V transport, chosen per shard address on first use (`transport`):
- "shm" when the address is on this host (`shm.is_local_address`), the setting allows it
  (`shared_memory`, MEMLONG_RETMEM_SHARED_MEMORY) and the server proves it sees this client's
  segments (`Attach`): an append's records are copied once into a shared region and the server writes
  them to its data files from there; a retrieval's records are read by the server into a region and
  handed on as a view of it, each checked against the CRC-32 it was stored with. The calls themselves
  stay on gRPC.
- "grpc" otherwise: the K/V travel in the messages, framed by `rawwire` so that protobuf never copies
  them (an append's records are joined once into the request bytes; a reply's records are a view of
  the received bytes, checked against the row's CRC-32).
Each K/V-carrying call is counted in `transport_stats` and the memlong.retmem.transport.* metrics.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np

from memlong.api.retmem.v1 import retmem_pb2 as pb
from memlong.api.retmem.v1 import retmem_pb2_grpc as pb_grpc
from memlong.errors import DataLoss, FailedPrecondition, InvalidArgument
from memlong.memory import SearchResult
from memlong.rpc import metrics
from memlong.rpc.channel import (
    DEFAULT_MAX_MESSAGE_BYTES,
    CallScope,
    ChannelOptions,
    Deadline,
    get_channel,
    reconnecting,
)
from memlong.rpc.status import raise_for_rpc_error
from memlong.rpc.tls import TlsConfig
from memlong.services.common import parallel, tensor

from . import rawwire, shm, wire
from .routing import Ring
from .store import SessionInfo, SessionSpec, as_records

log = logging.getLogger(__name__)
T = TypeVar("T")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RetMem"].full_name
# Safe to repeat: appends are idempotent by chunk id, reads change at most retrieval counters.
# (Attach is not retried: a call whose Attach fails goes over gRPC, and the next one asks again.)
IDEMPOTENT = ("Append", "Search", "Retrieve", "Fetch", "Pin", "Unpin", "GetSession", "ExportSession")
SHM, GRPC = "shm", "grpc"
SHM_REQUEST_BYTES = 256 << 20  # K/V of one Append through shared memory (bounds a segment's size)
# Replies over gRPC larger than this come streamed in pieces of about PIECE_BYTES (Search with
# max_records_per_message), joined on arrival: a per-layer top-8 (24 MiB) over loopback took 43 ms so
# against 66 ms as one Retrieve message (interleaved A/B; bench/results/retmem.md, grpc vs grpc_unary).
STREAM_ABOVE = 8 << 20
PIECE_BYTES = 4 << 20
ATTACH_TIMEOUT_S = 5.0


class _NoSegment(Exception):
    """No shared region could be had for a call (see RetMemClient._lease)."""


def _unary(
    method: grpc.UnaryUnaryMultiCallable, request: Any, timeout: float, calls: CallScope | None
) -> Any:
    """The reply of a unary call; with `calls`, the call is made as a future added there (a blocking
    call cannot be cancelled from another thread). Cancelled: its RpcError, code CANCELLED."""
    if calls is None:
        return method(request, timeout=timeout)
    call = calls.start(lambda: method.future(request, timeout=timeout))
    try:
        return call.result()
    except grpc.FutureCancelledError:
        raise call from None  # the call is an RpcError whose code() is CANCELLED


class _RawStub:
    """The K/V-carrying methods with bytes on the K/V side: Append takes rawwire request bytes,
    Retrieve and Search return the reply bytes for rawwire to read."""

    def __init__(self, channel: grpc.Channel) -> None:
        method = f"/{SERVICE_NAME}/"
        self.Append = channel.unary_unary(
            method + "Append", request_serializer=None, response_deserializer=pb.AppendResponse.FromString
        )
        self.Retrieve = channel.unary_unary(
            method + "Retrieve",
            request_serializer=pb.SearchRequest.SerializeToString,
            response_deserializer=None,
        )
        self.Search = channel.unary_stream(
            method + "Search",
            request_serializer=pb.SearchRequest.SerializeToString,
            response_deserializer=None,
        )


class RetMemClient:
    """Client for one ring of ret-mem shards. `shards` maps shard name -> "host:port"."""

    def __init__(
        self,
        shards: Mapping[str, str],
        timeout_s: float = 10.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        internal_token: str | None = None,
        tls: TlsConfig | None = None,  # None: the process's internal TLS policy
        shared_memory: bool | None = None,  # same-host transport; None: MEMLONG_RETMEM_SHARED_MEMORY (on)
        shm_dir: Path | None = None,  # None: shm.default_dir() (/dev/shm)
    ) -> None:
        self.ring = Ring(list(shards))
        self.targets = dict(shards)
        self.timeout_s = timeout_s
        self.max_message_bytes = max_message_bytes
        self.options = ChannelOptions(
            max_message_bytes=max_message_bytes,
            idempotent_methods=tuple((SERVICE_NAME, m) for m in IDEMPOTENT),
            internal_token=internal_token,
            tls=tls,
            internal=True,
        )
        self._specs: dict[str, SessionSpec] = {}
        self.shared_memory = shm.enabled_by_env() if shared_memory is None else shared_memory
        self.shm_dir = shm_dir or shm.default_dir()
        self._pool: shm.SegmentPool | None = None
        self._transports: dict[str, str] = {}  # target -> SHM or GRPC, decided on first use
        self._transport_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        # (transport, method) -> [calls, K/V bytes]: what metrics count, for reading in process.
        self.transport_stats: dict[tuple[str, str], list[int]] = {}
        self.stream_above, self.piece_bytes = STREAM_ABOVE, PIECE_BYTES  # K/V over gRPC: see above

    # ------------------------------------------------------------------------------- plumbing

    def _target(self, session_id: str) -> str:
        return self.targets[self.ring.owner(session_id)]

    def _stub(self, session_id: str) -> pb_grpc.RetMemStub:
        return pb_grpc.RetMemStub(get_channel(self._target(session_id), self.options))

    def _raw(self, session_id: str) -> _RawStub:
        return _RawStub(get_channel(self._target(session_id), self.options))

    def _timeout(self, deadline: Deadline | None) -> float:
        return self.timeout_s if deadline is None else deadline.timeout(cap_s=self.timeout_s)

    def _reconnecting(self, session_id: str, attempt: Callable[[], T]) -> T:
        """`attempt()`, once more on a fresh channel when it could not connect (`reconnecting`): a
        restarted shard is reached as soon as it listens, not after the old channel's backoff."""
        return reconnecting(self._target(session_id), attempt)

    def _call(self, session_id: str, method: str, request: Any, deadline: Deadline | None) -> Any:
        try:
            return self._reconnecting(
                session_id,
                lambda: getattr(self._stub(session_id), method)(request, timeout=self._timeout(deadline)),
            )
        except grpc.RpcError as err:
            raise_for_rpc_error(err)

    def _count(self, transport: str, method: str, direction: str, nbytes: int) -> None:
        with self._stats_lock:
            entry = self.transport_stats.setdefault((transport, method), [0, 0])
            entry[0] += 1
            entry[1] += nbytes
        labels = {"transport": transport, "rpc.method": method, "side": "client"}
        inst = metrics.instruments()
        inst.transport_calls.add(1, labels)
        inst.transport_bytes.add(nbytes, {**labels, "direction": direction})

    # ------------------------------------------------------------------------------ transport

    def transport(self, session_id: str, deadline: Deadline | None = None) -> str:
        """How K/V reach the shard that owns `session_id`: SHM or GRPC (decided once per address)."""
        target = self._target(session_id)
        chosen = self._transports.get(target)
        if chosen is not None:
            return chosen
        if not (self.shared_memory and self.shm_dir is not None and shm.is_local_address(target)):
            self._transports[target] = GRPC
            return GRPC
        with self._transport_lock:  # one Attach per address
            chosen = self._transports.get(target)
            if chosen is None:
                chosen = self._attach(target, session_id, deadline)
        return chosen

    def _segments(self) -> shm.SegmentPool:
        if self._pool is None:
            assert self.shm_dir is not None
            self._pool = shm.SegmentPool(self.shm_dir)
        return self._pool

    def _lease(self, nbytes: int) -> shm.Lease:
        """A shared region for one call; _NoSegment when /dev/shm has no room for one (that call then
        keeps its K/V in the messages)."""
        try:
            return self._segments().lease(nbytes)
        except OSError as e:
            log.warning("no shared segment of %d bytes (%s); this call keeps K/V in the messages", nbytes, e)
            raise _NoSegment from e

    def _attach(self, target: str, session_id: str, deadline: Deadline | None) -> str:
        """Prove the server sees this client's segments: it reads back a nonce written into one."""
        nonce = secrets.token_bytes(shm.NONCE_BYTES)
        try:
            lease = self._segments().lease(len(nonce))
        except OSError as e:
            log.warning("ret-mem %s: no shared memory here (%s); K/V go over gRPC", target, e)
            self._transports[target] = GRPC
            return GRPC
        lease.array[:] = np.frombuffer(nonce, np.uint8)
        req = pb.AttachRequest(segment=lease.segment.name, nonce_bytes=len(nonce))
        try:
            reply = self._stub(session_id).Attach(req, timeout=min(self._timeout(deadline), ATTACH_TIMEOUT_S))
            ok, why = reply.nonce == nonce, "the segment reads differently there"
        except grpc.RpcError as err:
            if err.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.CANCELLED,
            ):
                return GRPC  # not decided: this call goes over gRPC, the next one asks again
            ok, why = False, f"{err.code().name}: {err.details()}"
        del lease  # back to the pool
        chosen = SHM if ok else GRPC
        if ok:
            log.info("ret-mem %s: K/V through shared memory (%s)", target, self.shm_dir)
        else:
            log.info("ret-mem %s: K/V over gRPC (shared memory refused: %s)", target, why)
        self._transports[target] = chosen
        return chosen

    def _shm_refused(self, session_id: str, err: FailedPrecondition) -> bool:
        """A shared-memory call the server refused for its segment (e.g. shared memory turned off
        since): the address falls back to gRPC and the call is made again that way."""
        if not str(err).startswith("shared segment:"):
            return False
        log.warning("ret-mem %s: %s; K/V go over gRPC from now on", self._target(session_id), err)
        self._transports[self._target(session_id)] = GRPC
        return True

    def spec(self, session_id: str, deadline: Deadline | None = None) -> SessionSpec:
        """The session's spec (cached: it never changes)."""
        spec = self._specs.get(session_id)
        if spec is None:
            spec = self.info(session_id, deadline).spec
            self._specs[session_id] = spec
        return spec

    # ----------------------------------------------------------------------------- the protocol

    def create_session(self, session_id: str, spec: SessionSpec, deadline: Deadline | None = None) -> None:
        req = pb.CreateSessionRequest(session_id=session_id, spec=wire.spec_to_proto(spec))
        self._call(session_id, "CreateSession", req, deadline)
        self._specs[session_id] = spec

    def append(
        self,
        session_id: str,
        ids: np.ndarray,
        embeddings: np.ndarray,
        kv: np.ndarray,
        lengths: np.ndarray,
        deadline: Deadline | None = None,
    ) -> int:
        """Append chunks: ids (n,), embeddings (n, dim) float32, kv (n, record_bytes) uint8 or typed."""
        spec = self.spec(session_id, deadline)
        records = as_records(spec, np.asarray(kv))  # (n, record_bytes)
        embeddings = np.asarray(embeddings, np.float32)
        ids, lengths = np.asarray(ids, np.int64), np.asarray(lengths)
        # Several requests when the chunks would not fit one message (per-layer records are MBs each)
        # or one segment; appends are idempotent per sequence number, so a retried part stores nothing
        # twice. What shared memory cannot take (refused, or no room in /dev/shm) goes over gRPC.
        appended, done = 0, 0
        if self.transport(session_id, deadline) == SHM:
            # the K/V go through the segment; ids, embeddings and lengths still travel in the message
            meta_bytes = 4 * spec.dim + 256
            per_msg = max(
                1, min(SHM_REQUEST_BYTES // spec.record_bytes, (self.max_message_bytes - 4096) // meta_bytes)
            )
            try:
                for lo in range(0, len(ids), per_msg):
                    part = slice(lo, lo + per_msg)
                    args = (spec, session_id, ids[part], embeddings[part], records[part], lengths[part])
                    appended += self._append_shm(*args, deadline)
                    done = min(lo + per_msg, len(ids))
            except FailedPrecondition as e:
                if not self._shm_refused(session_id, e):
                    raise
            except _NoSegment:
                pass
        per_msg = max(1, (self.max_message_bytes - 4096) // (spec.record_bytes + 4 * spec.dim + 256))
        for lo in range(done, len(ids), per_msg):
            part = slice(lo, lo + per_msg)
            args = (spec, session_id, ids[part], embeddings[part], records[part], lengths[part])
            appended += self._append_grpc(*args, deadline)
        return appended

    @staticmethod
    def _chunk(
        spec: SessionSpec, seq: Any, embedding: np.ndarray, record: np.ndarray, length: Any
    ) -> pb.Chunk:
        """A Chunk without K/V bytes: kv has dtype, shape and the CRC-32 of `record`."""
        chunk = pb.Chunk(seq=int(seq), embedding=tensor.encode(embedding), length=int(length))
        chunk.kv.dtype = wire.kv_dtype_code(spec)
        chunk.kv.shape[:] = spec.wire_kv[1]
        chunk.kv.checksum = tensor.checksum(record)
        return chunk

    def _append_grpc(self, spec, session_id, ids, embeddings, records, lengths, deadline) -> int:
        """K/V in the request: joined once from `records` into the request bytes (rawwire)."""
        chunks = [
            (self._chunk(spec, ids[i], embeddings[i], records[i], lengths[i]), memoryview(records[i]))
            for i in range(len(ids))
        ]
        body = rawwire.append_request(session_id, chunks)
        try:
            reply = self._reconnecting(
                session_id, lambda: self._raw(session_id).Append(body, timeout=self._timeout(deadline))
            )
        except grpc.RpcError as err:
            raise_for_rpc_error(err)
        self._count(GRPC, "Append", "sent", records.nbytes)
        return reply.appended

    def _append_shm(self, spec, session_id, ids, embeddings, records, lengths, deadline) -> int:
        """K/V through a shared region: copied once into it; the server writes them from there."""
        n, rb = records.shape
        lease = self._lease(n * rb)
        try:
            region = lease.array.reshape(n, rb)
            np.copyto(region, records)  # the one copy between the caller's records and the data file
            req = pb.AppendRequest(session_id=session_id)
            for i in range(n):
                chunk = self._chunk(spec, ids[i], embeddings[i], records[i], lengths[i])
                chunk.kv_region.CopyFrom(lease.region(i * rb, rb))
                req.chunks.append(chunk)
            reply = self._reconnecting(
                session_id, lambda: self._stub(session_id).Append(req, timeout=self._timeout(deadline))
            )
        except grpc.RpcError as err:
            lease.discard()  # the server may still read it: never reuse
            raise_for_rpc_error(err)
        except BaseException:
            lease.discard()
            raise
        self._count(SHM, "Append", "sent", records.nbytes)
        return reply.appended

    def search(
        self,
        session_id: str,
        queries: np.ndarray,
        top_k: int,
        deadline: Deadline | None = None,
        calls: CallScope | None = None,
    ) -> SearchResult:
        """Top-k chunks per query row (chronological). records (q, k, record_bytes) uint8, read-only
        where they are a view of what arrived. calls: the search's gRPC call is added to it, so that
        whoever gives the search up can cancel it (it then raises the call's CANCELLED RpcError).

        Through shared memory the records are a view of this call's region (which serves no other
        call while any view of them exists). Otherwise a reply that fits one message comes from the
        unary Retrieve (one round trip: the decoder's per-chunk call) and a larger one is streamed row
        by row by Search; with one query row the records are a view of the reply bytes (no copy).
        """
        spec = self.spec(session_id, deadline)
        queries = np.asarray(queries, np.float32)
        req = pb.SearchRequest(session_id=session_id, queries=tensor.encode(queries), top_k=top_k)
        q, k = len(queries), int(top_k)
        if q and k > 0 and self.transport(session_id, deadline) == SHM:
            try:
                return self._search_shm(spec, session_id, req, q, k, deadline, calls)
            except FailedPrecondition as e:
                if not self._shm_refused(session_id, e):
                    raise
            except _NoSegment:
                pass  # this call over gRPC
        rb = spec.record_bytes
        unary = q * k * rb <= self.stream_above and q * (k * (rb + 32) + 64) <= self.max_message_bytes
        if not unary:
            req.max_records_per_message = max(1, min(self.piece_bytes, self.max_message_bytes // 2) // rb)

        def rows() -> _Rows:
            out = _Rows(spec, q, k)
            timeout = self._timeout(deadline)
            stub = self._raw(session_id)
            if unary:
                for head, data in rawwire.parse_rows(_unary(stub.Retrieve, req, timeout, calls)):
                    out.add(head, data)
                return out
            replies = (
                stub.Search(req, timeout=timeout)
                if calls is None
                else calls.start(lambda: stub.Search(req, timeout=timeout))
            )
            for msg in replies:
                for head, data in rawwire.parse_rows(msg, top_field=None):
                    out.add(head, data)
            return out

        try:
            result = self._reconnecting(session_id, rows).result()
        except grpc.RpcError as err:
            raise_for_rpc_error(err)
        method = "Retrieve" if unary else "Search"
        self._count(GRPC, method, "received", result.records.nbytes)
        return result

    def _search_shm(self, spec, session_id, req, q: int, k: int, deadline, calls) -> SearchResult:
        """The server reads the records into this call's region; each is checked here."""
        nbytes = q * k * spec.record_bytes
        lease = self._lease(nbytes)
        req = pb.SearchRequest(
            session_id=req.session_id,
            queries=req.queries,
            top_k=req.top_k,
            reply_region=lease.region(0, nbytes),
        )
        try:
            reply = self._reconnecting(
                session_id,
                lambda: _unary(self._stub(session_id).Retrieve, req, self._timeout(deadline), calls),
            )
            out = _Rows(spec, q, k)
            for msg in reply.rows:
                out.add_shared(msg, lease)
            result = out.result()
        except grpc.RpcError as err:
            lease.discard()  # the server may still write into it: never reuse
            raise_for_rpc_error(err)
        except BaseException:
            lease.discard()  # a damaged region (DataLoss) is never reused either
            raise
        self._count(SHM, "Retrieve", "received", nbytes)
        return result

    def fetch(
        self, session_id: str, ids: np.ndarray, deadline: Deadline | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        spec = self.spec(session_id, deadline)
        ids = np.asarray(ids, np.int64).reshape(-1)
        resp = self._call(
            session_id, "Fetch", pb.FetchRequest(session_id=session_id, ids=ids.tolist()), deadline
        )
        kv = tensor.decode(resp.kv, "kv", shape=(len(ids), *spec.wire_kv[1]))
        return kv.view(np.uint8).reshape(len(ids), spec.record_bytes), np.asarray(resp.lengths, np.int32)

    def pin(self, session_id: str, ids: np.ndarray, deadline: Deadline | None = None) -> None:
        req = pb.PinRequest(session_id=session_id, ids=np.asarray(ids, np.int64).reshape(-1).tolist())
        self._call(session_id, "Pin", req, deadline)

    def unpin(self, session_id: str, ids: np.ndarray, deadline: Deadline | None = None) -> None:
        req = pb.PinRequest(session_id=session_id, ids=np.asarray(ids, np.int64).reshape(-1).tolist())
        self._call(session_id, "Unpin", req, deadline)

    def evict(
        self,
        session_id: str,
        n_free: int | None = None,
        id_range: tuple[int, int] | None = None,
        deadline: Deadline | None = None,
    ) -> np.ndarray:
        lo, hi = id_range or (0, 0)
        req = pb.EvictRequest(session_id=session_id, n_free=n_free or 0, from_chunk_id=lo, to_chunk_id=hi)
        return np.asarray(self._call(session_id, "Evict", req, deadline).evicted_ids, np.int64)

    def info(self, session_id: str, deadline: Deadline | None = None) -> SessionInfo:
        msg = self._call(session_id, "GetSession", pb.GetSessionRequest(session_id=session_id), deadline)
        return SessionInfo(
            msg.session_id, wire.spec_from_proto(msg.spec), msg.num_chunks, msg.shard, dict(msg.stats)
        )

    def delete_session(self, session_id: str, deadline: Deadline | None = None) -> None:
        self._call(session_id, "DeleteSession", pb.DeleteSessionRequest(session_id=session_id), deadline)
        self._specs.pop(session_id, None)

    def export_session(
        self, session_id: str, deadline: Deadline | None = None
    ) -> tuple[SessionSpec, dict[str, Any]]:
        try:
            _, spec, state = self._reconnecting(
                session_id,
                lambda: wire.parts_to_state(
                    self._stub(session_id).ExportSession(
                        pb.ExportSessionRequest(session_id=session_id), timeout=self._timeout(deadline)
                    )
                ),
            )
        except grpc.RpcError as err:
            raise_for_rpc_error(err)
        return spec, state

    def import_session(
        self, session_id: str, spec: SessionSpec, state: dict[str, Any], deadline: Deadline | None = None
    ) -> int:
        try:
            resp = self._reconnecting(
                session_id,
                lambda: self._stub(session_id).ImportSession(
                    wire.state_to_parts(session_id, spec, state), timeout=self._timeout(deadline)
                ),
            )
        except grpc.RpcError as err:
            raise_for_rpc_error(err)
        self._specs[session_id] = spec
        return resp.num_chunks


class _Rows:
    """Assembles SearchResponse rows into a SearchResult, checking each row's K/V."""

    def __init__(self, spec: SessionSpec, q: int, k: int) -> None:
        self.spec, self.q, self.k = spec, q, k
        self.code = (wire.kv_dtype_code(spec),)
        self.ids = np.full((q, k), -1, np.int64)  # (q, k)
        self.scores = np.full((q, k), -np.inf, np.float32)  # (q, k)
        self.lengths = np.zeros((q, k), np.int32)  # (q, k)
        self.records: np.ndarray | None = None  # (q, k, record_bytes)
        self.filled = np.zeros((q, k), bool)  # slots whose K/V arrived in the messages

    def _row(self, msg: pb.SearchResponse) -> int:
        r = msg.row
        if not 0 <= r < self.q:
            raise InvalidArgument("row", f"reply row {r} outside 0..{self.q - 1}")
        self.ids[r], self.scores[r], self.lengths[r] = msg.ids, msg.scores, msg.lengths
        return r

    def add(self, msg: pb.SearchResponse, data: memoryview | bytes | None = None) -> None:
        """A row, or a piece of one (first_slot), whose K/V are in the message (`data`: cut out of the
        received bytes by rawwire)."""
        r, k, rb = self._row(msg), self.k, self.spec.record_bytes
        first, n = msg.first_slot, (msg.kv.shape[0] if msg.kv.shape else 0)
        if not (0 <= first and 1 <= n and first + n <= k):
            raise InvalidArgument(f"rows[{r}].first_slot", f"slots [{first}, {first + n}) outside 0..{k}")
        shape = (n, *self.spec.wire_kv[1])
        kv = tensor.decode(msg.kv, f"rows[{r}].kv", dtypes=self.code, shape=shape, data=data)
        flat = kv.view(np.uint8).reshape(n, rb)  # (n, record_bytes), a view of the reply
        if self.q == 1 and n == k:
            self.records = flat[None]  # the whole reply in one message: no copy
        else:  # rows or pieces of rows: joined into one array (one copy)
            if self.records is None or not self.records.flags.writeable:
                self.records = np.zeros((self.q, k, rb), np.uint8)
            self.records[r, first : first + n] = flat
        self.filled[r, first : first + n] = True

    def add_shared(self, msg: pb.SearchResponse, lease: shm.Lease) -> None:
        """A row whose K/V the server put in the call's shared region: each record is checked against
        the CRC-32 it was stored with, here unless the server did so as it read them
        (`records_checked`); a damaged record is DataLoss, never data."""
        if not msg.HasField("kv_region"):  # the server kept them in the message
            self.add(msg)
            return
        r, k, rb = self._row(msg), self.k, self.spec.record_bytes
        region, want = msg.kv_region, lease.region(r * k * rb, k * rb)
        if (region.segment, region.offset, region.length) != (want.segment, want.offset, want.length):
            raise InvalidArgument(f"rows[{r}].kv_region", "not the region this call gave")
        tensor.check_header(
            msg.kv, f"rows[{r}].kv", k * rb, dtypes=self.code, shape=(k, *self.spec.wire_kv[1])
        )
        if len(msg.record_crcs) != k:
            raise InvalidArgument(f"rows[{r}].record_crcs", f"{len(msg.record_crcs)} given, {k} expected")
        records = lease.array.reshape(self.q, k, rb)
        crcs = [] if msg.records_checked else parallel.run(tensor.checksum, records[r], k * rb)
        for j in range(len(crcs)):
            if crcs[j] != msg.record_crcs[j]:
                raise DataLoss(
                    f"K/V of chunk {self.ids[r, j]} fail the CRC-32 they were stored with "
                    "(damaged on disk or in the shared segment)"
                )
        records = records.view()
        records.flags.writeable = False  # as a reply's bytes: what the server sent, read-only
        self.records = records  # rows land in place: a view of the region (keeps the lease)

    def result(self) -> SearchResult:
        part = self.filled.any(axis=1) & ~self.filled.all(axis=1)
        if part.any():
            raise InvalidArgument("rows", f"reply row {int(np.flatnonzero(part)[0])} came incomplete")
        records = self.records
        if records is None:
            records = np.zeros((self.q, self.k, self.spec.record_bytes), np.uint8)
        return SearchResult(ids=self.ids, scores=self.scores, records=records, lengths=self.lengths)
