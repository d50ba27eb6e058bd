"""The RetMem gRPC service: decode the request, call the owning shard, encode the reply.

`RetMemServer` hosts one or more shards in one process: it starts listening at once (health
NOT_SERVING), recovers every shard, then flips health to SERVING. `stop` flips health first, then
refuses new calls (UNAVAILABLE) while in-flight ones finish, then closes the logs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import grpc
import numpy as np
from grpc_health.v1 import health_pb2

from memlong.api.retmem.v1 import retmem_pb2 as pb
from memlong.api.retmem.v1 import retmem_pb2_grpc as pb_grpc
from memlong.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from memlong.memory import SearchResult
from memlong.rpc import metrics
from memlong.rpc.status import grpc_errors
from memlong.rpc.tls import TlsConfig
from memlong.services.common import tensor
from memlong.services.common.server import DEFAULT_MAX_MESSAGE_BYTES, ServerOptions, Service, ServiceProcess

from . import wire
from .routing import Placement
from .shard import RecoveryReport, Shard
from .store import SessionSpec

log = logging.getLogger(__name__)
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RetMem"].full_name
# A write that arrives with less time than this left is refused before anything is written: a durable
# write (apply, log, fsync) cannot be promised in less. One that starts runs to completion; see
# `_start_write`.
MIN_WRITE_BUDGET_S = 0.05
# Health entry for stored data: NOT_SERVING while any session is lost (answers DATA_LOSS); the service
# itself stays SERVING for every other session.
INTEGRITY_NAME = SERVICE_NAME + ".integrity"
F32 = (tensor.DType.DTYPE_FLOAT32,)


@dataclass(frozen=True)
class RetMemConfig:
    """Settings of one ret-mem process."""

    data_dir: Path | None
    shards: tuple[str, ...] = ("shard0",)
    host: str = "127.0.0.1"
    port: int = 0
    all_shards: Mapping[str, str] = field(default_factory=dict)  # name -> host:port, incl. remote
    fsync: str = "grouped"
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_workers: int = 16
    checkpoint_bytes: int = 1 << 30
    grace_s: float = 10.0
    drain_s: float = 0.0  # between health NOT_SERVING and closing the listener (probe period)
    checkpoint_on_stop: bool = True  # snapshot at graceful stop so retrieval counters survive it
    internal_token: str | None = None  # callers must send it (memlong.rpc.internal)
    tls: TlsConfig | None = None  # None: the process's internal TLS policy (memlong.rpc.tls)
    # FAISS OpenMP threads, set process-wide when the server is built. One: a per-chunk search is one
    # query row, calls run in parallel on gRPC threads, and idle OpenMP workers spinning on 2 cores
    # made a 2000-chunk search 20x slower.
    faiss_threads: int = 1

    def __post_init__(self) -> None:
        if not self.shards or len(set(self.shards)) != len(self.shards):
            raise InvalidArgument("shards", f"need distinct shard names, got {self.shards}")
        if self.fsync not in ("per-append", "grouped"):
            raise InvalidArgument("fsync", f"must be per-append or grouped, got {self.fsync!r}")
        if not 0 <= self.port < 65536:
            raise InvalidArgument("port", f"out of range: {self.port}")


class RetMemServicer(pb_grpc.RetMemServicer):
    """Thin: wire -> shard -> wire. Validation of bytes happens in memlong.services.common.tensor."""

    def __init__(
        self,
        shards: Mapping[str, Shard],
        placement: Placement,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.shards = shards
        self.placement = placement
        self.max_message_bytes = max_message_bytes
        self.accepting = threading.Event()
        self.accepting.set()
        self.on_delete: Callable[[], None] = lambda: None

    def memory_report(self) -> dict[str, dict[str, float]]:
        """Per shard: sessions, chunks, bytes, evicted_chunks (summed over its sessions), sessions_lost
        (metrics.MemoryReporter). A shard closing or recovering is left out this round."""
        out: dict[str, dict[str, float]] = {}
        for name, shard in self.shards.items():
            totals = dict.fromkeys(("sessions", "chunks", "bytes", "evicted_chunks"), 0.0)
            try:
                totals["sessions_lost"] = float(len(shard.lost_sessions()))
                for sid in shard.sessions():
                    stats = shard.info(sid).stats
                    totals["sessions"] += 1
                    for key in ("chunks", "bytes", "evicted_chunks"):
                        totals[key] += float(stats.get(key, 0))
            except Exception:  # noqa: BLE001 - not observable now (closing or recovering)
                log.debug("shard %s not observable now", name, exc_info=True)
                continue
            out[name] = totals
        return out

    @staticmethod
    def _start_write(context: grpc.ServicerContext) -> None:
        """Refuse a write whose deadline leaves no time for it (DEADLINE_EXCEEDED, nothing written).

        A write that starts completes even if the caller's deadline passes meanwhile: the caller then
        sees DEADLINE_EXCEEDED for a write that may be applied, and retrying it is safe (appends are
        idempotent by chunk id; a repeated create or delete answers ALREADY_EXISTS / NOT_FOUND).
        A call without a deadline has no time limit."""
        left = context.time_remaining()
        if left is not None and left < MIN_WRITE_BUDGET_S:
            raise DeadlineExceeded(
                f"write not started: {max(left, 0) * 1000:.0f} ms left, a durable write needs at least "
                f"{MIN_WRITE_BUDGET_S * 1000:.0f} ms; nothing was written"
            )

    def _shard(self, session_id: str) -> Shard:
        if not self.accepting.is_set():
            raise Unavailable("ret-mem is stopping")
        return self.shards[self.placement.local_owner(session_id)]

    @grpc_errors
    def CreateSession(self, request, context):  # noqa: N802
        self._start_write(context)
        shard = self._shard(request.session_id)
        if not request.HasField("spec"):
            raise InvalidArgument("spec", "must be set")
        shard.create_session(request.session_id, wire.spec_from_proto(request.spec))
        return pb.CreateSessionResponse(shard=shard.name)

    @grpc_errors
    def Append(self, request, context):  # noqa: N802
        self._start_write(context)
        shard = self._shard(request.session_id)
        spec = shard.spec(request.session_id)
        chunks = request.chunks
        if not chunks:
            raise InvalidArgument("chunks", "at least one chunk is required")
        kv_dtype = (wire.kv_dtype_code(spec),)
        embeddings = np.empty((len(chunks), spec.dim), np.float32)  # (n, dim)
        for i, c in enumerate(chunks):
            embeddings[i] = tensor.decode(
                c.embedding, f"chunks[{i}].embedding", dtypes=F32, shape=(spec.dim,)
            )
            tensor.decode(c.kv, f"chunks[{i}].kv", dtypes=kv_dtype, shape=spec.wire_kv[1])
        records = np.frombuffer(b"".join(c.kv.data for c in chunks), np.uint8).reshape(len(chunks), -1)
        ids = np.fromiter((c.seq for c in chunks), np.int64, len(chunks))
        lengths = np.fromiter((c.length for c in chunks), np.int32, len(chunks))
        n = shard.append(request.session_id, ids, embeddings, records, lengths)
        return pb.AppendResponse(appended=n)

    def _search(self, request) -> tuple[SessionSpec, SearchResult]:
        shard = self._shard(request.session_id)
        spec = shard.spec(request.session_id)
        queries = tensor.decode(request.queries, "queries", dtypes=F32, shape=(None, spec.dim))
        return spec, shard.search(request.session_id, queries, request.top_k)

    @grpc_errors
    def Search(self, request, context):  # noqa: N802
        spec, result = self._search(request)
        for row in range(len(result.ids)):
            if not context.is_active():
                return
            msg = pb.SearchResponse()
            wire.fill_row(msg, spec, result, row)
            yield msg

    @grpc_errors
    def Retrieve(self, request, context):  # noqa: N802
        spec, result = self._search(request)
        q, k = result.ids.shape
        size = q * (k * (spec.record_bytes + 32) + 64)  # an upper bound of the encoded reply
        if size > self.max_message_bytes:
            raise ResourceExhausted(
                f"reply of ~{size} bytes exceeds the {self.max_message_bytes}-byte limit; use Search"
            )
        reply = pb.RetrieveResponse()
        for row in range(q):
            wire.fill_row(reply.rows.add(), spec, result, row)
        return reply

    @grpc_errors
    def Fetch(self, request, context):  # noqa: N802
        shard = self._shard(request.session_id)
        spec = shard.spec(request.session_id)
        ids = np.asarray(request.ids, np.int64)
        records, lengths = shard.fetch(request.session_id, ids)
        kv = tensor.encode_bytes(records.tobytes(), wire.kv_dtype_code(spec), (len(ids), *spec.wire_kv[1]))
        return pb.FetchResponse(lengths=lengths.tolist(), kv=kv)

    @grpc_errors
    def Pin(self, request, context):  # noqa: N802
        self._start_write(context)
        self._shard(request.session_id).pin(request.session_id, np.asarray(request.ids, np.int64))
        return pb.PinResponse()

    @grpc_errors
    def Unpin(self, request, context):  # noqa: N802
        self._start_write(context)
        self._shard(request.session_id).unpin(request.session_id, np.asarray(request.ids, np.int64))
        return pb.PinResponse()

    @grpc_errors
    def Evict(self, request, context):  # noqa: N802
        self._start_write(context)
        if request.n_free < 0:
            raise InvalidArgument("n_free", "must be >= 0")
        n_free = request.n_free or None
        id_range = None
        if request.to_chunk_id > request.from_chunk_id:
            if request.n_free:
                raise InvalidArgument("n_free", "must be 0 when evicting a range of chunk ids")
            if request.from_chunk_id < 0:
                raise InvalidArgument("from_chunk_id", "must be >= 0")
            id_range = (request.from_chunk_id, request.to_chunk_id)
        evicted = self._shard(request.session_id).evict(request.session_id, n_free, id_range)
        return pb.EvictResponse(evicted_ids=evicted.tolist())

    @grpc_errors
    def GetSession(self, request, context):  # noqa: N802
        info = self._shard(request.session_id).info(request.session_id)
        return pb.SessionInfo(
            session_id=info.session_id,
            spec=wire.spec_to_proto(info.spec),
            num_chunks=info.num_chunks,
            shard=info.shard,
            stats=info.stats,
        )

    @grpc_errors
    def DeleteSession(self, request, context):  # noqa: N802
        self._start_write(context)
        self._shard(request.session_id).delete_session(request.session_id)
        self.on_delete()  # deleting a lost session may clear the integrity alarm
        return pb.DeleteSessionResponse()

    @grpc_errors
    def ExportSession(self, request, context):  # noqa: N802
        spec, state = self._shard(request.session_id).export_session(request.session_id)
        yield from wire.state_to_parts(request.session_id, spec, state)

    @grpc_errors
    def ImportSession(self, request_iterator, context):  # noqa: N802
        self._start_write(context)
        session_id, spec, state = wire.parts_to_state(request_iterator)
        shard = self._shard(session_id)
        n = shard.import_session(session_id, spec, state)
        return pb.ImportSessionResponse(num_chunks=n, shard=shard.name)


class RetMemServer(ServiceProcess):
    """A process's ret-mem: its shards behind one listener. Listens at once (NOT_SERVING), recovers every
    shard, then serves; `begin_stop` also refuses new calls (UNAVAILABLE), `finish_stop` snapshots and
    closes the logs once the listener is closed."""

    def __init__(self, config: RetMemConfig) -> None:
        super().__init__(drain_s=config.drain_s)
        self.config = config
        faiss.omp_set_num_threads(config.faiss_threads)
        self.shards = {
            name: Shard(name, config.data_dir, fsync=config.fsync, checkpoint_bytes=config.checkpoint_bytes)
            for name in config.shards
        }
        self.placement = Placement(config.shards, config.all_shards)
        self.servicer = RetMemServicer(self.shards, self.placement, config.max_message_bytes)
        self.servicer.on_delete = self._report_integrity
        self.recovery: dict[str, RecoveryReport] = {}
        self.recovered = threading.Event()
        metrics.observe_memory(self.servicer)

    def _service(self) -> Service:
        return Service(SERVICE_NAME, pb_grpc.add_RetMemServicer_to_server, self.servicer)

    def start(self, recover_in_background: bool = False) -> int:
        """Listen (NOT_SERVING), recover every shard, then SERVING. Returns the bound port."""
        options = ServerOptions(
            max_message_bytes=self.config.max_message_bytes,
            max_workers=self.config.max_workers,
            internal_token=self.config.internal_token,
            tls=self.config.tls,
            internal=True,
        )
        port = self.listen(options)
        if recover_in_background:
            threading.Thread(target=self._recover, name="recovery", daemon=True).start()
        else:
            self._recover()
        return port

    def _recover(self) -> None:
        for name, shard in self.shards.items():
            self.recovery[name] = report = shard.open()
            log.info("shard %s recovered: %s", name, report)
        self._report_integrity()
        self.set_serving(True)
        self.recovered.set()

    def lost_sessions(self) -> dict[str, str]:
        """Sessions no shard could recover (id -> reason), over every shard of this process."""
        return {sid: why for shard in self.shards.values() for sid, why in shard.lost_sessions().items()}

    def _report_integrity(self) -> None:
        ok = not self.lost_sessions()
        self.health.set(INTEGRITY_NAME, SERVING if ok else NOT_SERVING)

    def begin_stop(self) -> None:
        """Phase 1: health NOT_SERVING and new calls UNAVAILABLE; in-flight calls go on."""
        super().begin_stop()
        self.servicer.accepting.clear()

    def finish_stop(self, grace_s: float | None = None) -> None:
        """Phase 2: close the listener, wait up to `grace_s` for in-flight calls, snapshot, close logs."""
        super().finish_stop(grace_s)
        metrics.unobserve_memory(self.servicer)
        for shard in self.shards.values():
            if self.config.checkpoint_on_stop and shard.healthy:
                shard.checkpoint()
            shard.close()
