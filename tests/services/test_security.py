"""API keys, the authorization table (complete over the public methods), tenant isolation, and bad text
at the gateway."""

from __future__ import annotations

import itertools

import grpc
import pytest

from memlong.api.decoder.v1 import decoder_pb2 as dpb
from memlong.api.gateway.v1 import gateway_pb2 as pb
from memlong.api.gateway.v1 import gateway_pb2_grpc as pb_grpc
from memlong.rpc.channel import get_channel
from memlong.services.decoder.port import SessionPort
from memlong.services.gateway.config import Quotas
from tests.services.stack import start_stack

OK, DENIED, MISSING = grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.NOT_FOUND

# method -> expected status for (owner, other tenant, no key). Session-less methods work for any tenant.
AUTHZ = {
    "CreateSession": (OK, OK, DENIED),
    "GetSession": (OK, MISSING, DENIED),
    "ListSessions": (OK, OK, DENIED),
    "DeleteSession": (OK, MISSING, DENIED),
    "Append": (OK, MISSING, DENIED),
    "Score": (OK, MISSING, DENIED),
    "Generate": (OK, MISSING, DENIED),
}


def _invoke(stub, method: str, sid: str, metadata):
    """Call `method` on session `sid`; return (status, reply or replies)."""
    args = {"timeout": 20, "metadata": metadata}
    try:
        if method == "CreateSession":
            return OK, stub.CreateSession(pb.CreateSessionRequest(), **args)
        if method == "GetSession":
            return OK, stub.GetSession(pb.GetSessionRequest(session_id=sid), **args)
        if method == "ListSessions":
            return OK, stub.ListSessions(pb.ListSessionsRequest(), **args)
        if method == "DeleteSession":
            return OK, stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid), **args)
        if method == "Append":
            msgs = iter([pb.AppendRequest(session_id=sid, offset=0, text=b"alpha beta gamma")])
            return OK, list(stub.Append(msgs, **args))
        if method == "Score":
            return OK, stub.Score(pb.ScoreRequest(session_id=sid, text=b"alpha beta"), **args)
        if method == "Generate":
            req = pb.GenerateRequest(
                session_id=sid, prompt=b"alpha", sampling=dpb.SamplingParams(max_new_tokens=2)
            )
            return OK, list(stub.Generate(req, **args))
    except grpc.RpcError as err:
        return err.code(), err.details()
    raise AssertionError(f"no invocation for {method}")


def test_every_public_method_has_a_row_in_the_authorization_table():
    methods = set(pb.DESCRIPTOR.services_by_name["Gateway"].methods_by_name)
    assert methods == set(AUTHZ), f"methods without a row: {methods - set(AUTHZ)}"


@pytest.mark.parametrize("method", sorted(AUTHZ))
def test_authorization_table(stack, method):
    stub = pb_grpc.GatewayStub(get_channel(stack.gateway.address()))
    owner, other = (("x-api-key", "key-a"),), (("x-api-key", "key-b"),)
    for who, metadata, expected in zip(
        ("owner", "other tenant", "no key"), (owner, other, ()), AUTHZ[method], strict=True
    ):
        sid = stack.client("key-a").create_session().session_id
        stack.client("key-a").append(sid, "some text in memory")
        code, reply = _invoke(stub, method, sid, metadata)
        assert code == expected, f"{method} as {who}: {code} {reply}"
        if who == "other tenant" and method == "ListSessions":
            assert sid not in [s.session_id for s in reply.sessions]
        if who != "owner":  # the owner's session is untouched by refused calls
            assert stack.client("key-a").get_session(sid).text_bytes == len("some text in memory")


def test_wrong_key_and_bearer_header(stack):
    stub = pb_grpc.GatewayStub(get_channel(stack.gateway.address()))
    with pytest.raises(grpc.RpcError) as err:
        stub.ListSessions(pb.ListSessionsRequest(), timeout=5, metadata=(("x-api-key", "nope"),))
    assert err.value.code() == DENIED
    reply = stub.ListSessions(
        pb.ListSessionsRequest(), timeout=5, metadata=(("authorization", "Bearer key-b"),)
    )
    assert list(reply.sessions) == []


def test_foreign_and_missing_sessions_look_identical(stack):
    a, b = stack.client("key-a"), stack.client("key-b")
    sid = a.create_session().session_id
    stub = pb_grpc.GatewayStub(get_channel(stack.gateway.address()))
    md = (("x-api-key", "key-b"),)
    for method in ("GetSession", "Score", "Generate", "Append", "DeleteSession"):
        foreign = _invoke(stub, method, sid, md)
        missing = _invoke(stub, method, "s" + "0" * 24, md)
        assert foreign[0] == missing[0] == MISSING
        assert foreign[1].replace(sid, "X") == missing[1].replace("s" + "0" * 24, "X")
    assert b.list_sessions() == []


class Retrievals:
    """What the decoder's memory ports handed to the chunk loop (ids and K/V records of every search
    result, after merging the call's own chunks) and the rows the ports appended themselves.

    Recorded on `SessionPort`, the last step before the records become attention K/V, so a leak from
    ret-mem, from the routing, or from the port's merge would all show up here."""

    def __init__(self, monkeypatch) -> None:
        self.results: list = []
        self.appended: dict[int, bytes] = {}
        note, append = SessionPort._note, SessionPort.append

        def recording_note(port, result):  # every search result, prefetched or not, after the merge
            self.results.append(result)
            return note(port, result)

        def recording_append(port, ids, embeddings, records, lengths):
            self.appended.update((int(i), bytes(r)) for i, r in zip(ids, records, strict=True))
            return append(port, ids, embeddings, records, lengths)

        monkeypatch.setattr(SessionPort, "_note", recording_note)
        monkeypatch.setattr(SessionPort, "append", recording_append)

    def clear(self) -> None:
        self.results.clear()
        self.appended.clear()

    def pairs(self) -> list[tuple[int, bytes]]:
        """(chunk id, K/V record) of every retrieved row, padding left out."""
        return [
            (int(i), bytes(rec))
            for res in self.results
            for row_ids, row_rec in zip(res.ids, res.records, strict=True)
            for i, rec in zip(row_ids, row_rec, strict=True)
            if i >= 0
        ]


def _own_rows(stack, session_id: str) -> dict[int, bytes]:
    """The session's rows as ret-mem exports them: chunk id -> K/V record bytes."""
    _, state = stack.retmem.shard.export_session(session_id)
    return {int(i): bytes(r) for i, r in zip(state["ids"], state["records"], strict=True)}


def _not_own(stack, caller_sid: str, seen: Retrievals) -> int:
    """Retrieved rows that are not the caller's: compared by (id, record bytes) with the export of the
    session the caller named (and the rows the call appended from its own text), never by id alone:
    chunk ids restart at 0 in every session, so another session's chunk can carry an id in range."""
    own = _own_rows(stack, caller_sid) | seen.appended
    return sum(own.get(i) != rec for i, rec in seen.pairs())


def _two_tenants(stack):
    a, b = stack.client("key-a"), stack.client("key-b")
    sa, sb = a.create_session().session_id, b.create_session().session_id
    a.append(sa, "alpha beta gamma " * 8)
    b.append(sb, "delta epsilon zeta " * 8)
    rows_a, rows_b = _own_rows(stack, sa), _own_rows(stack, sb)
    # The check can tell them apart: ids overlap (both start at 0), record bytes never do.
    assert set(rows_a) & set(rows_b) and not set(rows_a.values()) & set(rows_b.values())
    return (a, sa), (b, sb)


def test_no_chunk_of_another_session_is_ever_retrieved(stack, monkeypatch):
    """Sessions of two tenants with disjoint texts; every record retrieved for a call is one the
    caller's own session holds, at the id it holds it (score and generate)."""
    tenants = _two_tenants(stack)
    seen = Retrievals(monkeypatch)
    for (client, sid), how in itertools.product(tenants, ("score", "generate")):
        seen.clear()
        if how == "score":
            report = client.score(sid, "alpha beta delta epsilon " * 4).memory
        else:
            report = list(client.generate(sid, "alpha delta epsilon beta", max_new_tokens=6))[-1].memory
        assert report.memory_used and seen.pairs(), how  # not vacuous: this call retrieved rows
        assert _not_own(stack, sid, seen) == 0, how
    with pytest.raises(Exception, match="not found"):
        stack.client("key-b").get_session(tenants[0][1])


def test_the_isolation_check_catches_a_leaked_record_with_an_id_in_range(stack, monkeypatch):
    """The check above is not vacuous: ret-mem answering tenant a's searches with tenant b's rows (ids
    in a's range, so an id check passes) is caught, through the whole serving path."""
    (a, sa), (_, sb) = _two_tenants(stack)
    memory = stack.decoder.engine.memory
    search = memory.search
    monkeypatch.setattr(
        memory, "search", lambda sid, *args, **kw: search(sb if sid == sa else sid, *args, **kw)
    )
    seen = Retrievals(monkeypatch)
    a.score(sa, "alpha beta delta epsilon " * 4)
    own_ids = set(_own_rows(stack, sa)) | set(seen.appended)
    assert seen.pairs() and all(i in own_ids for i, _ in seen.pairs())  # every id is in range
    assert _not_own(stack, sa, seen) > 0


@pytest.mark.parametrize(
    "text, code",
    [
        (b"", grpc.StatusCode.INVALID_ARGUMENT),
        (b"\xff\xfe not utf-8", grpc.StatusCode.INVALID_ARGUMENT),
        (b"caf\xc3", grpc.StatusCode.INVALID_ARGUMENT),  # ends inside a character
        (b"x" * (5 << 20), grpc.StatusCode.RESOURCE_EXHAUSTED),  # over the gateway's 4 MiB text limit
    ],
)
def test_bad_text_gets_a_clear_status_and_changes_nothing(stack, text, code):
    client = stack.client()
    sid = client.create_session().session_id
    client.append(sid, "committed text")
    before = client.get_session(sid)
    stub = pb_grpc.GatewayStub(get_channel(stack.gateway.address()))
    md = (("x-api-key", "key-a"),)
    for call in (
        lambda: stub.Score(pb.ScoreRequest(session_id=sid, text=text), timeout=20, metadata=md),
        lambda: list(stub.Generate(pb.GenerateRequest(session_id=sid, prompt=text), timeout=20, metadata=md)),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == code, err.value.details()
    if len(text) < (4 << 20):  # Append's own limit is larger; huge appends are tested below
        first = (
            [pb.AppendRequest(session_id=sid, offset=before.text_bytes, text=b"fine text ")] if text else []
        )
        pieces = iter(
            [*first, pb.AppendRequest(session_id=sid, offset=before.text_bytes + len(first) * 10, text=text)]
        )
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Append(pieces, timeout=20, metadata=md))
        assert err.value.code() in (code, grpc.StatusCode.INVALID_ARGUMENT), err.value.details()
    after = client.get_session(sid)
    assert (after.text_bytes, after.tokens, after.chunks) == (before.text_bytes, before.tokens, before.chunks)
    assert client.score(sid, "still serving").scored_tokens > 0


def test_bad_parameters_and_unknown_session(stack):
    client = stack.client()
    sid = client.create_session().session_id
    client.append(sid, "alpha beta gamma")
    stub = pb_grpc.GatewayStub(get_channel(stack.gateway.address()))
    md = (("x-api-key", "key-a"),)
    for sampling, field in (
        (dpb.SamplingParams(temperature=-1), "temperature"),
        (dpb.SamplingParams(top_p=1.5), "top_p"),
        (dpb.SamplingParams(max_new_tokens=100000), "max_new_tokens"),
        (dpb.SamplingParams(temperature=float("nan")), "temperature"),  # NaN passes a `< 0` check
        (dpb.SamplingParams(temperature=float("inf")), "temperature"),
        (dpb.SamplingParams(top_p=float("nan")), "top_p"),
        (dpb.SamplingParams(top_k=-1), "top_k"),
        (dpb.SamplingParams(max_new_tokens=-1), "max_new_tokens"),
    ):
        req = pb.GenerateRequest(session_id=sid, prompt=b"alpha", sampling=sampling)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(req, timeout=20, metadata=md))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.Score(pb.ScoreRequest(session_id=sid, text=b"x", memory_mode=42), timeout=20, metadata=md)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_quotas_answer_resource_exhausted(tmp_path):
    stack = start_stack(tmp_path, quotas=Quotas(max_sessions=2, max_tenant_text_bytes=100))
    try:
        client = stack.client()
        sid = client.create_session().session_id
        client.create_session()
        with pytest.raises(Exception, match="at most 2 sessions"):
            client.create_session()
        with pytest.raises(Exception, match="at most 100 bytes"):
            client.append(sid, "x " * 60)
        assert client.get_session(sid).text_bytes == 0
        huge = iter([pb.AppendRequest(session_id=sid, offset=0, text=b"y" * (33 << 20))])
        stub = pb_grpc.GatewayStub(get_channel(stack.gateway.address()))
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Append(huge, timeout=30, metadata=(("x-api-key", "key-a"),)))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        stack.stop()


def test_a_tiny_temperature_decodes_like_greedy(stack):
    """1e-45 used to turn every logit into -inf (NaN probabilities, INTERNAL); it is greedy decoding."""
    client = stack.client()
    sid = client.create_session().session_id
    client.append(sid, "alpha beta gamma delta " * 4)
    greedy = [t.token_id for t in client.generate(sid, "alpha beta", max_new_tokens=6)]
    for temperature in (1e-45, 1e-30, 1e-6):
        tiny = client.generate(sid, "alpha beta", max_new_tokens=6, temperature=temperature, seed=5)
        assert [t.token_id for t in tiny] == greedy


# Bytes that are no request message: a corrupt wire format, and a string field that is not UTF-8.
JUNK = b"\x07\xff\xff\xff"
BAD_UTF8 = b"\x0a\x02\xff\xfe"  # field 1 (session_id) = b"\xff\xfe"
BAD_UTF8_REF = b"\x0a\x04" + BAD_UTF8  # decoder: field 1 (session) = SessionRef(session_id=b"\xff\xfe")


def test_undecodable_requests_are_invalid_argument_and_the_servers_keep_serving(stack):
    client = stack.client()
    sid = client.create_session().session_id
    client.append(sid, "alpha beta gamma")
    md = (("x-api-key", "key-a"),)
    gateway, decoder = "/memlong.gateway.v1.Gateway/", "/memlong.decoder.v1.Decoder/"
    cases = [  # (address, method, kind, payloads); no serializers: the bytes go out as they are
        (stack.gateway.address(), gateway + "GetSession", "unary_unary", (JUNK, BAD_UTF8)),
        (stack.gateway.address(), gateway + "Score", "unary_unary", (JUNK, BAD_UTF8)),
        (stack.gateway.address(), gateway + "Generate", "unary_stream", (JUNK, BAD_UTF8)),
        (stack.gateway.address(), gateway + "Append", "stream_stream", (JUNK, BAD_UTF8)),
        (stack.decoder.address(), decoder + "Score", "unary_unary", (JUNK, BAD_UTF8_REF)),
        (stack.decoder.address(), decoder + "Generate", "unary_stream", (JUNK, BAD_UTF8_REF)),
        (stack.decoder.address(), decoder + "Ingest", "stream_stream", (JUNK, BAD_UTF8_REF)),
    ]
    for address, method, kind, payloads in cases:
        with grpc.insecure_channel(address) as channel:
            call = getattr(channel, kind)(method)
            for payload in payloads:
                with pytest.raises(grpc.RpcError) as err:
                    if kind == "unary_unary":
                        call(payload, timeout=20, metadata=md)
                    elif kind == "unary_stream":
                        list(call(payload, timeout=20, metadata=md))
                    else:
                        list(call(iter([payload]), timeout=20, metadata=md))
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, err.value.details())
                assert err.value.details().startswith("request: ")
    with grpc.insecure_channel(stack.gateway.address()) as channel:  # authentication still answers first
        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary(gateway + "GetSession")(JUNK, timeout=20)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert client.get_session(sid).text_bytes == len("alpha beta gamma")
    assert client.score(sid, "alpha beta").scored_tokens > 0


def test_error_messages_echo_at_most_a_bounded_part_of_an_id(stack):
    client = stack.client()
    stub = pb_grpc.GatewayStub(get_channel(stack.gateway.address()))
    md = (("x-api-key", "key-a"),)
    long_id = "s" + "0123456789" * 12 + "abcdefg"  # 128 characters: a well-formed id nobody has
    for sid in (long_id, "x" * (64 << 10)):  # the 64 KiB one would make a status too large to receive
        with pytest.raises(grpc.RpcError) as err:
            stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=20, metadata=md)
        assert err.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
        assert len(err.value.details()) < 200 and sid not in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.GetSession(pb.GetSessionRequest(session_id=long_id), timeout=20, metadata=md)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and long_id[:64] in err.value.details()
    assert client.list_sessions() == []


def test_busy_answers_do_not_tell_a_tenant_how_many_calls_are_in_flight(tmp_path):
    from memlong.errors import ResourceExhausted

    stack = start_stack(tmp_path, max_inflight=1)
    try:
        engine = stack.decoder.engine
        with engine._admitted():  # the one slot is taken (by any tenant's call)
            with pytest.raises(ResourceExhausted) as err:
                with engine._admitted():
                    pass
        assert "busy" in str(err.value) and "retry" in str(err.value)
        assert "in flight" not in str(err.value) and not any(c.isdigit() for c in str(err.value))
        table = stack.gateway.table
        with table.admitted("tenant-b", global_limit=1):
            with pytest.raises(ResourceExhausted) as err:
                with table.admitted("tenant-a", global_limit=1):
                    pass
        assert "busy" in str(err.value) and not any(c.isdigit() for c in str(err.value))
    finally:
        stack.stop()
