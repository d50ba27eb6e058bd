"""The decoder's core: one model, admission control, and the chunk loop per call. It serves no gRPC
itself (server.py's servicer decodes requests and encodes replies around it); its memory is ret-mem,
reached over gRPC through a `RetMemClient`, with deadlines derived from each call's own.

Each call builds its own `Reader` (local window) over a `SessionPort` (its view of the ret-mem
session), so calls never share mutable state except the model, which is used under one lock, taken
per block of work: calls interleave fairly instead of queueing behind a long ingest. At most
`max_inflight` calls are admitted; the next one is refused at once (ResourceExhausted), never parked.

Every call that stores text ends with `Reader.flush(keep_window=True)`: everything it read is in ret-mem
(acknowledged text is durable there), and the session's local state (every layer's sinks and window)
stays in this replica's `WindowCache`, keyed by (session, next chunk id). The next call on the session
continues from it, reading as one pass over the whole session would (true sinks, warm window); reads
that do not store (score, generate) continue from a copy. When the state is not here (another replica,
a restart, evicted), the call starts with a cold window and says so in its memory report.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from memlong.chunkloop import Reader, SamplingParams
from memlong.config import retrieval_source
from memlong.errors import (
    FailedPrecondition,
    InvalidArgument,
    MemLongError,
    ResourceExhausted,
    Unavailable,
    shown,
)
from memlong.model import MemLongModel
from memlong.rpc.channel import Deadline
from memlong.services.retmem.client import RetMemClient
from memlong.services.retmem.store import SessionSpec

from .port import CallCancelled, SessionPort

log = logging.getLogger(__name__)

MEMORY_REQUIRED, MEMORY_IF_AVAILABLE, MEMORY_OFF = "required", "if_available", "off"
SCORE_SLICE_CHUNKS = 16  # cancellation is checked at least this often when memory is off


@dataclass(frozen=True)
class Call:
    """What the core knows of the serving call: its deadline and whether anyone still waits."""

    deadline: Deadline
    alive: Callable[[], bool] = lambda: True


@dataclass
class MemoryReport:
    memory_used: bool = False
    note: str = ""
    retrievals: int = 0
    retrieved_ids: list[int] = field(default_factory=list)
    retrieval_wait_s: float = 0.0  # the model waited for retrieval
    retrieval_total_s: float = 0.0  # all retrieval work, waited for or done while the model computed
    retrieval_hidden_s: float = 0.0  # the part of retrieval_total_s the model did not wait for
    prefetched_retrievals: int = 0  # retrievals answered by a search started a chunk ahead
    compute_s: float = 0.0
    bytes_retrieved: int = 0
    query: str = ""
    queue_s: float = 0.0


@dataclass
class IngestProgress:
    bytes_done: int
    tokens_done: int
    next_chunk_id: int
    chunks_stored: int
    compute_s: float
    done: bool = False


@dataclass
class ScoreResult:
    token_ids: list[int]
    logprobs: list[float]
    scored_tokens: int
    perplexity: float
    memory: MemoryReport
    next_chunk_id: int


@dataclass
class GeneratedToken:
    token_id: int
    text: str
    finish_reason: str = ""  # "", "length" or "stop" (last token only)
    memory: MemoryReport | None = None
    prompt_tokens: int = 0  # last token only


def split_at_word(text: str) -> tuple[str, str]:
    """(head, tail): cut before the last whitespace run that follows a non-space, so tokenising head
    and tail apart gives the tokens of the whole (BPE pre-tokenisers attach a space to the next word)."""
    for i in range(len(text) - 1, 0, -1):
        if text[i].isspace() and not text[i - 1].isspace():
            return text[:i], text[i:]
    return "", text


def stream_delta(sent: str, full: str, last: bool) -> tuple[str, str]:
    """(what to send now, all text sent so far) when the decoded output has become `full`.

    A token can end inside a UTF-8 character, which decodes as U+FFFD until the next token completes it:
    trailing U+FFFD are held back (sent as they are only with the last token), so the pieces a client
    concatenates always equal the output. Text the tokenizer rewrote behind what was sent is not resent.
    """
    ready = full if last else full.rstrip("\ufffd")
    if not ready.startswith(sent):
        return "", sent
    return ready[len(sent) :], ready


class WindowCache:
    """The local state of recently read sessions, least recently used first out. Thread-safe.

    Keyed by (session id, the session's next chunk id after the call that left it): a state is valid
    only for a call that starts where it ended, so a state from before a rolled-back or concurrent
    append is never used.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[str, tuple[int, Reader]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, session_id: str, next_chunk_id: int) -> Reader | None:
        with self._lock:
            item = self._items.get(session_id)
            if item is None or item[0] != next_chunk_id:
                return None
            self._items.move_to_end(session_id)
            return item[1]

    def put(self, session_id: str, next_chunk_id: int, reader: Reader) -> None:
        if self.size == 0:
            return
        with self._lock:
            self._items[session_id] = (next_chunk_id, reader)
            self._items.move_to_end(session_id)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def drop(self, session_id: str) -> None:
        with self._lock:
            self._items.pop(session_id, None)


class DecoderEngine:
    """Serves ingest / score / generate for ret-mem sessions with one MemLong model."""

    def __init__(
        self,
        model: MemLongModel,
        tokenizer,
        retriever,
        memory: RetMemClient,
        *,
        max_inflight: int = 4,
        prefetch: bool = True,
        write_behind: int = 8,
        max_call_text_bytes: int = 64 << 20,
        progress_tokens: int = 2048,
        source: str = "",
        window_cache_sessions: int = 8,
    ) -> None:
        self.model = model
        self.cfg = model.config
        self.tokenizer = tokenizer
        self.retriever = retriever
        self.memory = memory
        self.max_call_text_bytes = max_call_text_bytes
        self.write_behind = write_behind  # chunks a call's background writer may hold (0: none)
        self.progress_tokens = progress_tokens
        self.source = source
        self.windows = WindowCache(window_cache_sessions)
        self._model_lock = threading.Lock()
        self._admit = threading.BoundedSemaphore(max_inflight)
        self._count_lock = threading.Lock()
        self.in_flight = 0  # calls admitted and not yet finished (for health, metrics and tests)
        self.max_inflight = max_inflight
        self._prefetch_pool: ThreadPoolExecutor | None = None
        self.set_prefetch(prefetch)
        self.cancelled_calls = 0  # calls stopped because their caller went away (tests read it)
        self.cancel_event = threading.Event()
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_ids: tuple[int, ...] = (int(eos),) if isinstance(eos, int) else ()

    def set_prefetch(self, on: bool) -> None:
        """Whether calls that start from now on retrieve each chunk's memory a chunk ahead, while the model
        computes (benchmarks and tests compare both; the answers are the same)."""
        if on and self._prefetch_pool is None:
            self._prefetch_pool = ThreadPoolExecutor(self.max_inflight, "prefetch")
        self._prefetch = on

    @property
    def prefetch(self) -> bool:
        return self._prefetch

    # -- description --------------------------------------------------------------------------------

    def session_spec(self, retrieval: str = "") -> SessionSpec:
        """The ret-mem spec a session must have for this model, retrieving by `retrieval` ("text" or
        "keys"; "" is this decoder's default)."""
        cfg = dataclasses.replace(self.cfg, retrieval=retrieval or self.cfg.retrieval)
        cfg.check_model(self.model.n_layers)
        return SessionSpec(
            dim=self.model.retrieval_dim(int(self.retriever.dim), cfg),
            kv_shape=self.model.kv_record_shape,
            kv_dtype=self.cfg.kv_dtype,
            kv_codec=self.cfg.kv_codec,
            memory_size=self.cfg.memory_chunks,
            layout=cfg.layout_tag(self.model.n_layers),
        )

    def _source_of(self, session_id: str, spec: SessionSpec) -> str:
        """The retrieval source a session was created with (its layout tag says which); refuses a
        session this decoder cannot read."""
        source = retrieval_source(spec.layout)
        try:
            want = self.session_spec(source)
        except InvalidArgument:  # e.g. key layers this model does not store: not a layout it reads
            want = None
        if want is None or spec.layout != want.layout:
            raise FailedPrecondition(
                f"session {shown(session_id)} holds memory written by layout "
                f"{spec.layout or 'unrecorded'!r}; this decoder reads layout {self.session_spec().layout!r}. "
                "Serve it with a decoder of that layout, or create a new session."
            )
        if spec != want:
            raise InvalidArgument("session_id", "session was created for another model or MemLong setting")
        return source

    def vocab_size(self) -> int:
        return int(self.model.hf.config.vocab_size)

    # -- admission and the model lock ---------------------------------------------------------------

    @contextlib.contextmanager
    def _admitted(self) -> Iterator[None]:
        if not self._admit.acquire(blocking=False):
            # No count: how many calls are in flight would tell a tenant that others are active.
            raise ResourceExhausted("decoder busy; retry with backoff")
        with self._count_lock:
            self.in_flight += 1
        try:
            yield
        finally:
            with self._count_lock:
                self.in_flight -= 1
            self._admit.release()

    @contextlib.contextmanager
    def _model(self, call: Call, report: MemoryReport | None = None, source: str = "") -> Iterator[None]:
        """Hold the model for one step of a call, reading with the session's retrieval `source`."""
        t0 = time.perf_counter()
        if not self._model_lock.acquire(timeout=max(call.deadline.remaining(), 0.0)):
            raise CallCancelled("deadline passed while waiting for the model")
        if report is not None:
            report.queue_s += time.perf_counter() - t0
        try:
            if not call.alive():
                raise CallCancelled("the call was cancelled")
            if source and source != self.cfg.retrieval:
                with self.model.configured(retrieval=source):
                    yield
            else:
                yield
        finally:
            self._model_lock.release()

    def _cancelled(self, exc: CallCancelled) -> None:
        self.cancelled_calls += 1
        self.cancel_event.set()
        log.info("call stopped: %s", exc)

    @contextlib.contextmanager
    def _serving(self, call: Call) -> Iterator[None]:
        """Admit a call and count it when it stops because its caller went away: a CallCancelled
        from its work, or, for a streamed call, its stream closed while it waits at a `yield` (the
        servicer closes the stream of a call that ended, which raises GeneratorExit there)."""
        with self._admitted():
            try:
                yield
            except CallCancelled as exc:
                self._cancelled(exc)
                raise
            except GeneratorExit:
                if not call.alive():
                    self._cancelled(CallCancelled("the call ended before its stream did"))
                raise

    # -- helpers ------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _text(self, data: bytes, name: str) -> str:
        if len(data) > self.max_call_text_bytes:
            raise ResourceExhausted(f"{name}: {len(data)} bytes > limit {self.max_call_text_bytes}")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidArgument(name, f"not valid UTF-8 at byte {exc.start}") from None

    def _port(self, session_id: str, call: Call, commit: bool, keep_recent: bool = True) -> SessionPort:
        return SessionPort(
            self.memory,
            session_id,
            call.deadline,
            commit=commit,
            alive=call.alive,
            executor=self._prefetch_pool if self._prefetch else None,
            keep_recent=keep_recent,
            write_behind=self.write_behind,
        )

    def _spec(self, session_id: str, call: Call) -> SessionSpec:
        """The session's spec, asked of ret-mem once per session (the client keeps it): a spec never
        changes and ret-mem never reuses a session id. A session deleted since is refused by ret-mem at
        the call's first search or append."""
        deadline = call.deadline.downstream()
        deadline.timeout()  # DeadlineExceeded now if no ret-mem call fits, as when the spec is asked for
        return self.memory.spec(session_id, deadline)

    def _open(
        self, session_id: str, next_chunk_id: int, mode: str, call: Call, commit: bool, report: MemoryReport
    ) -> tuple[SessionPort | None, str]:
        """The call's memory port (None: mode off, or ret-mem down in if_available mode) and the
        session's retrieval source (this decoder's default when memory is not read)."""
        if mode == MEMORY_OFF:
            if commit:
                raise InvalidArgument("commit", "cannot store text with memory_mode OFF")
            report.note = "memory off (requested): local window only"
            return None, self.cfg.retrieval
        try:
            # DeadlineExceeded (too little time left for the call) is not caught: it is not ret-mem down.
            spec = self._spec(session_id, call)
        except Unavailable as exc:
            down = Unavailable(f"ret-mem unreachable for session {shown(session_id)}: {exc}")
            self._without_memory(down, mode, commit, report)
            return None, self.cfg.retrieval
        source = self._source_of(session_id, spec)
        if next_chunk_id == 0:
            report.note = "session memory is empty"
        return self._port(session_id, call, commit), source

    @staticmethod
    def _without_memory(exc: Unavailable, mode: str, commit: bool, report: MemoryReport) -> None:
        """Ret-mem is unreachable: noted in the report where the call may run without memory, else
        Unavailable saying how to ask for that."""
        if mode == MEMORY_IF_AVAILABLE and not commit:
            report.note = f"{exc}; ran WITHOUT memory as the request allowed"
            return
        raise Unavailable(
            f"{exc}. Retry later, or ask with memory_mode IF_AVAILABLE to run without memory."
        ) from exc

    def _reader(
        self,
        session_id: str,
        port: SessionPort | None,
        next_chunk_id: int,
        report: MemoryReport | None = None,
    ) -> Reader:
        """A reader continuing the session's cached local state (a copy of it), else a cold one."""
        if next_chunk_id < 0:
            raise InvalidArgument("session.next_chunk_id", "must be >= 0")
        cached = self.windows.get(session_id, next_chunk_id)
        if cached is not None:
            return cached.fork(port, writable=True)
        if next_chunk_id > 0 and report is not None:
            note = (
                "local window cold: this replica holds no window for the session (restart or another replica)"
            )
            report.note = f"{report.note}; {note}" if report.note else note
        return Reader(self.model, self.retriever, self.tokenizer, port, next_chunk_id=next_chunk_id)

    def _keep(self, session_id: str, reader: Reader) -> None:
        """After a call that stored its text: keep its local state for the session's next call."""
        reader.flush(keep_window=True)
        if isinstance(reader.memory, SessionPort):
            reader.memory.flush()  # every chunk is stored (acknowledged) before the call reports success
        reader.cancel_prefetch()  # kept without the call's port: nothing may run on it or hold its K/V
        reader.memory = None  # the call's port dies with the call; the next call brings its own
        if reader.next_chunk_id > 0:  # (session, 0) is a fresh session: never continue a stale state
            self.windows.put(session_id, reader.next_chunk_id, reader)

    @staticmethod
    @contextlib.contextmanager
    def _closing(port: SessionPort | None) -> Iterator[None]:
        """Close the call's port when the call ends, however it ends: its searches started ahead stop."""
        try:
            yield
        finally:
            if port is not None:
                port.close()

    @staticmethod
    def _finish_report(report: MemoryReport, reader: Reader, port: SessionPort | None) -> None:
        st = reader.stats
        report.retrievals = st.retrievals
        report.retrieval_wait_s = st.retrieval_s
        report.retrieval_hidden_s = st.retrieval_hidden_s
        report.retrieval_total_s = st.retrieval_s + st.retrieval_hidden_s
        report.prefetched_retrievals = st.prefetched
        report.compute_s = st.compute_s - st.retrieval_s
        report.bytes_retrieved = st.bytes_retrieved
        report.query = reader.cfg.query
        if port is not None:
            report.retrieved_ids = list(port.retrieved_ids)
            report.memory_used = bool(port.retrieved_ids) or reader.stats.blocks_with_memory > 0
            if not report.memory_used and not report.note:
                report.note = "no chunk boundary with anything to retrieve"

    # -- ingest -------------------------------------------------------------------------------------

    def ingest(
        self, session_id: str, next_chunk_id: int, pieces: Iterator[bytes], call: Call
    ) -> Iterator[IngestProgress]:
        """Encode the concatenated UTF-8 pieces into the session's memory; yields progress."""
        with self._serving(call):
            yield from self._ingest(session_id, next_chunk_id, pieces, call)

    def _ingest(self, session_id, next_chunk_id, pieces, call) -> Iterator[IngestProgress]:
        # The spec never changes: asked of ret-mem once per session (NOT_FOUND etc. before any work then);
        # a session deleted since is refused by ret-mem at the first chunk stored.
        source = self._source_of(session_id, self._spec(session_id, call))
        port = self._port(session_id, call, commit=True, keep_recent=False)
        with self._closing(port):
            reader = self._reader(session_id, port, next_chunk_id)
            utf8 = codecs.getincrementaldecoder("utf-8")()
            pending, received, done_bytes = "", 0, 0

            def progress(done: bool = False) -> IngestProgress:
                st = reader.stats
                return IngestProgress(
                    done_bytes, st.tokens_ingested, reader.next_chunk_id, st.chunks_stored, st.compute_s, done
                )

            def run(text: str, n_bytes: int) -> Iterator[IngestProgress]:
                nonlocal done_bytes
                tokens, base, step = self.encode(text), done_bytes, self.progress_tokens
                for i in range(0, len(tokens), step):
                    with self._model(call, source=source):
                        reader.ingest(tokens[i : i + step], more=i + step < len(tokens))
                    done_bytes = base + n_bytes * min(len(tokens), i + step) // len(tokens)
                    yield progress()
                done_bytes = base + n_bytes

            for piece in pieces:
                received += len(piece)
                if received > self.max_call_text_bytes:
                    raise ResourceExhausted(f"text: more than {self.max_call_text_bytes} bytes in one ingest")
                try:
                    pending += utf8.decode(piece)
                except UnicodeDecodeError as exc:
                    raise InvalidArgument(
                        "text", f"not valid UTF-8 near byte {received - len(piece) + exc.start}"
                    ) from None
                head, pending = split_at_word(pending)
                if head:
                    yield from run(head, len(head.encode()))
            try:
                pending += utf8.decode(b"", final=True)
            except UnicodeDecodeError:
                raise InvalidArgument("text", "ends inside a UTF-8 character") from None
            if pending:
                yield from run(pending, len(pending.encode()))
            with self._model(call, source=source):
                self._keep(session_id, reader)  # the last partial chunk and the window go to memory too
            yield progress(done=True)

    # -- score --------------------------------------------------------------------------------------

    def score(
        self,
        session_id: str,
        next_chunk_id: int,
        text: bytes,
        call: Call,
        *,
        mode: str = MEMORY_REQUIRED,
        commit: bool = False,
    ) -> ScoreResult:
        """log p of every token of `text` read after the session's memory (first token: NaN)."""
        with self._serving(call):
            return self._score(session_id, next_chunk_id, self._text(text, "text"), call, mode, commit)

    def _score(self, session_id, next_chunk_id, text, call, mode, commit) -> ScoreResult:
        tokens = self.encode(text)
        if not tokens:
            raise InvalidArgument("text", "has no tokens")
        report = MemoryReport()
        port, source = self._open(session_id, next_chunk_id, mode, call, commit, report)
        with self._closing(port):

            def read(port: SessionPort | None) -> tuple[Reader, list[torch.Tensor]]:
                reader = self._reader(session_id, port, next_chunk_id, report)
                # With memory the port checks cancellation per chunk; without, slices give the check points.
                step = len(tokens) if port is not None else SCORE_SLICE_CHUNKS * self.cfg.chunk
                parts = []
                for i in range(0, len(tokens), step):
                    with self._model(call, report, source):
                        parts.append(reader.score(tokens[i : i + step]))
                return reader, parts

            try:
                reader, parts = read(port)
            except Unavailable as exc:  # ret-mem went away (its spec was known: no call at the open)
                if port is None:
                    raise
                self._without_memory(exc, mode, commit, report)
                port = None
                reader, parts = read(None)  # nothing was stored (no commit): read again, window only
            if (
                mode == MEMORY_REQUIRED
                and port is not None
                and next_chunk_id  # chunk ids are sequence numbers: the session holds chunks
                and not reader.stats.blocks_searched
            ):
                # Short text inside a chunk whose retrieval this replica does not hold (cold window): no
                # memory was read. A causal query for this chunk is the text before it, which is not here.
                raise FailedPrecondition(
                    f"memory REQUIRED, but none was read: the text ({len(tokens)} tokens) reaches no chunk "
                    "boundary and this replica holds no retrieval for the session's current chunk (cold "
                    "window). Send text that reaches a chunk boundary, or use memory_mode IF_AVAILABLE."
                )
            if commit:
                with self._model(call, report, source):
                    self._keep(session_id, reader)
            logp = torch.cat(parts)
            finite = logp[~torch.isnan(logp)]
            ppl = math.exp(-float(finite.mean())) if len(finite) else float("nan")
            self._finish_report(report, reader, port)
            return ScoreResult(
                token_ids=tokens,
                logprobs=logp.tolist(),
                scored_tokens=len(finite),
                perplexity=ppl,
                memory=report,
                next_chunk_id=reader.next_chunk_id if commit else next_chunk_id,
            )

    # -- generate -----------------------------------------------------------------------------------

    def generate(
        self,
        session_id: str,
        next_chunk_id: int,
        prompt: bytes,
        params: SamplingParams,
        call: Call,
        *,
        mode: str = MEMORY_REQUIRED,
        ignore_eos: bool = False,
    ) -> Iterator[GeneratedToken]:
        """Stream new tokens after `prompt`; the last carries the finish reason and memory report."""
        with self._serving(call):
            yield from self._generate(session_id, next_chunk_id, prompt, params, call, mode, ignore_eos)

    def _generate(self, session_id, next_chunk_id, prompt, params, call, mode, ignore_eos):
        tokens = self.encode(self._text(prompt, "prompt"))
        if not tokens:
            raise InvalidArgument("prompt", "has no tokens")
        if not ignore_eos and self.eos_ids:
            params = SamplingParams(
                **{**params.__dict__, "stop_token_ids": params.stop_token_ids + self.eos_ids}
            )
        report = MemoryReport()
        port, source = self._open(session_id, next_chunk_id, mode, call, False, report)
        with self._closing(port):
            reader = self._reader(session_id, port, next_chunk_id, report)
            steps = reader.generate(tokens, params)
            out: list[int] = []
            text = ""
            while True:
                with self._model(call, report, source):
                    try:
                        token = next(steps, None)
                    except Unavailable as exc:
                        # ret-mem went away: before the first token, maybe go on without
                        if out or port is None:
                            raise
                        self._without_memory(exc, mode, False, report)
                        port = None
                        reader = self._reader(session_id, None, next_chunk_id, report)
                        steps = reader.generate(tokens, params)
                        token = next(steps, None)
                if token is None:
                    break
                out.append(token)
                # A stop token ends the answer and is no part of it: its text (the end of sequence's is
                # "<|im_end|>") is never sent; the token itself is, by id, with the finish reason.
                stop = token in params.stop_token_ids
                full = self.tokenizer.decode(out[:-1] if stop else out)
                stop = stop or any(s in full for s in params.stop_strings)
                last = stop or len(out) >= params.max_new_tokens
                delta, text = stream_delta(text, full, last)
                if last:
                    self._finish_report(report, reader, port)
                    yield GeneratedToken(token, delta, "stop" if stop else "length", report, len(tokens))
                    return
                yield GeneratedToken(token, delta)

    def close(self) -> None:
        if self._prefetch_pool is not None:
            self._prefetch_pool.shutdown(wait=False, cancel_futures=True)


__all__ = ["Call", "CallCancelled", "DecoderEngine", "MemLongError"]
