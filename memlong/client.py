"""`memlong.Client`: the Python client of the gateway (the public API).

    client = Client("127.0.0.1:50051", api_key)
    s = client.create_session("bible")
    client.append(s.session_id, text, progress=True)       # resumable: retries from the committed offset
    answer = client.ask(s.session_id, "What is the pass key? The pass key is")
    print(answer.text, client.score(s.session_id, passage).perplexity)

Server statuses come back as the domain exceptions of `memlong.errors` (UNAUTHENTICATED,
DEADLINE_EXCEEDED and CANCELLED as `grpc.RpcError`). Every call carries a deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import grpc

from memlong.api.decoder.v1 import decoder_pb2 as dpb
from memlong.api.gateway.v1 import gateway_pb2 as pb
from memlong.api.gateway.v1 import gateway_pb2_grpc as pb_grpc
from memlong.errors import Unavailable
from memlong.ids import check_session_id
from memlong.rpc.channel import ChannelOptions, get_channel
from memlong.rpc.status import raise_for_rpc_error

MEMORY_MODES = {
    "required": dpb.MEMORY_MODE_REQUIRED,
    "if_available": dpb.MEMORY_MODE_IF_AVAILABLE,
    "off": dpb.MEMORY_MODE_OFF,
}
GATEWAY_SERVICE = pb.DESCRIPTOR.services_by_name["Gateway"].full_name  # the name on the wire
# Gateway calls a client may retry on UNAVAILABLE (the HTTP front uses the same list).
IDEMPOTENT = tuple((GATEWAY_SERVICE, m) for m in ("GetSession", "ListSessions", "Score"))


@dataclass
class Answer:
    """A generated answer with its timings."""

    text: str
    token_ids: list[int]
    finish_reason: str
    memory: dpb.MemoryReport
    ttft_s: float  # time to the first token
    total_s: float
    timings: dict = field(default_factory=dict)


class Client:
    """A connection to a MemLong gateway, authenticated by an API key."""

    def __init__(self, address: str, api_key: str, timeout_s: float = 600.0) -> None:
        options = ChannelOptions(idempotent_methods=IDEMPOTENT)
        self.stub = pb_grpc.GatewayStub(get_channel(address, options))
        self.metadata = (("x-api-key", api_key),)
        self.timeout_s = timeout_s

    def _call(self, method: str, request, timeout_s: float | None = None):
        try:
            return getattr(self.stub, method)(
                request, timeout=timeout_s or self.timeout_s, metadata=self.metadata
            )
        except grpc.RpcError as err:
            raise_for_rpc_error(err)

    # -- sessions -----------------------------------------------------------------------------------

    def create_session(self, name: str = "", retrieval: str = "") -> pb.Session:
        """A new session; `retrieval` "text" or "keys" picks what its chunks are found by ("" takes the
        decoder's default)."""
        return self._call("CreateSession", pb.CreateSessionRequest(name=name, retrieval=retrieval))

    def get_session(self, session_id: str) -> pb.Session:
        return self._call("GetSession", pb.GetSessionRequest(session_id=check_session_id(session_id)))

    def list_sessions(self) -> list[pb.Session]:
        return list(self._call("ListSessions", pb.ListSessionsRequest()).sessions)

    def delete_session(self, session_id: str) -> None:
        self._call("DeleteSession", pb.DeleteSessionRequest(session_id=check_session_id(session_id)))

    # -- append -------------------------------------------------------------------------------------

    def append(
        self,
        session_id: str,
        text: str | bytes,
        *,
        offset: int | None = None,
        piece_bytes: int = 256 << 10,
        progress: bool | Callable[[pb.AppendProgress], None] = False,
        retries: int = 3,
        timeout_s: float | None = None,
    ) -> pb.AppendProgress:
        """Append `text` at `offset` (default: the session's end). On UNAVAILABLE, asks the session for
        its committed offset and resumes from there (at most `retries` times)."""
        check_session_id(session_id)
        data = text.encode() if isinstance(text, str) else bytes(text)
        base = self.get_session(session_id).text_bytes if offset is None else offset
        bar = None
        if progress is True:
            from tqdm import tqdm

            bar = tqdm(total=len(data), unit="B", unit_scale=True, desc="ingest")
        start = base
        for attempt in range(retries + 1):
            try:
                last = None
                for msg in self._append_once(session_id, data[start - base :], start, piece_bytes, timeout_s):
                    last = msg
                    if bar is not None:
                        bar.n = start - base + msg.bytes_done
                        bar.refresh()
                    elif callable(progress):
                        progress(msg)
                if bar is not None:
                    bar.close()
                if last is None:  # the gateway sends progress at least once, the last one at the end
                    raise Unavailable("the gateway ended the append without a reply")
                return last
            except Unavailable:
                if attempt == retries:
                    raise
                start = max(start, self.get_session(session_id).text_bytes)
        raise AssertionError("unreachable")

    def _append_once(self, session_id, data, offset, piece_bytes, timeout_s) -> Iterator[pb.AppendProgress]:
        def pieces() -> Iterator[pb.AppendRequest]:
            for i in range(0, max(len(data), 1), piece_bytes):
                yield pb.AppendRequest(
                    session_id=session_id, offset=offset + i, text=data[i : i + piece_bytes]
                )

        try:
            yield from self.stub.Append(pieces(), timeout=timeout_s or self.timeout_s, metadata=self.metadata)
        except grpc.RpcError as err:
            raise_for_rpc_error(err)

    # -- reading ------------------------------------------------------------------------------------

    def score(
        self, session_id: str, text: str | bytes, *, memory: str = "required", return_logprobs: bool = False
    ) -> pb.ScoreResponse:
        data = text.encode() if isinstance(text, str) else text
        req = pb.ScoreRequest(
            session_id=check_session_id(session_id),
            text=data,
            memory_mode=MEMORY_MODES[memory],
            return_logprobs=return_logprobs,
        )
        return self._call("Score", req)

    def generate(
        self,
        session_id: str,
        prompt: str | bytes,
        *,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        memory: str = "required",
        timeout_s: float | None = None,
    ) -> Iterator[dpb.GenerateResponse]:
        """Stream tokens; the last message carries finish_reason and the memory report."""
        data = prompt.encode() if isinstance(prompt, str) else prompt
        sampling = dpb.SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed or 0,
            has_seed=seed is not None,
            stop_strings=list(stop),
            stop_token_ids=list(stop_token_ids),
        )
        req = pb.GenerateRequest(
            session_id=check_session_id(session_id),
            prompt=data,
            sampling=sampling,
            memory_mode=MEMORY_MODES[memory],
        )
        try:
            for msg in self.stub.Generate(req, timeout=timeout_s or self.timeout_s, metadata=self.metadata):
                yield msg.token
        except grpc.RpcError as err:
            raise_for_rpc_error(err)

    def ask(self, session_id: str, prompt: str, **kw) -> Answer:
        """Generate to the end and collect the answer with time-to-first-token."""
        t0 = time.perf_counter()
        ttft, ids, parts, last = None, [], [], None
        for tok in self.generate(session_id, prompt, **kw):
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            ids.append(tok.token_id)
            parts.append(tok.text)
            last = tok
        finish = dpb.FinishReason.Name(last.finish_reason) if last is not None else "NONE"
        memory = last.memory if last is not None else dpb.MemoryReport()
        return Answer("".join(parts), ids, finish, memory, ttft or 0.0, time.perf_counter() - t0)
