"""End to end over real gRPC on loopback: lifecycle, in-process congruence, streaming generation."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from memlong.chunkloop import Reader, SamplingParams
from memlong.errors import FailedPrecondition, InvalidArgument, NotFound
from tests.factories import RecordingRetriever, tiny_memory


def _text(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    return " ".join(rng.choice(words) for _ in range(n))


def test_session_lifecycle(stack):
    client = stack.client()
    s = client.create_session("book")
    assert s.name == "book" and s.text_bytes == 0 and s.chunks == 0 and s.shard == "shard0"
    assert [x.session_id for x in client.list_sessions()] == [s.session_id]
    text = _text(35)  # ~200 bytes: 50 chunks of 4 tokens, under the tiny memory's 64
    last = client.append(s.session_id, text, piece_bytes=50)
    assert last.done and last.text_bytes == len(text.encode())
    got = client.get_session(s.session_id)
    assert got.text_bytes == len(text.encode()) and got.tokens == len(text.encode())
    assert got.chunks == math.ceil(got.tokens / 4)  # every token stored, the last chunk partial
    more = client.append(s.session_id, " and more")  # continues at the committed offset
    assert more.text_bytes == got.text_bytes + len(" and more")
    client.delete_session(s.session_id)
    with pytest.raises(NotFound):
        client.get_session(s.session_id)
    assert client.list_sessions() == []


def test_append_resumes_by_offset_and_skips_committed_bytes(stack):
    client = stack.client()
    sid = client.create_session().session_id
    text = _text(40).encode()
    client.append(sid, text[:100], offset=0)
    again = client.append(sid, text[:100], offset=0)  # a replay of committed bytes changes nothing
    assert again.done and again.text_bytes == 100
    assert client.get_session(sid).tokens == 100
    last = client.append(sid, text[50:], offset=50)  # overlap: only bytes after 100 are new
    assert last.text_bytes == len(text)
    assert client.get_session(sid).tokens == len(text)
    with pytest.raises(InvalidArgument, match="offset"):
        client.append(sid, b"gap", offset=len(text) + 5)


def test_append_reaches_the_decoder_piece_by_piece_as_the_client_sends_it(stack, monkeypatch):
    """The gateway gathers no Append stream: each piece goes on to the decoder as it arrives, as it
    came (one Ingest message each), so the decoder reads the first before the client sends the next."""
    import threading

    from memlong.api.gateway.v1 import gateway_pb2 as pb
    from memlong.api.gateway.v1 import gateway_pb2_grpc as pb_grpc
    from memlong.rpc.channel import get_channel
    from memlong.services.decoder.engine import DecoderEngine

    received, first_in = [], threading.Event()
    real = DecoderEngine.ingest

    def ingest(self, session_id, next_chunk_id, pieces, call):
        def watched():
            for piece in pieces:
                received.append(len(piece))
                first_in.set()
                yield piece

        return real(self, session_id, next_chunk_id, watched(), call)

    monkeypatch.setattr(DecoderEngine, "ingest", ingest)
    sid = stack.client().create_session().session_id
    text = _text(40).encode()
    cut = len(text) // 2
    sent_after_first_read = []

    def requests():
        yield pb.AppendRequest(session_id=sid, offset=0, text=text[:cut])
        sent_after_first_read.append(first_in.wait(30))  # a gateway that gathered would wait forever
        yield pb.AppendRequest(session_id=sid, offset=cut, text=text[cut:])

    stub = pb_grpc.GatewayStub(get_channel(stack.gateway.address()))
    last = list(stub.Append(requests(), timeout=60, metadata=(("x-api-key", "key-a"),)))[-1]
    assert sent_after_first_read == [True], "the decoder saw nothing before the stream ended"
    assert received == [cut, len(text) - cut]
    assert last.done and last.text_bytes == len(text)


def test_ingest_then_score_equals_the_in_process_decoder_core(stack):
    client = stack.client()
    sid = client.create_session().session_id
    book, passage = _text(36, seed=1), _text(8, seed=2)
    assert len(book) + len(passage) <= 256  # within the tiny memory (64 chunks of 4): no eviction
    client.append(sid, book, piece_bytes=333)
    served = client.score(sid, passage, return_logprobs=True)

    # The same operations in process: one reader ingests and stores everything, keeping its window;
    # the score continues from it (the decoder keeps the session's window between calls).
    tok = stack.tokenizer
    retriever = RecordingRetriever()
    memory = tiny_memory(stack.model, retriever)
    first = Reader(stack.model, retriever, tok, memory)
    first.ingest(tok.encode(book))
    first.flush(keep_window=True)
    second = first.fork(memory)
    want = second.score(tok.encode(passage))

    got = torch.tensor(list(served.logprobs))
    assert list(served.token_ids) == tok.encode(passage)
    assert torch.isnan(got[0]) and torch.isnan(want[0])
    torch.testing.assert_close(got[1:], want[1:].float(), atol=1e-4, rtol=0)
    assert served.memory.memory_used and served.memory.retrievals == second.stats.retrievals
    finite = want[~torch.isnan(want)]
    assert served.perplexity == pytest.approx(math.exp(-float(finite.mean())), rel=1e-4)
    # Scoring leaves memory unchanged (commit is off).
    assert client.get_session(sid).chunks == first.next_chunk_id


def test_a_session_read_in_several_calls_reads_as_one_pass_and_a_cold_replica_says_so(stack):
    client = stack.client()
    sid = client.create_session().session_id
    tok = stack.tokenizer
    parts = [t[: len(t) // 4 * 4] for t in (_text(12, seed=21), _text(12, seed=22))]
    ids = [tok.encode(p) for p in parts]
    assert all(len(i) % stack.model.config.chunk == 0 for i in ids)  # calls end on chunk boundaries
    passage = _text(6, seed=23)
    offset = 0
    for part in parts:
        client.append(sid, part, offset=offset)
        offset += len(part.encode())
    served = client.score(sid, passage, return_logprobs=True)

    one = Reader(stack.model, RecordingRetriever(), tok, tiny_memory(stack.model, RecordingRetriever()))
    one.ingest(ids[0] + ids[1])
    want = one.score(tok.encode(passage))
    torch.testing.assert_close(torch.tensor(list(served.logprobs))[1:], want[1:].float(), atol=1e-4, rtol=0)
    assert "cold" not in served.memory.note

    stack.decoder.engine.windows.drop(sid)  # as after a restart, or on another replica
    cold = client.score(sid, passage, return_logprobs=True)
    assert "local window cold" in cold.memory.note
    assert not np.allclose(np.array(cold.logprobs[1:]), np.array(served.logprobs[1:]))


def test_a_short_score_inside_a_chunk_reads_the_chunks_memory_or_refuses_when_required(stack):
    """A session that ends mid-chunk, then a text too short to reach the next boundary: the rest of
    the chunk reads what its boundary retrieved (as one pass would); a replica that does not hold that
    retrieval refuses a REQUIRED read instead of answering without memory."""
    client = stack.client()
    sid = client.create_session().session_id
    tok, c = stack.tokenizer, stack.model.config.chunk
    text = _text(40, seed=31)
    text = text[: len(text) // c * c + 1]  # ends one token into a chunk
    passage = "ab"  # two tokens: stays inside that chunk
    assert len(tok.encode(text)) % c == 1 and len(tok.encode(text + passage)) % c == 3
    client.append(sid, text)
    served = client.score(sid, passage, return_logprobs=True)
    assert served.memory.memory_used and served.memory.retrievals == 0  # the boundary's, carried over

    one = Reader(stack.model, RecordingRetriever(), tok, tiny_memory(stack.model, RecordingRetriever()))
    one.ingest(tok.encode(text))
    want = one.score(tok.encode(passage))
    torch.testing.assert_close(torch.tensor(list(served.logprobs))[1:], want[1:].float(), atol=1e-4, rtol=0)
    no_memory = client.score(sid, passage, memory="off", return_logprobs=True)
    assert not np.allclose(no_memory.logprobs[1:], served.logprobs[1:])  # memory made a difference

    stack.decoder.engine.windows.drop(sid)  # a replica without the session's state
    with pytest.raises(FailedPrecondition, match="REQUIRED"):
        client.score(sid, passage)
    cold = client.score(sid, passage, memory="if_available")
    assert not cold.memory.memory_used and "cold" in cold.memory.note


def test_score_without_memory_says_so(stack):
    client = stack.client()
    sid = client.create_session().session_id
    client.append(sid, _text(100))
    off = client.score(sid, _text(30, seed=3), memory="off")
    assert not off.memory.memory_used and "memory off" in off.memory.note and off.memory.retrievals == 0


def test_generate_streams_and_honours_stop_conditions(stack):
    client = stack.client()
    sid = client.create_session().session_id
    client.append(sid, _text(100))
    tokens = list(client.generate(sid, "alpha beta", max_new_tokens=7))
    assert len(tokens) == 7 and tokens[-1].finish_reason == 1  # LENGTH
    assert all(t.finish_reason == 0 for t in tokens[:-1])
    assert tokens[-1].memory.memory_used  # the prompt seeded the first retrieval

    # Greedy is deterministic: stop at the 3rd token's id, and at a string the 2nd token's text makes.
    ids = [t.token_id for t in tokens]
    stopped = list(client.generate(sid, "alpha beta", max_new_tokens=7, stop_token_ids=[ids[2]]))
    first_hit = ids.index(ids[2])
    assert [t.token_id for t in stopped] == ids[: first_hit + 1] and stopped[-1].finish_reason == 2
    text = "".join(t.text for t in tokens)
    stop = text[: len(tokens[0].text) + 2]
    by_string = list(client.generate(sid, "alpha beta", max_new_tokens=7, stop=[stop]))
    assert by_string[-1].finish_reason == 2 and len(by_string) <= 2

    # Sampling with a seed is reproducible.
    a = [t.token_id for t in client.generate(sid, "alpha", max_new_tokens=5, temperature=1.0, seed=7)]
    b = [t.token_id for t in client.generate(sid, "alpha", max_new_tokens=5, temperature=1.0, seed=7)]
    assert a == b


def test_a_stop_token_ends_the_answer_without_its_text(stack, monkeypatch):
    """A stop token, the caller's or the model's end of sequence, is reported by id and never sent as
    text: an answer does not end with `<|im_end|>`, and the pieces still add up to the answer."""
    client = stack.client()
    sid = client.create_session().session_id
    client.append(sid, _text(100))
    ask = {"max_new_tokens": 7, "temperature": 1.0, "seed": 7}  # seeded: varied ids, reproducible
    ids = client.ask(sid, "alpha beta", **ask).token_ids
    end = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])  # stop after some text
    eos = ids[end]
    named = client.ask(sid, "alpha beta", **ask, stop_token_ids=[eos])
    assert named.token_ids == ids[: end + 1] and named.finish_reason == "FINISH_REASON_STOP"
    assert named.text == stack.tokenizer.decode(ids[:end])
    # The same id as the tokenizer's end of sequence, decoded as its special token's text.
    monkeypatch.setattr(stack.decoder.engine, "eos_ids", (eos,))
    monkeypatch.setattr(
        stack.tokenizer, "decode", lambda out: " ".join("<|im_end|>" if i == eos else str(i) for i in out)
    )
    tokens = list(client.generate(sid, "alpha beta", **ask))
    assert [t.token_id for t in tokens] == ids[: end + 1] and tokens[-1].finish_reason == 2  # STOP
    assert tokens[-1].text == "" and "".join(t.text for t in tokens) == named.text


def test_generate_matches_the_in_process_reader(stack):
    client = stack.client()
    sid = client.create_session().session_id
    book = _text(36, seed=5)
    client.append(sid, book)
    served = [t.token_id for t in client.generate(sid, "gamma delta", max_new_tokens=6)]
    tok, retriever = stack.tokenizer, RecordingRetriever()
    memory = tiny_memory(stack.model, retriever)
    first = Reader(stack.model, retriever, tok, memory)
    first.ingest(tok.encode(book))
    first.flush()
    reader = Reader(stack.model, retriever, tok, memory, next_chunk_id=first.next_chunk_id)
    want = list(reader.generate(tok.encode("gamma delta"), SamplingParams(max_new_tokens=6)))
    assert served == want


def test_prefetch_gives_the_same_logprobs_as_retrieval_at_the_boundary(stack):
    client = stack.client()
    sid = client.create_session().session_id
    client.append(sid, _text(150, seed=8))
    passage = _text(80, seed=9)  # longer than the window: its own chunks enter (call-local) memory
    with_prefetch = client.score(sid, passage, return_logprobs=True)
    stack.decoder.engine.set_prefetch(False)
    try:
        without = client.score(sid, passage, return_logprobs=True)
    finally:
        stack.decoder.engine.set_prefetch(True)
    np.testing.assert_array_equal(np.array(with_prefetch.logprobs), np.array(without.logprobs))
    m = with_prefetch.memory
    assert m.retrievals == without.memory.retrievals > 10
    # Every boundary's search was started a chunk ahead, but the call's first when it starts on one.
    assert m.prefetched_retrievals >= m.retrievals - 1
    assert m.retrieval_total_s == pytest.approx(m.retrieval_wait_s + m.retrieval_hidden_s)
    assert without.memory.prefetched_retrievals == 0 and without.memory.retrieval_hidden_s == 0


def test_write_behind_appends_leave_the_same_memory_as_appends_made_in_line(stack):
    """The same long text (past the tiny memory: evictions by retrieval counts happen) ingested with
    appends made before the model reads on and with the writer making them behind it: the same chunks
    stay in ret-mem, and a score over each session reads the same memory, bit for bit."""
    client, engine = stack.client(), stack.decoder.engine
    text, passage = " ".join(["alpha beta gamma delta epsilon zeta eta theta"] * 40), _text(40, seed=12)
    sessions = {}
    for write_behind in (0, 8):
        engine.write_behind = write_behind
        try:
            sid = client.create_session().session_id
            client.append(sid, text)
        finally:
            engine.write_behind = 8
        sessions[write_behind] = sid
    info = {w: stack.retmem.shard.info(sid) for w, sid in sessions.items()}
    assert info[0].stats["evicted_chunks"] > 0
    assert info[0].stats == info[8].stats  # the same appends, searches and evictions
    kept = {w: stack.retmem.shard.bank.get(sid).ids().tolist() for w, sid in sessions.items()}
    assert kept[0] == kept[8]
    scores = {w: client.score(sid, passage, return_logprobs=True) for w, sid in sessions.items()}
    assert list(scores[0].memory.retrieved_ids) == list(scores[8].memory.retrieved_ids)
    np.testing.assert_array_equal(np.array(scores[0].logprobs), np.array(scores[8].logprobs))


def test_reads_ask_ret_mem_for_no_session_info_and_a_deleted_session_is_refused(stack):
    from memlong.errors import AlreadyExists, NotFound
    from memlong.rpc.channel import Deadline
    from memlong.services.decoder.engine import Call

    client, engine = stack.client(), stack.decoder.engine
    sid = client.create_session().session_id
    client.append(sid, _text(60, seed=2))
    stack.log.clear()
    client.score(sid, _text(30, seed=3))
    client.score(sid, _text(30, seed=4), memory="if_available")
    list(client.generate(sid, "alpha beta", max_new_tokens=3))

    def retmem_calls() -> list[str]:
        return [m.rsplit("/", 1)[1] for srv, m, _ in stack.log.calls if srv == "retmem"]

    assert "Retrieve" in retmem_calls() and "GetSession" not in retmem_calls()
    # Deleted: ret-mem refuses the first search of a read, though the decoder holds its spec and window.
    next_chunk_id = client.get_session(sid).chunks
    client.delete_session(sid)
    with pytest.raises(NotFound):
        engine.score(sid, next_chunk_id, _text(30, seed=3).encode(), Call(Deadline.after(10)))
    # Ret-mem never gives a deleted session's id to a new session, so a kept spec cannot go stale.
    with pytest.raises(AlreadyExists):
        stack.gateway.retmem.create_session(sid, engine.session_spec())


def test_a_session_written_by_another_memory_layout_is_refused(stack):
    import dataclasses

    import grpc

    from memlong.api.decoder.v1 import decoder_pb2 as dpb
    from memlong.api.decoder.v1 import decoder_pb2_grpc
    from memlong.rpc.channel import Deadline
    from memlong.services.decoder.engine import Call

    engine = stack.decoder.engine
    spec = engine.session_spec()
    assert spec.layout == "per_layer:0,1,2,3"  # the tiny model's default: every layer stores its own K/V
    paper = dataclasses.replace(spec, kv_shape=spec.kv_shape[1:], layout="paper:mem_layer=1")
    stack.gateway.retmem.create_session("written-by-paper", paper)
    with pytest.raises(FailedPrecondition, match="paper:mem_layer=1"):
        engine.score("written-by-paper", 0, b"alpha beta", Call(Deadline.after(10)))
    # and over gRPC: FAILED_PRECONDITION, not INVALID_ARGUMENT or INTERNAL
    with grpc.insecure_channel(stack.decoder.address()) as ch:
        stub = decoder_pb2_grpc.DecoderStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(
                dpb.ScoreRequest(session=dpb.SessionRef(session_id="written-by-paper"), text=b"alpha"),
                timeout=10,
            )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_streamed_text_holds_back_incomplete_utf8_so_the_pieces_add_up():
    from memlong.services.decoder.engine import stream_delta

    out = "；スレス".encode()
    pieces, sent = [], ""
    for n in range(1, len(out) + 1):  # one byte per token, as a byte-level tokenizer may emit
        full = out[:n].decode("utf-8", errors="replace")
        delta, sent = stream_delta(sent, full, last=n == len(out))
        pieces.append(delta)
    assert "".join(pieces) == "；スレス" and "\ufffd" not in "".join(pieces)
    # A text that really ends in an invalid byte still says so with the last token.
    assert stream_delta("a", "a\ufffd", last=True) == ("\ufffd", "a\ufffd")


def test_each_session_keeps_the_retrieval_source_it_was_created_with(stack):
    """Sessions retrieving by text and by keys on one decoder, each served as the in-process reader
    of its source reads; a bad source is refused; a decoder of other key layers refuses the session."""
    import dataclasses

    client = stack.client()
    tok = stack.tokenizer
    book, passage = _text(36, seed=31), _text(8, seed=32)
    served = {}
    for source in ("text", "keys"):
        s = client.create_session(source, retrieval=source)
        client.append(s.session_id, book)
        got = client.get_session(s.session_id)
        assert got.retrieval == source and got.chunks > 0
        served[source] = (s.session_id, client.score(s.session_id, passage, return_logprobs=True))
    assert client.get_session(client.create_session().session_id).retrieval == "text"  # the default
    listed = {s.name: s.retrieval for s in client.list_sessions()}
    assert listed == {"text": "text", "keys": "keys", "": "text"}
    with pytest.raises(InvalidArgument, match="retrieval"):
        client.create_session("x", retrieval="bm25")

    model = stack.model
    with model.configured(retrieval="keys"):
        retriever = RecordingRetriever()
        memory = tiny_memory(model, retriever)
        first = Reader(model, retriever, tok, memory)
        first.ingest(tok.encode(book))
        first.flush(keep_window=True)
        want = first.fork(memory).score(tok.encode(passage))
        assert retriever.texts == []  # nothing embedded as text
    sid, got = served["keys"]
    torch.testing.assert_close(torch.tensor(list(got.logprobs))[1:], want[1:].float(), atol=1e-4, rtol=0)
    assert got.memory.memory_used
    assert not np.allclose(np.array(served["text"][1].logprobs[1:]), np.array(got.logprobs[1:]))

    engine = stack.decoder.engine
    other = dataclasses.replace(engine.cfg, key_layers=(0,))
    saved = engine.cfg
    engine.cfg = other  # as a decoder started with other key layers
    try:
        with pytest.raises(FailedPrecondition, match="retrieval=keys:1,2"):
            client.score(sid, passage)
    finally:
        engine.cfg = saved


def test_the_retry_lists_name_real_methods():
    """A retry policy for a name the server does not have is silently never applied."""
    from google.protobuf import descriptor_pool

    from memlong.client import IDEMPOTENT
    from memlong.services.retmem.client import IDEMPOTENT as RETMEM_IDEMPOTENT
    from memlong.services.retmem.client import SERVICE_NAME as RETMEM_SERVICE

    pool = descriptor_pool.Default()
    for service, method in [*IDEMPOTENT, *((RETMEM_SERVICE, m) for m in RETMEM_IDEMPOTENT)]:
        assert method in pool.FindServiceByName(service).methods_by_name, (service, method)
