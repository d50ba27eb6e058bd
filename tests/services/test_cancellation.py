"""A call the client cancels, or whose deadline passes, stops downstream: the decoder stops working,
its slot frees, and such an Append leaves no chunk behind (its retry stores what a fresh session
stores)."""

from __future__ import annotations

import grpc
import pytest

from memlong.api.decoder.v1 import decoder_pb2 as dpb
from memlong.api.gateway.v1 import gateway_pb2 as pb
from memlong.api.gateway.v1 import gateway_pb2_grpc as pb_grpc
from memlong.chunkloop import Reader
from memlong.rpc.channel import get_channel
from tests.services.stack import Paced, until

MD = (("x-api-key", "key-a"),)


def test_a_cancelled_generate_stops_the_decoder_and_frees_its_slot(stack, monkeypatch):
    client = stack.client()
    sid = client.create_session().session_id
    client.append(sid, "alpha beta gamma delta " * 4)
    pace = Paced()
    monkeypatch.setattr(Reader, "generate", pace.wrap(Reader.generate))
    stub = pb_grpc.GatewayStub(get_channel(stack.gateway.address()))
    req = pb.GenerateRequest(session_id=sid, prompt=b"alpha", sampling=dpb.SamplingParams(max_new_tokens=400))
    call = stub.Generate(req, timeout=120, metadata=MD)
    for _ in range(3):
        pace.go.release()
    next(call)  # the decoder is generating
    call.cancel()
    for _ in range(400):  # let a decoder that did not notice run on to the end
        pace.go.release()
    engine = stack.decoder.engine
    assert until(lambda: engine.in_flight == 0), "the decoder slot was never freed"
    assert pace.steps < 400, "the decoder generated every token of a cancelled call"
    assert engine.cancel_event.is_set() and engine.cancelled_calls == 1  # counted as score's are
    assert client.score(sid, "alpha beta").scored_tokens > 0  # serving goes on


TEXT = "alpha beta gamma delta epsilon zeta eta theta " * 40


def _paced_append(stack, monkeypatch, sid: str, timeout_s: float):
    """(pace, call): an Append of TEXT whose decoder takes each block of work only when let go."""
    pace = Paced()
    monkeypatch.setattr(Reader, "_blocks", pace.wrap(Reader._blocks))
    stub = pb_grpc.GatewayStub(get_channel(stack.gateway.address()))
    request = pb.AppendRequest(session_id=sid, offset=0, text=TEXT.encode())
    return pace, stub.Append(iter([request]), timeout=timeout_s, metadata=MD)


def _assert_the_append_left_nothing(stack, monkeypatch, pace: Paced, sid: str) -> None:
    """After an Append that ended early: the decoder stopped and freed its slot, nothing was committed
    and no chunk of it is left in ret-mem."""
    for _ in range(10_000):  # a decoder that did not notice would store the rest now
        pace.go.release()
    engine = stack.decoder.engine
    assert until(lambda: engine.in_flight == 0)
    assert engine.cancelled_calls == 1
    monkeypatch.undo()
    assert stack.client().get_session(sid).text_bytes == 0
    assert stack.retmem.shard.info(sid).num_chunks == 0, "chunks of an append that ended outlived it"


def test_a_cancelled_append_leaves_no_chunk_and_its_retry_stores_the_text_once(stack, monkeypatch):
    client = stack.client()
    fresh = client.create_session().session_id
    client.append(fresh, TEXT)
    want = stack.retmem.shard.info(fresh).num_chunks

    sid = client.create_session().session_id
    pace, call = _paced_append(stack, monkeypatch, sid, timeout_s=120)
    for _ in range(30):  # some chunks reach ret-mem
        pace.go.release()
    assert until(lambda: pace.steps >= 30)
    call.cancel()
    _assert_the_append_left_nothing(stack, monkeypatch, pace, sid)
    client.append(sid, TEXT)
    assert stack.retmem.shard.info(sid).num_chunks == want
    a = client.score(fresh, "alpha beta gamma", return_logprobs=True)
    b = client.score(sid, "alpha beta gamma", return_logprobs=True)
    # The same memory, chunk for chunk (the retry's ids start after the range the cancelled one used).
    table = stack.gateway.servicer.table
    shift = table.get("tenant-a", sid).next_chunk_id - table.get("tenant-a", fresh).next_chunk_id
    assert list(a.memory.retrieved_ids) == [i - shift for i in b.memory.retrieved_ids]
    assert a.logprobs[1:] == b.logprobs[1:]  # (the first is NaN: nothing scored before it)


def test_an_append_whose_deadline_passes_leaves_no_chunk(stack, monkeypatch):
    """A deadline that expires during an Append ends it like a cancel: the decoder stops, nothing is
    committed, and the chunks it had stored leave ret-mem."""
    sid = stack.client().create_session().session_id
    pace, call = _paced_append(stack, monkeypatch, sid, timeout_s=10)
    for _ in range(30):  # some chunks reach ret-mem, then the decoder crawls past the deadline
        pace.go.release()
    assert until(lambda: stack.retmem.shard.info(sid).num_chunks > 0, 10)
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _assert_the_append_left_nothing(stack, monkeypatch, pace, sid)
