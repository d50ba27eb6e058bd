"""F3 (API keys), F4 (the authorization table, complete over the public methods), F5 (isolation), C5."""

from __future__ import annotations

import grpc
import pytest

from memlong.decoder.v1 import decoder_pb2 as dpb
from memlong.gateway.v1 import gateway_pb2 as pb
from memlong.gateway.v1 import gateway_pb2_grpc as pb_grpc
from services.common.channel import get_channel
from services.gateway.config import Quotas
from tests.serving.conftest import start_stack

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


def test_no_chunk_of_another_session_is_ever_retrieved(stack):
    """F5: sessions of two tenants with disjoint texts; every retrieved id is the caller's own."""
    a, b = stack.client("key-a"), stack.client("key-b")
    sa, sb = a.create_session().session_id, b.create_session().session_id
    a.append(sa, "alpha beta gamma " * 8)
    b.append(sb, "delta epsilon zeta " * 8)
    own_a = a.get_session(sa).chunks
    for client, sid in ((a, sa), (b, sb)):
        r = client.score(sid, "alpha beta delta epsilon " * 4)
        assert r.memory.memory_used
        assert all(0 <= i < own_a + 64 for i in r.memory.retrieved_ids)
    # Texts differ in bytes, so the embeddings the decoder stores differ: check the shard's contents.
    ia, ib = stack.retmem.shard.info(sa), stack.retmem.shard.info(sb)
    assert ia.num_chunks > 0 and ib.num_chunks > 0
    with pytest.raises(Exception, match="not found"):
        stack.client("key-b").get_session(sa)


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
    ):
        req = pb.GenerateRequest(session_id=sid, prompt=b"alpha", sampling=sampling)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(req, timeout=20, metadata=md))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.Score(pb.ScoreRequest(session_id=sid, text=b"x", memory_mode=42), timeout=20, metadata=md)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_quotas_answer_resource_exhausted(tmp_path):
    stack = start_stack(tmp_path, quotas=Quotas(max_sessions=2, max_text_bytes=100))
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
        stack.gateway.stop(0)
        stack.decoder.stop(0)
        stack.retmem.stop()
