"""The embedded default (ret-mem + decoder + gateway in one process) with a tiny model, and the CLI verbs."""

from __future__ import annotations

from memlong.cli import main
from memlong.client import Client
from memlong.deploy.stack import EmbeddedStack, local_api_key
from tests.factories import RecordingRetriever
from tests.services.stack import ByteTokenizer, tiny_model


def test_embedded_stack_serves_and_stops(tmp_path, capsys):
    model = tiny_model()
    stack = EmbeddedStack.start(
        tmp_path, model.config, components=(model, ByteTokenizer(), RecordingRetriever())
    )
    try:
        assert local_api_key(tmp_path) == stack.api_key  # the key file is reused, not regenerated
        client = Client(stack.gateway_address, stack.api_key, timeout_s=30)
        sid = client.create_session("x").session_id
        client.append(sid, "alpha beta gamma delta " * 5)
        assert client.score(sid, "alpha beta gamma").memory.memory_used
        book = tmp_path / "book.txt"
        book.write_text("epsilon zeta eta theta " * 3)
        conn = ["--gateway", stack.gateway_address, "--data-dir", str(tmp_path)]
        assert main(["ingest", str(book), "--session", sid, "--quiet", *conn]) == 0
        assert main(["score", "--text", "alpha beta", "--session", sid, *conn]) == 0
        assert main(["ask", "alpha", "--session", sid, "--max-new-tokens", "3", *conn]) == 0
        assert main(["session", "list", *conn]) == 0
        out = capsys.readouterr().out
        assert "perplexity" in out and sid in out
        assert main(["session", "delete", sid, *conn]) == 0
    finally:
        stack.stop(0)


def test_memlong_up_says_how_to_authenticate(tmp_path, capsys, monkeypatch):
    """`memlong up` prints where the local key is and which metadata carries it; both work."""
    import json
    import re

    from memlong.deploy import cli as deploy_cli

    model = tiny_model()
    real_start = EmbeddedStack.start
    started = []

    def start(data_dir, memlong, **kw):
        started.append(
            real_start(data_dir, model.config, components=(model, ByteTokenizer(), RecordingRetriever()))
        )
        return started[-1]

    monkeypatch.setattr(EmbeddedStack, "start", start)
    printed = {}

    def instead_of_waiting():  # the stack is up and its banner printed: use it as a user would
        out = capsys.readouterr().out
        key_file = re.search(r"KEY is in (\S+)", out).group(1)
        header = re.search(r"metadata '([\w-]+): KEY'", out).group(1)
        key = next(iter(json.loads(open(key_file).read())["keys"]))
        printed.update(out=out, header=header, key=key)
        client = Client(started[0].gateway_address, key, timeout_s=30)
        printed["session"] = client.create_session("via-banner").session_id

    class NoSignal:  # `memlong up` waits on this for SIGTERM / SIGINT
        wait = staticmethod(instead_of_waiting)

    monkeypatch.setattr(deploy_cli, "stop_signal", NoSignal)
    assert main(["up", "--data-dir", str(tmp_path), "--port", "0"]) == 0
    assert printed["header"] == "x-api-key" and printed["session"]
    assert printed["key"] == local_api_key(tmp_path)


def test_a_key_file_without_the_local_tenant_is_a_clear_error(tmp_path, capsys, monkeypatch):
    """Named file, what it needs, and before the model loads or any server starts."""
    import json

    import pytest

    from memlong.errors import InvalidArgument
    from memlong.services.decoder.server import DecoderServer

    key_file = tmp_path / "api_keys.json"
    key_file.write_text(json.dumps({"keys": {"k-1": "team-a"}}))
    with pytest.raises(InvalidArgument, match="no key for the 'local' tenant") as err:
        local_api_key(tmp_path)
    assert str(key_file) in str(err.value)

    def no_model(*args, **kw):
        raise AssertionError("the model must not load before the key file is checked")

    monkeypatch.setattr(DecoderServer, "load", no_model)
    assert main(["up", "--data-dir", str(tmp_path), "--port", "0"]) == 2  # not a bare StopIteration
    message = capsys.readouterr().err
    assert str(key_file) in message and '"local"' in message
    assert main(["session", "list", "--data-dir", str(tmp_path), "--gateway", "127.0.0.1:1"]) == 2
    assert str(key_file) in capsys.readouterr().err


def test_the_embedded_internal_services_refuse_callers_without_the_installation_secret(tmp_path):
    import grpc
    import pytest
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from memlong.api.decoder.v1 import decoder_pb2, decoder_pb2_grpc
    from memlong.api.retmem.v1 import retmem_pb2, retmem_pb2_grpc
    from memlong.rpc.internal import HEADER

    model = tiny_model()
    stack = EmbeddedStack.start(
        tmp_path, model.config, components=(model, ByteTokenizer(), RecordingRetriever())
    )
    try:
        client = Client(stack.gateway_address, stack.api_key, timeout_s=30)
        sid = client.create_session("mine").session_id
        client.append(sid, "alpha beta gamma delta " * 5)
        assert client.score(sid, "alpha beta").memory.memory_used  # the installation's own calls pass

        where = stack.describe()
        retmem = retmem_pb2_grpc.RetMemStub(grpc.insecure_channel(where["retmem"]))
        decoder = decoder_pb2_grpc.DecoderStub(grpc.insecure_channel(where["decoder"]))
        stranger = [
            lambda md: retmem.GetSession(
                retmem_pb2.GetSessionRequest(session_id=sid), timeout=10, metadata=md
            ),
            lambda md: decoder.Describe(decoder_pb2.DescribeRequest(), timeout=10, metadata=md),
        ]
        for call in stranger:  # another local process, without (or with a wrong) secret
            for md in ((), ((HEADER, "guess"),)):
                with pytest.raises(grpc.RpcError) as err:
                    call(md)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        token = (tmp_path / "internal.key").read_text().strip()
        assert (
            retmem.GetSession(
                retmem_pb2.GetSessionRequest(session_id=sid), timeout=10, metadata=((HEADER, token),)
            ).num_chunks
            > 0
        )
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(where["retmem"]))
        assert (
            health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
            == health_pb2.HealthCheckResponse.SERVING
        )

        for path in (
            tmp_path / "internal.key",
            tmp_path / "gateway" / "sessions.json",
            tmp_path / "api_keys.json",
        ):
            assert path.stat().st_mode & 0o077 == 0, path  # nothing for group or others
        assert tmp_path.stat().st_mode & 0o077 == 0
    finally:
        stack.stop(0)


def test_processes_starting_at_once_agree_on_the_installation_secret(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from memlong.rpc.internal import installation_token

    with ThreadPoolExecutor(8) as pool:
        tokens = set(pool.map(lambda _: installation_token(tmp_path), range(32)))
    assert len(tokens) == 1 and tokens == {(tmp_path / "internal.key").read_text().strip()}
    assert [p.name for p in tmp_path.iterdir()] == ["internal.key"]  # no temporary files left
