"""The Gateway gRPC service: the public API over decoder replicas and ret-mem shards.

Handlers validate input completely before any state changes, then call the session's decoder replica
(sticky, by consistent hashing of the session id) and, for session lifecycle, its ret-mem shard.
Tenant and deadline come from the interceptors (`interceptors.current()`); every downstream call gets
a timeout derived from what remains of the caller's deadline.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import secrets
import threading
from collections.abc import Iterator

import grpc

from memlong.api.decoder.v1 import decoder_pb2 as dpb
from memlong.api.decoder.v1 import decoder_pb2_grpc as dpb_grpc
from memlong.api.gateway.v1 import gateway_pb2 as pb
from memlong.api.gateway.v1 import gateway_pb2_grpc as pb_grpc
from memlong.config import RETRIEVAL_SOURCES, retrieval_source
from memlong.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    TooLarge,
    Unavailable,
    shown,
)
from memlong.rpc.channel import ChannelOptions, Deadline, get_channel, reconnecting
from memlong.rpc.status import raise_for_rpc_error
from memlong.services.common.server import ServerOptions, Service, ServiceProcess, closed_on_termination
from memlong.services.retmem.client import RetMemClient
from memlong.services.retmem.routing import Ring
from memlong.services.retmem.store import SessionSpec

from .config import GatewayConfig
from .interceptors import GatewayInterceptor, current
from .sessions import SessionRecord, SessionTable

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Gateway"].full_name
DECODER_SERVICE = dpb.DESCRIPTOR.services_by_name["Decoder"].full_name
SCRATCH_PREFIX = "scratch-"  # decoder session ids of reads without a session (never ret-mem sessions)


class GatewayServicer(pb_grpc.GatewayServicer):
    def __init__(self, config: GatewayConfig, table: SessionTable, retmem: RetMemClient) -> None:
        self.config = config
        self.table = table
        self.retmem = retmem
        self.decoder_ring = Ring(list(config.decoders))
        self.options = ChannelOptions(
            max_message_bytes=config.max_message_bytes,
            idempotent_methods=((DECODER_SERVICE, "Describe"),),
            internal_token=config.internal_token,
            tls=config.internal_tls,
            internal=True,
        )
        self._specs: dict[tuple[str, str], SessionSpec] = {}  # (decoder, retrieval) -> spec
        self._spec_lock = threading.Lock()

    # -- plumbing -----------------------------------------------------------------------------------

    def _decoder(self, name: str) -> dpb_grpc.DecoderStub:
        return dpb_grpc.DecoderStub(get_channel(self.config.decoders[name], self.options))

    @staticmethod
    def _timeout(deadline: Deadline) -> float:
        return deadline.downstream().timeout()

    def _spec(self, decoder: str, retrieval: str, deadline: Deadline) -> SessionSpec:
        """The ret-mem spec for sessions served by `decoder` that retrieve by `retrieval` ("" for the
        decoder's default); asked once per replica and source."""
        with self._spec_lock:
            spec = self._specs.get((decoder, retrieval))
        if spec is None:
            try:
                d = self._decoder(decoder).Describe(
                    dpb.DescribeRequest(retrieval=retrieval), timeout=self._timeout(deadline)
                )
            except grpc.RpcError as err:
                raise_for_rpc_error(err)
            spec = SessionSpec(
                dim=d.dim,
                kv_shape=tuple(d.kv_shape),
                kv_dtype=d.kv_dtype,
                kv_codec=d.kv_codec or "none",
                memory_size=d.memory_chunks,
                layout=d.layout,
            )
            with self._spec_lock:
                self._specs[(decoder, retrieval)] = spec
        return spec

    def _session_msg(self, rec: SessionRecord, deadline: Deadline) -> pb.Session:
        info = self.retmem.info(rec.session_id, deadline.downstream())
        return pb.Session(
            session_id=rec.session_id,
            name=rec.name,
            text_bytes=rec.text_bytes,
            tokens=rec.tokens,
            chunks=info.num_chunks,
            created_at=rec.created_at,
            decoder=rec.decoder,
            shard=info.shard,
            retrieval=rec.retrieval or retrieval_source(info.spec.layout),  # "": a table from before
        )

    def _check_text(self, data: bytes, field: str) -> None:
        if not data:
            raise InvalidArgument(field, "must not be empty")
        if len(data) > self.config.max_request_text_bytes:
            raise TooLarge(f"{field}: {len(data)} bytes > limit {self.config.max_request_text_bytes}")
        # UTF-8 is checked by the decoder, which decodes the text anyway (INVALID_ARGUMENT naming it).

    # -- sessions -----------------------------------------------------------------------------------

    def CreateSession(self, request, context):  # noqa: N802
        call = current()
        if request.retrieval not in ("", *RETRIEVAL_SOURCES):
            raise InvalidArgument(
                "retrieval", f"must be one of {RETRIEVAL_SOURCES} (or empty), got {shown(request.retrieval)}"
            )
        with self.table.admitted(call.tenant, self.config.max_inflight):
            rec = self.table.new_record(call.tenant, request.name, self.decoder_ring.owner)
            spec = self._spec(rec.decoder, request.retrieval, call.deadline)
            rec = dataclasses.replace(rec, retrieval=retrieval_source(spec.layout))  # "" resolved
            self.retmem.create_session(rec.session_id, spec, call.deadline.downstream())
            self.table.add(rec)
            return self._session_msg(rec, call.deadline)

    def GetSession(self, request, context):  # noqa: N802
        call = current()
        rec = self.table.get(call.tenant, request.session_id)
        return self._session_msg(rec, call.deadline)

    def ListSessions(self, request, context):  # noqa: N802
        call = current()
        out = pb.ListSessionsResponse()
        for rec in self.table.list(call.tenant):
            out.sessions.append(
                pb.Session(
                    session_id=rec.session_id,
                    name=rec.name,
                    text_bytes=rec.text_bytes,
                    tokens=rec.tokens,
                    chunks=-1,  # not asked of ret-mem here: GetSession reports it
                    created_at=rec.created_at,
                    decoder=rec.decoder,
                    shard=self.retmem.ring.owner(rec.session_id),
                    retrieval=rec.retrieval,
                )
            )
        return out

    def DeleteSession(self, request, context):  # noqa: N802
        call = current()
        rec = self.table.get(call.tenant, request.session_id)
        try:
            self.retmem.delete_session(rec.session_id, call.deadline.downstream())
        except NotFound:
            pass  # memory already gone (an earlier delete that failed half-way)
        self.table.remove(call.tenant, rec.session_id)
        return pb.DeleteSessionResponse()

    # -- append -------------------------------------------------------------------------------------

    def _new_text(
        self, first: pb.AppendRequest, requests: Iterator[pb.AppendRequest], committed: int, quota: int
    ) -> Iterator[bytes]:
        """The stream's bytes after the `committed` offset, piece by piece as the client sends them,
        checked on the way: contiguous offsets, at most max_append_bytes in the stream, at most `quota`
        new bytes. Nothing is gathered, so the gateway holds a piece at a time and a slow decoder slows
        the client (flow control). UTF-8 is checked once, by the decoder, which decodes the text anyway."""
        end, total, new = first.offset, 0, 0
        for i, msg in enumerate(itertools.chain([first], requests)):
            if i and msg.session_id and msg.session_id != first.session_id:
                raise InvalidArgument(f"messages[{i}].session_id", "differs from the first message")
            if i and msg.offset != end:
                raise InvalidArgument(f"messages[{i}].offset", f"expected {end} (pieces must be contiguous)")
            total += len(msg.text)
            if total > self.config.max_append_bytes:
                raise TooLarge(f"text: Append stream over {self.config.max_append_bytes} bytes")
            piece = msg.text[max(committed - end, 0) :]  # bytes already committed are skipped
            end += len(msg.text)
            if not piece:
                continue
            if new == 0 and 0x80 <= piece[0] < 0xC0:
                raise InvalidArgument("offset", "the committed offset falls inside a UTF-8 character")
            new += len(piece)
            if new > quota:
                raise ResourceExhausted(
                    f"tenant quota: at most {self.table.quotas.max_tenant_text_bytes} bytes of text"
                )
            yield piece
        if total == 0:
            raise InvalidArgument("text", "must not be empty")

    def Append(self, request_iterator, context):  # noqa: N802
        # Closed when the call ends: a cancelled append rolls back and frees its slots at once.
        return closed_on_termination(context, self._append(request_iterator, context))

    def _append(self, request_iterator, context):
        call = current()
        with self.table.admitted(call.tenant, self.config.max_inflight):
            first = next(request_iterator, None)
            if first is None:
                raise InvalidArgument("text", "empty Append stream")
            rec = self.table.get(call.tenant, first.session_id)
            if first.offset < 0:
                raise InvalidArgument("offset", "must be >= 0")
            if first.offset > rec.text_bytes:
                raise InvalidArgument(
                    "offset", f"gap: session holds {rec.text_bytes} bytes; resume at that offset"
                )
            quota = self.table.quotas.max_tenant_text_bytes - self.table.tenant_bytes(call.tenant)
            pieces = self._new_text(first, request_iterator, rec.text_bytes, quota)
            head = next(pieces, None)  # validates the stream up to its first new byte
            if head is None:  # everything was committed before: an idempotent resume
                yield pb.AppendProgress(done=True, text_bytes=rec.text_bytes)
                return
            offset = rec.text_bytes
            with self.table.writing(rec.session_id):
                rec = self._roll_back(self.table.get(call.tenant, rec.session_id), call.deadline)
                if rec.text_bytes != offset:
                    raise InvalidArgument(
                        "offset", f"session moved to {rec.text_bytes} bytes meanwhile; resume there"
                    )
                yield from self._ingest(rec, itertools.chain([head], pieces), call.deadline, context)

    def _roll_back(self, rec: SessionRecord, deadline: Deadline) -> SessionRecord:
        """Remove the chunks of a failed append (ids dirty_from..next_chunk_id) from ret-mem, so that the
        text a client sends again is stored once. The caller holds the session's write lock."""
        if rec.dirty_from is None:
            return rec
        gone = self.retmem.evict(
            rec.session_id, id_range=(rec.dirty_from, rec.next_chunk_id), deadline=deadline.downstream()
        )
        log.info("session %s: rolled back %d chunks of a failed append", rec.session_id, len(gone))
        return self.table.update(rec.session_id, dirty_from=None)

    def _reader_record(self, tenant: str, session_id: str) -> SessionRecord | None:
        """The session a Score or Generate reads, or None for a call without one (the text alone)."""
        return self.table.get(tenant, session_id) if session_id else None

    def _read_target(
        self, rec: SessionRecord | None, deadline: Deadline, mode: int
    ) -> tuple[str, dpb.SessionRef, int]:
        """(decoder, session ref, memory mode) of a read. Without a session: a fresh scratch id that no
        memory or window belongs to, memory OFF (REQUIRED is refused: there is none to require), and a
        decoder by hashing that id, so such calls spread over the replicas."""
        if rec is None:
            if mode == dpb.MEMORY_MODE_REQUIRED:
                raise InvalidArgument("memory_mode", "a call without a session has no memory to require")
            scratch = SCRATCH_PREFIX + secrets.token_hex(12)
            return self.decoder_ring.owner(scratch), dpb.SessionRef(session_id=scratch), dpb.MEMORY_MODE_OFF
        rec, mode = self._readable(rec, deadline, mode)
        return rec.decoder, dpb.SessionRef(session_id=rec.session_id, next_chunk_id=rec.next_chunk_id), mode

    def _readable(self, rec: SessionRecord, deadline: Deadline, mode: int) -> tuple[SessionRecord, int]:
        """(record, memory mode) for a read, after rolling back a failed append unless one is running now.

        If the roll-back cannot run (ret-mem unreachable), a read that may go without memory does so:
        it must not read the failed append's chunks should ret-mem come back meanwhile."""
        if rec.dirty_from is None or self.table.is_writing(rec.session_id):
            return rec, mode
        try:
            with self.table.writing(rec.session_id):
                return self._roll_back(self.table.get(rec.tenant, rec.session_id), deadline), mode
        except FailedPrecondition:  # an append started meanwhile: it rolls back first
            return self.table.get(rec.tenant, rec.session_id), mode
        except Unavailable:
            if mode in (dpb.MEMORY_MODE_IF_AVAILABLE, dpb.MEMORY_MODE_OFF):
                return rec, dpb.MEMORY_MODE_OFF
            raise

    def _ingest(
        self, rec: SessionRecord, new: Iterator[bytes], deadline: Deadline, context: grpc.ServicerContext
    ) -> Iterator[pb.AppendProgress]:
        """Stream the new text to the session's decoder as it arrives; commit when the decoder is done.

        A piece that fails its checks (in `new`, pulled by gRPC's sending thread) cancels the decoder
        call, and that error is what the client gets. Whatever stops the call, nothing is committed and
        the chunks it stored are rolled back."""
        chunk = self._spec(rec.decoder, "", deadline).chunk_tokens  # the same for every source
        first_id = rec.next_chunk_id
        received, failed = 0, []
        stream, started = None, threading.Event()

        def pieces() -> Iterator[dpb.IngestRequest]:
            nonlocal received
            ref = dpb.SessionRef(session_id=rec.session_id, next_chunk_id=first_id)
            try:
                for i, piece in enumerate(new):
                    received += len(piece)
                    yield dpb.IngestRequest(session=ref if i == 0 else None, text=piece)
            except Exception as exc:  # noqa: BLE001 - handed to the serving thread, which raises it
                failed.append(exc)
                started.wait()  # gRPC may pull pieces before Ingest() has returned the call
                stream.cancel()

        # Every token covers >= 1 byte, so no call can use more chunk ids than the stream has bytes /
        # chunk. The range is reserved and marked dirty on disk before any chunk is stored: if this
        # call fails, or the gateway dies during it, the chunks it stored are rolled back before the
        # session is used again.
        id_bound = first_id + self.config.max_append_bytes // chunk + 2
        rec = self.table.update(rec.session_id, next_chunk_id=id_bound, dirty_from=first_id)
        done = False
        try:
            stream = self._decoder(rec.decoder).Ingest(pieces(), timeout=self._timeout(deadline))
            started.set()
            _cancel_with(context, stream)
            for p in stream:
                if p.done:
                    done = True
                    rec = self.table.update(
                        rec.session_id,
                        text_bytes=rec.text_bytes + received,
                        tokens=rec.tokens + p.tokens_done,
                        next_chunk_id=p.next_chunk_id,
                        dirty_from=None,
                    )
                yield pb.AppendProgress(
                    bytes_done=p.bytes_done,
                    bytes_total=received,
                    tokens_done=p.tokens_done,
                    done=p.done,
                    text_bytes=rec.text_bytes,
                )
        except grpc.RpcError as err:
            if failed:
                raise failed[0] from None
            raise_for_rpc_error(err)
        finally:
            if not done:
                try:
                    self._roll_back(rec, deadline)
                except Exception:  # ret-mem unreachable too: the range stays dirty, rolled back on next use
                    log.warning(
                        "session %s: roll-back of a failed append deferred", rec.session_id, exc_info=True
                    )

    # -- reading ------------------------------------------------------------------------------------

    def Score(self, request, context):  # noqa: N802
        call = current()
        with self.table.admitted(call.tenant, self.config.max_inflight):
            rec = self._reader_record(call.tenant, request.session_id)
            self._check_text(request.text, "text")
            decoder, ref, mode = self._read_target(rec, call.deadline, request.memory_mode)
            req = dpb.ScoreRequest(
                session=ref, text=request.text, memory_mode=mode, return_logprobs=request.return_logprobs
            )

            def score() -> dpb.ScoreResponse:
                future = self._decoder(decoder).Score.future(req, timeout=self._timeout(call.deadline))
                _cancel_with(context, future)
                return future.result()

            try:
                r = reconnecting(self.config.decoders[decoder], score)
            except grpc.RpcError as err:
                raise_for_rpc_error(err)
            except grpc.FutureCancelledError:  # the caller went away: nobody reads this answer
                context.abort(grpc.StatusCode.CANCELLED, "call cancelled")
            return pb.ScoreResponse(
                token_ids=r.token_ids,
                logprobs=r.logprobs,
                scored_tokens=r.scored_tokens,
                perplexity=r.perplexity,
                memory=r.memory,
            )

    def Generate(self, request, context):  # noqa: N802
        return closed_on_termination(context, self._generate(request, context))

    def _generate(self, request, context):
        call = current()
        with self.table.admitted(call.tenant, self.config.max_inflight):
            rec = self._reader_record(call.tenant, request.session_id)
            self._check_text(request.prompt, "prompt")
            decoder, ref, mode = self._read_target(rec, call.deadline, request.memory_mode)
            req = dpb.GenerateRequest(
                session=ref, prompt=request.prompt, sampling=request.sampling, memory_mode=mode
            )

            def start() -> tuple[Iterator, list]:
                """The stream and its first token ([] if none): a decoder that cannot be reached fails
                before any token, so the call can be made again on a fresh channel."""
                stream = self._decoder(decoder).Generate(req, timeout=self._timeout(call.deadline))
                _cancel_with(context, stream)
                return stream, list(itertools.islice(stream, 1))

            try:
                stream, first = reconnecting(self.config.decoders[decoder], start)
                for t in itertools.chain(first, stream):
                    yield pb.GenerateResponse(token=t)
            except grpc.RpcError as err:
                raise_for_rpc_error(err)


def _cancel_with(context: grpc.ServicerContext, downstream: grpc.Future) -> None:
    """Cancel `downstream` when the caller's call ends (cancelled, disconnected or out of time), so the
    decoder stops and its slot frees at once. Nothing else would: the call object stays referenced."""
    if not context.add_callback(downstream.cancel):  # already over
        downstream.cancel()


class GatewayServer(ServiceProcess):
    """A gateway process: session table, interceptors, gRPC server, health."""

    def __init__(self, config: GatewayConfig) -> None:
        super().__init__()
        self.config = config
        path = None if config.data_dir is None else config.data_dir / "sessions.json"
        self.table = SessionTable(path, config.quotas)
        self.retmem = RetMemClient(
            config.retmem,
            max_message_bytes=config.max_message_bytes,
            internal_token=config.internal_token,
            tls=config.internal_tls,
        )
        self.servicer = GatewayServicer(config, self.table, self.retmem)

    def _service(self) -> Service:
        return Service(SERVICE_NAME, pb_grpc.add_GatewayServicer_to_server, self.servicer)

    def start(self, extra_interceptors: tuple[grpc.ServerInterceptor, ...] = ()) -> int:
        """Listen and serve. `extra_interceptors` run outermost (e.g. tracing, or recording in tests)."""
        prefix = f"/{SERVICE_NAME}/"
        interceptors = (
            *extra_interceptors,
            GatewayInterceptor(
                prefix, self.config.key_hashes, self.config.default_timeout_s, self.config.max_timeout_s
            ),
        )
        options = ServerOptions(
            max_message_bytes=self.config.max_message_bytes,
            max_workers=self.config.max_inflight + 8,
            interceptors=interceptors,
            tls=self.config.tls,
        )
        return self.serve(options)
