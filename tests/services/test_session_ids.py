"""One session-id rule (memlong.ids), enforced by the gateway, the decoder, ret-mem and both clients."""

from __future__ import annotations

import grpc
import pytest

from memlong.api.decoder.v1 import decoder_pb2 as dpb
from memlong.api.decoder.v1 import decoder_pb2_grpc as dpb_grpc
from memlong.api.gateway.v1 import gateway_pb2 as pb
from memlong.api.gateway.v1 import gateway_pb2_grpc as pb_grpc
from memlong.api.retmem.v1 import retmem_pb2 as rpb
from memlong.api.retmem.v1 import retmem_pb2_grpc as rpb_grpc
from memlong.errors import InvalidArgument
from memlong.rpc.channel import get_channel
from memlong.services.retmem.client import RetMemClient

BAD_IDS = ["..", "-rf", ".hidden", ":x", "a/b", "a" * 129, ""]


@pytest.mark.parametrize("sid", BAD_IDS)
def test_every_service_refuses_a_malformed_session_id_as_invalid_argument(stack, sid):
    md = (("x-api-key", "key-a"),)
    gateway = pb_grpc.GatewayStub(get_channel(stack.gateway.address()))
    decoder = dpb_grpc.DecoderStub(get_channel(stack.decoder.address()))
    retmem = rpb_grpc.RetMemStub(get_channel(stack.retmem.address))
    ref = dpb.SessionRef(session_id=sid)
    calls = {
        "gateway.GetSession": lambda: gateway.GetSession(
            pb.GetSessionRequest(session_id=sid), timeout=20, metadata=md
        ),
        "gateway.Score": lambda: gateway.Score(
            pb.ScoreRequest(session_id=sid, text=b"alpha"), timeout=20, metadata=md
        ),
        "decoder.Score": lambda: decoder.Score(dpb.ScoreRequest(session=ref, text=b"alpha"), timeout=20),
        "retmem.GetSession": lambda: retmem.GetSession(rpb.GetSessionRequest(session_id=sid), timeout=20),
    }
    if sid == "":  # an empty id on the gateway's Score means "no session: the text alone" (issue 16)
        del calls["gateway.Score"]
    for name, call in calls.items():
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err.value.details())
        assert "session_id" in err.value.details(), name


@pytest.mark.parametrize("sid", BAD_IDS)
def test_clients_refuse_a_malformed_session_id_before_sending(stack, sid):
    client = stack.client()
    with pytest.raises(InvalidArgument):
        client.get_session(sid)
    with pytest.raises(InvalidArgument):
        client.score(sid, "alpha")
    with pytest.raises(InvalidArgument):
        list(client.generate(sid, "alpha"))
    with pytest.raises(InvalidArgument):
        RetMemClient({"shard0": stack.retmem.address}).info(sid)
