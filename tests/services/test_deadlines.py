"""Every call carries a deadline, deadlines shrink downstream, a caller who gives up stops the work;
backpressure answers RESOURCE_EXHAUSTED instead of parking the call."""

from __future__ import annotations

import operator
import threading
import time

import grpc
import pytest

from memlong.errors import ResourceExhausted
from tests.factories import RecordingRetriever
from tests.services.stack import start_stack


class GatedRetriever(RecordingRetriever):
    """Embeds normally until `gate` is cleared; then every embed waits for it (and counts the wait)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()
        self.waiting = threading.Event()
        self.calls = 0

    def embed(self, texts):
        self.calls += 1
        if not self.gate.is_set():
            self.waiting.set()
            self.gate.wait(30)
        return super().embed(texts)


class SlowRetriever(RecordingRetriever):
    """Each embed takes a little while: a stand-in for a slow model, so a call outlives its deadline."""

    delay_s = 0.02

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def embed(self, texts):
        self.calls += 1
        threading.Event().wait(self.delay_s)
        return super().embed(texts)


def _assert_strictly_earlier(log, downstream: str, upstream: str) -> None:
    """Deadlines shrink downstream, checked on absolute deadlines: the latest any call to `downstream`
    can have is before the earliest any call to `upstream` can have. A deadline handed on unchanged
    fails (gRPC only rounds it later)."""

    def bounds(server: str) -> tuple[float, float]:
        spans = [(lo, hi) for srv, _, lo, hi in log.deadlines if srv == server]
        assert spans, f"{server} saw no call with a deadline"
        return min(lo for lo, _ in spans), max(hi for _, hi in spans)

    assert bounds(downstream)[1] < bounds(upstream)[0], f"{downstream}'s deadline is not before {upstream}'s"


def test_every_call_carries_a_deadline_and_deadlines_shrink_downstream(stack):
    client = stack.client(timeout_s=20)
    sid = client.create_session().session_id
    client.append(sid, "alpha beta gamma delta " * 6)
    list(client.generate(sid, "alpha", max_new_tokens=3))
    client.list_sessions()
    stack.log.clear()
    client.score(sid, "alpha beta gamma delta epsilon zeta " * 4)
    calls = list(stack.log.calls)
    by = {s: [r for srv, _, r in calls if srv == s] for s in ("gateway", "decoder", "retmem")}
    assert len(by["gateway"]) == len(by["decoder"]) == 1 and len(by["retmem"]) > 5
    assert by["gateway"][0] <= 20 * 1.01  # the caller's budget (gRPC rounds timeouts up <= 1 %)
    _assert_strictly_earlier(stack.log, "decoder", "gateway")
    _assert_strictly_earlier(stack.log, "retmem", "decoder")
    client.delete_session(sid)
    # Over the whole suite's traffic in this test: no server saw a call without a deadline.
    assert all(remaining is not None for _, _, remaining in stack.log.calls)


def test_a_caller_who_gives_up_gets_deadline_exceeded_and_the_work_stops(tmp_path):
    retriever = SlowRetriever()
    stack = start_stack(tmp_path, retriever=retriever)
    try:
        client = stack.client(timeout_s=20)
        sid = client.create_session().session_id
        client.append(sid, "alpha beta gamma delta " * 4)
        long_text = "alpha beta gamma delta epsilon " * 200  # ~1500 chunks of 4: ~30 s of slow embeds
        before, stored = client.get_session(sid), stack.retmem.shard.info(sid).num_chunks
        stack.log.clear()
        with pytest.raises(grpc.RpcError) as err:
            stack.client(timeout_s=0.5).score(sid, long_text)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert stack.decoder.engine.cancel_event.wait(10), "the decoder did not stop the abandoned call"
        assert stack.decoder.engine.cancelled_calls == 1
        # The caller's 0.5 s budget reached every hop, each deadline strictly earlier than its caller's.
        seen = list(stack.log.calls)
        by = {s: [r for srv, _, r in seen if srv == s] for s in ("gateway", "decoder", "retmem")}
        assert all(by.values()) and all(r is not None for rs in by.values() for r in rs)
        assert max(by["gateway"]) <= 0.5 * 1.01  # gRPC rounds timeouts up by at most 1 %
        _assert_strictly_earlier(stack.log, "decoder", "gateway")
        _assert_strictly_earlier(stack.log, "retmem", "decoder")
        # A score stores nothing, and the abandoned one wrote nothing to ret-mem on its way out.
        assert not [m for srv, m, _ in seen if srv == "retmem" and m.endswith("/Append")]
        after, size = client.get_session(sid), operator.attrgetter("text_bytes", "tokens", "chunks")
        assert size(after) == size(before)
        assert stack.retmem.shard.info(sid).num_chunks == stored
        calls = retriever.calls
        assert client.score(sid, "alpha beta").scored_tokens > 0  # and it serves the next call
        assert retriever.calls - calls < 10  # the abandoned call's work is not going on
    finally:
        stack.stop()


def test_a_busy_decoder_answers_resource_exhausted_not_a_hang(tmp_path):
    retriever = GatedRetriever()
    stack = start_stack(tmp_path, retriever=retriever, max_inflight=1)
    try:
        client = stack.client(timeout_s=20)
        sid = client.create_session().session_id
        client.append(sid, "alpha beta gamma delta " * 4)
        retriever.gate.clear()
        result: dict = {}
        worker = threading.Thread(
            target=lambda: result.setdefault("r", client.score(sid, "alpha beta " * 10))
        )
        worker.start()
        assert retriever.waiting.wait(10)
        # Refused, not parked: a call that waited would end DEADLINE_EXCEEDED at the client's 20 s.
        with pytest.raises(ResourceExhausted, match="busy"):
            client.score(sid, "gamma delta")
        assert stack.decoder.engine.in_flight == 1  # the refused call was never admitted
        retriever.gate.set()
        worker.join(20)
        assert result["r"].scored_tokens > 0
    finally:
        retriever.gate.set()
        stack.stop()


def test_retmem_down_is_unavailable_then_serving_again(stack):
    client = stack.client(timeout_s=20)
    sid = client.create_session().session_id
    client.append(sid, "alpha beta gamma delta " * 6)
    stack.retmem.stop()
    from memlong.errors import Unavailable

    with pytest.raises(Unavailable, match="ret-mem unreachable"):
        client.score(sid, "alpha beta gamma")
    relaxed = client.score(sid, "alpha beta gamma", memory="if_available")
    assert not relaxed.memory.memory_used and "WITHOUT memory" in relaxed.memory.note
    off = client.score(sid, "alpha beta gamma", memory="off")
    assert not off.memory.memory_used

    stack.retmem.start()  # same port, same data directory: the session's memory is recovered
    deadline = time.monotonic() + 30
    while True:  # the decoder's channel reconnects with backoff: poll with a bound, no fixed sleep
        try:
            back = client.score(sid, "alpha beta gamma delta alpha beta gamma delta")
            break
        except Unavailable:
            if time.monotonic() > deadline:
                raise
            threading.Event().wait(0.2)
    assert back.memory.memory_used


def test_a_budget_with_no_time_for_a_downstream_call_is_deadline_exceeded():
    from memlong.errors import DeadlineExceeded
    from memlong.rpc.channel import Deadline
    from memlong.rpc.status import status_for

    with pytest.raises(DeadlineExceeded):  # 20 ms is under the downstream margin (50 ms + 1 %)
        Deadline.after(0.02).downstream().timeout()
    assert status_for(DeadlineExceeded("x")) == grpc.StatusCode.DEADLINE_EXCEEDED


def test_short_deadlines_are_deadline_exceeded_at_every_hop_not_unavailable(stack):
    """Under ~50 ms no downstream call fits: the answer is DEADLINE_EXCEEDED (not retried by clients),
    never UNAVAILABLE or the decoder's "ret-mem unreachable"."""
    from memlong.api.decoder.v1 import decoder_pb2 as dpb
    from memlong.api.decoder.v1 import decoder_pb2_grpc as dpb_grpc
    from memlong.api.gateway.v1 import gateway_pb2 as pb
    from memlong.api.gateway.v1 import gateway_pb2_grpc as pb_grpc
    from memlong.errors import DeadlineExceeded
    from memlong.rpc.channel import Deadline, get_channel
    from memlong.services.decoder.engine import Call

    client = stack.client(timeout_s=20)
    sid = client.create_session().session_id
    client.append(sid, "alpha beta gamma delta " * 6)
    # The decoder's core: a budget too short for the ret-mem call is out of time, not ret-mem down.
    with pytest.raises(DeadlineExceeded):
        stack.decoder.engine.score(sid, 0, b"alpha beta", Call(Deadline.after(0.02)))
    # Over gRPC, on stubs without retries (a retried UNAVAILABLE could end as DEADLINE_EXCEEDED anyway).
    gateway = pb_grpc.GatewayStub(get_channel(stack.gateway.address()))
    decoder = dpb_grpc.DecoderStub(get_channel(stack.decoder.address()))
    md = (("x-api-key", "key-a"),)
    ref = dpb.SessionRef(session_id=sid, next_chunk_id=0)
    for call in (
        lambda: gateway.GetSession(pb.GetSessionRequest(session_id=sid), timeout=0.03, metadata=md),
        lambda: gateway.Score(pb.ScoreRequest(session_id=sid, text=b"alpha beta"), timeout=0.03, metadata=md),
        lambda: decoder.Score(dpb.ScoreRequest(session=ref, text=b"alpha beta"), timeout=0.03),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.value.details()
    assert client.score(sid, "alpha beta").scored_tokens > 0  # and a call with time left is served


def test_a_downstream_deadline_exceeded_is_deadline_exceeded_not_internal():
    """A ret-mem call that ran out of the time the decoder handed it: the decoder's call is out of time."""
    from memlong.rpc.status import grpc_errors

    class DownstreamTimedOut(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.DEADLINE_EXCEEDED

    class Context:
        def abort(self, code, details):
            self.status = (code, details)
            raise Exception(details)

    class Servicer:
        @grpc_errors
        def Score(self, request, context):  # noqa: N802
            raise DownstreamTimedOut()

    context = Context()
    with pytest.raises(Exception, match="ran out of time"):
        Servicer().Score(None, context)
    assert context.status[0] == grpc.StatusCode.DEADLINE_EXCEEDED
