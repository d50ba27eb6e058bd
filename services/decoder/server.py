"""The Decoder gRPC service: decode the request, call the engine, encode the reply.

`DecoderServer.from_components(model, tokenizer, retriever, config)` builds a server around objects the
caller already has (tests pass a tiny random model); `DecoderServer.load(config)` loads the model named
in the config. Health is SERVING once the model is loaded and the server listens.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import grpc

from memlong.api.decoder.v1 import decoder_pb2 as pb
from memlong.api.decoder.v1 import decoder_pb2_grpc as pb_grpc
from memlong.chunkloop import SamplingParams
from memlong.config import RETRIEVAL_SOURCES
from memlong.errors import InvalidArgument, shown
from memlong.ids import check_session_id
from memlong.model import MemLongModel
from memlong.rpc.channel import Deadline
from memlong.rpc.status import grpc_errors
from memlong.services.common.server import ServerOptions, Service, ServiceProcess, closed_on_termination
from memlong.services.retmem.client import RetMemClient

from .config import DecoderConfig
from .engine import MEMORY_IF_AVAILABLE, MEMORY_OFF, MEMORY_REQUIRED, Call, DecoderEngine, MemoryReport
from .port import CallCancelled

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Decoder"].full_name
_MODES = {
    pb.MEMORY_MODE_UNSPECIFIED: MEMORY_REQUIRED,
    pb.MEMORY_MODE_REQUIRED: MEMORY_REQUIRED,
    pb.MEMORY_MODE_IF_AVAILABLE: MEMORY_IF_AVAILABLE,
    pb.MEMORY_MODE_OFF: MEMORY_OFF,
}
_FINISH = {"": pb.FINISH_REASON_UNSPECIFIED, "length": pb.FINISH_REASON_LENGTH, "stop": pb.FINISH_REASON_STOP}


def memory_mode(value: int) -> str:
    if value not in _MODES:
        raise InvalidArgument("memory_mode", f"unknown value {value}")
    return _MODES[value]


def sampling_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """Proto -> core params; zero means the default for max_new_tokens and top_p."""
    if msg.max_new_tokens < 0 or msg.max_new_tokens > 4096:
        raise InvalidArgument("sampling.max_new_tokens", "must be in 0..4096 (0: default 32)")
    if len(msg.stop_strings) > 16 or any(not s or len(s) > 256 for s in msg.stop_strings):
        raise InvalidArgument("sampling.stop_strings", "at most 16 non-empty strings of <= 256 chars")
    try:
        return SamplingParams(
            max_new_tokens=msg.max_new_tokens or 32,
            temperature=msg.temperature,
            top_p=msg.top_p or 1.0,
            top_k=msg.top_k,
            seed=msg.seed if msg.has_seed else None,
            stop_token_ids=tuple(msg.stop_token_ids),
            stop_strings=tuple(msg.stop_strings),
        )
    except InvalidArgument as exc:
        raise InvalidArgument(f"sampling.{exc.field}", str(exc).partition(": ")[2]) from None


def report_to_proto(r: MemoryReport) -> pb.MemoryReport:
    return pb.MemoryReport(
        memory_used=r.memory_used,
        note=r.note,
        retrievals=r.retrievals,
        retrieved_ids=r.retrieved_ids,
        retrieval_wait_s=r.retrieval_wait_s,
        compute_s=r.compute_s,
        retrieval_total_s=r.retrieval_total_s,
        bytes_retrieved=r.bytes_retrieved,
        query=r.query,
        queue_s=r.queue_s,
        retrieval_hidden_s=r.retrieval_hidden_s,
        prefetched_retrievals=r.prefetched_retrievals,
    )


def _session(ref: pb.SessionRef) -> tuple[str, int]:
    check_session_id(ref.session_id, "session.session_id")
    if ref.next_chunk_id < 0:
        raise InvalidArgument("session.next_chunk_id", "must be >= 0")
    return ref.session_id, ref.next_chunk_id


def _abort_stopped(context: grpc.ServicerContext, exc: CallCancelled) -> None:
    """A stopped call: DEADLINE_EXCEEDED when it ran out of time (its caller still waits), else CANCELLED."""
    code = grpc.StatusCode.DEADLINE_EXCEEDED if context.is_active() else grpc.StatusCode.CANCELLED
    context.abort(code, str(exc))


class DecoderServicer(pb_grpc.DecoderServicer):
    def __init__(self, engine: DecoderEngine, config: DecoderConfig) -> None:
        self.engine = engine
        self.config = config

    def _call(self, context: grpc.ServicerContext) -> Call:
        return Call(Deadline.from_context(context, self.config.default_timeout_s), context.is_active)

    @grpc_errors
    def Describe(self, request, context):  # noqa: N802
        retrieval = request.retrieval or self.engine.cfg.retrieval
        if retrieval not in RETRIEVAL_SOURCES:
            raise InvalidArgument("retrieval", f"must be one of {RETRIEVAL_SOURCES}, got {shown(retrieval)}")
        spec = self.engine.session_spec(retrieval)
        return pb.DescribeResponse(
            model=self.engine.source,
            memlong_config_json=json.dumps(self.engine.cfg.__dict__),
            dim=spec.dim,
            kv_shape=spec.kv_shape,
            kv_dtype=spec.kv_dtype,
            memory_chunks=spec.memory_size,
            vocab_size=self.engine.vocab_size(),
            layout=spec.layout,
            retrieval=retrieval,
            kv_codec="" if spec.kv_codec == "none" else spec.kv_codec,
        )

    @grpc_errors
    def Ingest(self, request_iterator, context):  # noqa: N802
        first = next(request_iterator, None)
        if first is None or not first.HasField("session"):
            raise InvalidArgument("session", "the first message must name the session")
        session_id, next_id = _session(first.session)

        def pieces() -> Iterator[bytes]:
            yield first.text
            for msg in request_iterator:
                yield msg.text

        try:
            progress = self.engine.ingest(session_id, next_id, pieces(), self._call(context))
            for p in closed_on_termination(context, progress):
                yield pb.IngestProgress(
                    bytes_done=p.bytes_done,
                    tokens_done=p.tokens_done,
                    next_chunk_id=p.next_chunk_id,
                    done=p.done,
                    chunks_stored=p.chunks_stored,
                    compute_s=p.compute_s,
                )
        except CallCancelled as exc:
            _abort_stopped(context, exc)

    @grpc_errors
    def Score(self, request, context):  # noqa: N802
        session_id, next_id = _session(request.session)
        try:
            r = self.engine.score(
                session_id,
                next_id,
                request.text,
                self._call(context),
                mode=memory_mode(request.memory_mode),
                commit=request.commit,
            )
        except CallCancelled as exc:
            _abort_stopped(context, exc)
        reply = pb.ScoreResponse(
            scored_tokens=r.scored_tokens,
            perplexity=r.perplexity,
            memory=report_to_proto(r.memory),
            next_chunk_id=r.next_chunk_id,
        )
        if request.return_logprobs:
            reply.token_ids.extend(r.token_ids)
            reply.logprobs.extend(r.logprobs)
        return reply

    @grpc_errors
    def Generate(self, request, context):  # noqa: N802
        session_id, next_id = _session(request.session)
        params = sampling_from_proto(request.sampling)
        stream = self.engine.generate(  # closed when the call ends: its admission slot frees at once
            session_id,
            next_id,
            request.prompt,
            params,
            self._call(context),
            mode=memory_mode(request.memory_mode),
            ignore_eos=request.sampling.ignore_eos,
        )
        try:
            for t in closed_on_termination(context, stream):
                msg = pb.GenerateResponse(
                    token_id=t.token_id, text=t.text, finish_reason=_FINISH[t.finish_reason]
                )
                if t.memory is not None:
                    msg.memory.CopyFrom(report_to_proto(t.memory))
                    msg.prompt_tokens = t.prompt_tokens
                yield msg
        except CallCancelled as exc:
            _abort_stopped(context, exc)


class DecoderServer(ServiceProcess):
    """A decoder process: engine, gRPC server, health."""

    def __init__(self, engine: DecoderEngine, config: DecoderConfig) -> None:
        super().__init__()
        self.engine = engine
        self.config = config
        self.servicer = DecoderServicer(engine, config)

    @classmethod
    def from_components(
        cls, model: MemLongModel, tokenizer, retriever, config: DecoderConfig, source: str = ""
    ) -> DecoderServer:
        client = RetMemClient(
            config.retmem,
            timeout_s=config.retmem_timeout_s,
            max_message_bytes=config.max_message_bytes,
            internal_token=config.internal_token,
            tls=config.tls,
            shared_memory=None if config.retmem_shared_memory else False,  # None: on unless the env says off
        )
        engine = DecoderEngine(
            model,
            tokenizer,
            retriever,
            client,
            max_inflight=config.max_inflight,
            prefetch=config.prefetch,
            write_behind=config.write_behind_chunks,
            max_call_text_bytes=config.max_call_text_bytes,
            progress_tokens=config.ingest_progress_tokens,
            source=source,
            window_cache_sessions=config.window_cache_sessions,
        )
        return cls(engine, config)

    @classmethod
    def load(cls, config: DecoderConfig) -> DecoderServer:
        """Load the model named in the config (the packaged SmolLM2 by default) and the retriever."""
        import torch

        from memlong.loading import load_model

        if config.threads:
            torch.set_num_threads(config.threads)
        loaded = load_model(config.memlong, config.model, config.adapter)
        source = loaded.source if config.adapter is None else f"{loaded.source} + adapter {config.adapter}"
        return cls.from_components(loaded.model, loaded.tokenizer, loaded.retriever, config, source)

    def _service(self) -> Service:
        return Service(SERVICE_NAME, pb_grpc.add_DecoderServicer_to_server, self.servicer)

    def start(self, interceptors: tuple[grpc.ServerInterceptor, ...] = ()) -> int:
        """Listen and serve; `interceptors` wrap every call (e.g. tracing, or recording in tests)."""
        options = ServerOptions(
            max_message_bytes=self.config.max_message_bytes,
            max_workers=self.config.max_workers,
            interceptors=tuple(interceptors),
            internal_token=self.config.internal_token,
            tls=self.config.tls,
            internal=True,
        )
        return self.serve(options)

    def finish_stop(self, grace_s: float | None = None) -> None:
        super().finish_stop(grace_s)
        self.engine.close()
