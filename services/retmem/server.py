"""The RetMem gRPC service: decode the request, call the owning shard, encode the reply.

`RetMemServer` hosts one or more shards in one process: it starts listening at once (health
NOT_SERVING), recovers every shard, then flips health to SERVING. `stop` flips health first, then
refuses new calls (UNAVAILABLE) while in-flight ones finish, then closes the logs.

The K/V of Append, Retrieve and Search never pass through protobuf objects: Append's request is read
with `rawwire.parse_append` (each record stays a view of the received bytes and is written to the data
files from there), and retrieval replies are written by `rawwire` straight from the records read (one
join into the reply bytes). A same-host caller names shared-memory regions instead (`shm`): records go
from its region to the data files, and from the data files into its region.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

from memlong.api.retmem.v1 import retmem_pb2 as pb
from memlong.api.retmem.v1 import retmem_pb2_grpc as pb_grpc
from memlong.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable, check_port
from memlong.gpu_index import GpuIndexes
from memlong.memory import set_faiss_threads
from memlong.rpc import metrics
from memlong.rpc.status import grpc_errors
from memlong.rpc.tls import TlsConfig
from memlong.services.common import tensor
from memlong.services.common.server import DEFAULT_MAX_MESSAGE_BYTES, ServerOptions, Service, ServiceProcess

from . import rawwire, shm, wire
from .routing import Placement
from .shard import RecoveryReport, Shard, StoredResult
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
    # FAISS OpenMP threads of every thread that searches (memory.set_faiss_threads; OpenMP keeps the
    # count per thread, so setting it once in the thread that builds the server left gRPC's workers at
    # all cores). One: a per-chunk search is one query row, calls run in parallel on gRPC threads, and
    # idle OpenMP workers spinning on 2 cores made a 2000-chunk search 20x slower.
    faiss_threads: int = 1
    # GPU number on which every shard keeps its sessions' search indexes (exact flat indexes, the same
    # results); None: in RAM. Set without a GPU or without faiss's GPU build: a clear error at startup.
    faiss_gpu: int | None = None
    # Same-host transport: open clients' shared-memory segments in this directory (see shm.py);
    # None: shm.default_dir() (/dev/shm). shared_memory=False answers Attach with FAILED_PRECONDITION,
    # so every client keeps K/V in the messages.
    shared_memory: bool = True
    shm_dir: Path | None = None

    def __post_init__(self) -> None:
        if not self.shards or len(set(self.shards)) != len(self.shards):
            raise InvalidArgument("shards", f"need distinct shard names, got {self.shards}")
        if self.fsync not in ("per-append", "grouped"):
            raise InvalidArgument("fsync", f"must be per-append or grouped, got {self.fsync!r}")
        check_port(self.port)


class RetMemServicer(pb_grpc.RetMemServicer):
    """Thin: wire -> shard -> wire. Validation of bytes happens in memlong.services.common.tensor."""

    def __init__(
        self,
        shards: Mapping[str, Shard],
        placement: Placement,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        segments: shm.SegmentTable | None = None,
    ) -> None:
        self.shards = shards
        self.placement = placement
        self.max_message_bytes = max_message_bytes
        self.segments = segments or shm.SegmentTable(None)  # default: no shared memory
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
        """request: a rawwire.RawAppend (the registered deserializer) or an AppendRequest."""
        self._start_write(context)
        shard = self._shard(request.session_id)
        spec = shard.spec(request.session_id)
        chunks = request.chunks if isinstance(request, rawwire.RawAppend) else _as_raw(request.chunks)
        if not chunks:
            raise InvalidArgument("chunks", "at least one chunk is required")
        kv_dtype, rb = (wire.kv_dtype_code(spec),), spec.record_bytes
        n = len(chunks)
        embeddings = np.empty((n, spec.dim), np.float32)  # (n, dim)
        rows: list[np.ndarray] = []
        crcs = np.empty(n, np.uint32)
        shared = 0
        for i, c in enumerate(chunks):
            m = c.meta
            embeddings[i] = tensor.decode(
                m.embedding, f"chunks[{i}].embedding", dtypes=F32, shape=(spec.dim,)
            )
            field_ = f"chunks[{i}].kv"
            if m.HasField("kv_region"):
                if len(c.data):
                    raise InvalidArgument(f"{field_}.data", "must be empty when kv_region is set")
                row = self.segments.view(m.kv_region, rb, f"chunks[{i}].kv_region")
                shared += rb
            else:
                row = np.frombuffer(c.data, np.uint8)
            tensor.check_header(m.kv, field_, len(row), dtypes=kv_dtype, shape=spec.wire_kv[1])
            rows.append(row)
            crcs[i] = m.kv.checksum  # checked where each record's CRC-32 is computed anyway (the shard)
        ids = np.fromiter((c.meta.seq for c in chunks), np.int64, n)
        lengths = np.fromiter((c.meta.length for c in chunks), np.int32, n)
        appended = shard.append(request.session_id, ids, embeddings, rows, lengths, crcs)
        _count("Append", "received", shm_bytes=shared, total=n * rb)
        return pb.AppendResponse(appended=appended)

    def _search(self, request) -> tuple[SessionSpec, StoredResult, pb.SharedRegion | None]:
        shard = self._shard(request.session_id)
        spec = shard.spec(request.session_id)
        queries = tensor.decode(request.queries, "queries", dtypes=F32, shape=(None, spec.dim))
        if not request.HasField("reply_region"):
            return spec, shard.search(request.session_id, queries, request.top_k), None
        # Same host: the records go from the data files straight into the caller's region, each
        # checked against its CRC-32 as it is read (records_checked), as an in-process read is.
        region = request.reply_region
        q, k = len(queries), max(int(request.top_k), 0)
        into = self.segments.view(region, q * k * spec.record_bytes, "reply_region")
        into = into.reshape(q, k, spec.record_bytes)
        return spec, shard.search(request.session_id, queries, request.top_k, into=into), region

    def _rows(
        self, spec: SessionSpec, result: StoredResult, region: pb.SharedRegion | None, piece: int = 0
    ) -> Iterator[bytes]:
        """The reply's rows as SearchResponse bytes: K/V in the message (rawwire, no protobuf copy),
        in pieces of at most `piece` records when it is > 0 (first_slot set), or only their place and
        stored CRC-32s when they went to a shared region."""
        q, k = result.ids.shape
        rb, code = spec.record_bytes, wire.kv_dtype_code(spec)
        for row in range(q):
            head = pb.SearchResponse(
                row=row,
                ids=result.ids[row].tolist(),
                scores=result.scores[row].tolist(),
                lengths=result.lengths[row].tolist(),
            )
            head.kv.dtype = code
            head.kv.shape[:] = (k, *spec.wire_kv[1])
            records = result.records[row]  # (k, record_bytes)
            if region is not None:
                crcs = result.crcs[row] if result.crcs is not None else [tensor.checksum(r) for r in records]
                head.kv_region.segment = region.segment
                head.kv_region.offset = region.offset + row * k * rb
                head.kv_region.length = k * rb
                head.record_crcs[:] = [int(c) for c in crcs]
                head.records_checked = result.crcs is not None  # K/V files: checked as they were read
                yield head.SerializeToString()
                continue
            step = piece if 0 < piece < k else max(k, 1)
            for lo in range(0, max(k, 1), step):
                n = min(step, k - lo)
                data = memoryview(np.ascontiguousarray(records[lo : lo + n])).cast("B")
                if piece:
                    head.first_slot = lo
                    head.kv.shape[0] = n
                head.kv.checksum = (
                    tensor.concat_checksum(result.crcs[row, lo : lo + n], rb)
                    if result.crcs is not None
                    else tensor.checksum(data)
                )
                yield rawwire.search_response(head, data)

    @grpc_errors
    def search_bytes(self, request, context) -> Iterator[bytes]:
        """Search, each reply message as its bytes (what `add_servicer` registers)."""
        if request.max_records_per_message < 0:
            raise InvalidArgument("max_records_per_message", "must be >= 0")
        spec, result, region = self._search(request)
        _count(
            "Search", "sent", shm_bytes=result.records.nbytes if region else 0, total=result.records.nbytes
        )
        for row in self._rows(spec, result, region, request.max_records_per_message):
            if not context.is_active():
                return
            yield row

    @grpc_errors
    def retrieve_bytes(self, request, context) -> bytes:
        """Retrieve, the reply as its bytes (what `add_servicer` registers)."""
        spec, result, region = self._search(request)
        q, k = result.ids.shape
        if region is None:
            size = q * (k * (spec.record_bytes + 32) + 64)  # an upper bound of the encoded reply
            if size > self.max_message_bytes:
                raise ResourceExhausted(
                    f"reply of ~{size} bytes exceeds the {self.max_message_bytes}-byte limit; use Search"
                )
        _count(
            "Retrieve", "sent", shm_bytes=result.records.nbytes if region else 0, total=result.records.nbytes
        )
        # RetrieveResponse = its rows, each as field 1: the row bytes are framed, not parsed again.
        return b"".join(
            rawwire.varint(rawwire.RETRIEVE_ROWS << 3 | rawwire.LEN) + rawwire.varint(len(r)) + r
            for r in self._rows(spec, result, region)
        )

    @grpc_errors
    def Attach(self, request, context):  # noqa: N802
        if not 8 <= request.nonce_bytes <= 64:
            raise InvalidArgument("nonce_bytes", "must be in 8..64")
        return pb.AttachResponse(nonce=self.segments.nonce(request.segment, request.nonce_bytes))

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


def _as_raw(chunks) -> list[rawwire.RawChunk]:
    """Chunks of a parsed AppendRequest (a servicer called in process) as RawChunks."""
    out = []
    for c in chunks:
        meta = pb.Chunk()
        meta.CopyFrom(c)
        data = meta.kv.data
        meta.kv.ClearField("data")
        out.append(rawwire.RawChunk(meta, memoryview(data)))
    return out


def _count(method: str, direction: str, shm_bytes: int, total: int) -> None:
    """memlong.retmem.transport.* on the server side: which transport a K/V call used, bytes moved."""
    transport = "shm" if shm_bytes else "grpc"
    labels = {"transport": transport, "rpc.method": method, "side": "server"}
    inst = metrics.instruments()
    inst.transport_calls.add(1, labels)
    inst.transport_bytes.add(total, {**labels, "direction": direction})


def add_servicer(servicer: RetMemServicer, server: grpc.Server) -> None:
    """Register the RetMem service as the generated add_RetMemServicer_to_server does, except that
    Append's request is read by rawwire (the K/V stay in the received bytes) and Retrieve and Search
    answer with ready-made bytes (rawwire replies)."""
    service = pb.DESCRIPTOR.services_by_name["RetMem"]
    raw = {"Retrieve": servicer.retrieve_bytes, "Search": servicer.search_bytes}
    handlers = {}
    for method in service.methods:
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
        parse = rawwire.parse_append if method.name == "Append" else request_cls.FromString
        serialize = None if method.name in raw else response_cls.SerializeToString
        make = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(method.client_streaming, method.server_streaming)]
        behaviour = raw.get(method.name) or getattr(servicer, method.name)
        handlers[method.name] = make(behaviour, request_deserializer=parse, response_serializer=serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


class RetMemServer(ServiceProcess):
    """A process's ret-mem: its shards behind one listener. Listens at once (NOT_SERVING), recovers every
    shard, then serves; `begin_stop` also refuses new calls (UNAVAILABLE), `finish_stop` snapshots and
    closes the logs once the listener is closed."""

    def __init__(self, config: RetMemConfig) -> None:
        super().__init__(drain_s=config.drain_s)
        self.config = config
        set_faiss_threads(config.faiss_threads)  # in every thread that searches, not only this one
        gpu = None
        if config.faiss_gpu is not None:
            # The exactness bound of the index's candidates assumes float32 products: no TF32 in cuBLAS.
            os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")
            gpu = GpuIndexes(config.faiss_gpu)
        self.shards = {
            name: Shard(
                name, config.data_dir, fsync=config.fsync, checkpoint_bytes=config.checkpoint_bytes, gpu=gpu
            )
            for name in config.shards
        }
        self.placement = Placement(config.shards, config.all_shards)
        shm_dir = (config.shm_dir or shm.default_dir()) if config.shared_memory else None
        self.servicer = RetMemServicer(
            self.shards, self.placement, config.max_message_bytes, shm.SegmentTable(shm_dir)
        )
        self.servicer.on_delete = self._report_integrity
        self.recovery: dict[str, RecoveryReport] = {}
        self.recovered = threading.Event()
        metrics.observe_memory(self.servicer)

    def _service(self) -> Service:
        return Service(SERVICE_NAME, add_servicer, self.servicer)

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
        self.servicer.segments.close()
