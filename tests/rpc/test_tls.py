"""TLS and mTLS on a real ret-mem server configured through the process default (the way every
service gets it), certificates made at test time.

TLS on -> a plaintext client is refused; a client trusting the CA works.
mTLS on -> no client certificate, or one from another CA, is refused; the right one works.
The plaintext health-only port answers probes in both modes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memlong import errors
from memlong.rpc import tls as tls_mod
from memlong.rpc.channel import ChannelOptions, close_channels, get_channel
from memlong.services.common.server import ServerWithHealthPort
from memlong.services.retmem.client import RetMemClient
from memlong.services.retmem.server import SERVICE_NAME, RetMemConfig, RetMemServer
from memlong.services.retmem.store import SessionSpec

from .certs import Pki

SPEC = SessionSpec(dim=8, kv_shape=(2, 1, 4, 2), kv_dtype="bfloat16", memory_size=16)
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(params=[False, True], ids=["tls", "mtls"])
def secured(request, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Pki, RetMemServer]]:
    """A ret-mem server whose process default is TLS (or mTLS), with a plaintext health port."""
    pki = Pki.create(tmp_path / "pki", client_auth=request.param)
    monkeypatch.setenv("MEMLONG_HEALTH_ADDRESS", "127.0.0.1:0")
    previous = tls_mod.configure(pki.server)
    server = RetMemServer(RetMemConfig(data_dir=tmp_path / "data"))
    try:
        server.start()
    finally:
        tls_mod.configure(previous)
    yield pki, server
    server.stop(grace_s=1)
    close_channels([server.address()])


def health(target: str, tls: tls_mod.TlsConfig, timeout_s: float = 5) -> int:
    channel = get_channel(target, ChannelOptions(tls=tls))
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout_s).status


@contextlib.contextmanager
def process_default(tls: tls_mod.TlsConfig) -> Iterator[None]:
    """Run the block as a process whose TLS settings are `tls` (what MEMLONG_TLS_* would give)."""
    previous = tls_mod.configure(tls)
    try:
        yield
    finally:
        tls_mod.configure(previous)


def client_for(server: RetMemServer) -> RetMemClient:
    return RetMemClient({"shard0": server.address()}, timeout_s=5)


def roundtrip(client: RetMemClient, session: str) -> None:
    rng = np.random.default_rng(0)
    client.create_session(session, SPEC)
    ids = np.arange(4, dtype=np.int64)
    emb = rng.standard_normal((4, SPEC.dim)).astype(np.float32)
    rec = rng.integers(0, 256, (4, SPEC.record_bytes), dtype=np.uint8)
    client.append(session, ids, emb, rec, np.full(4, 2, np.int32))
    assert client.search(session, emb[:1], 2).ids[0].tolist()[-1] in ids


def refused(target: str, tls: tls_mod.TlsConfig) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        health(target, tls, timeout_s=3)
    return info.value.code()


def test_tls_refuses_a_plaintext_client(secured: tuple[Pki, RetMemServer]) -> None:
    pki, server = secured
    target = server.address()
    assert refused(target, tls_mod.PLAINTEXT) == grpc.StatusCode.UNAVAILABLE
    # The server keeps serving TLS clients, and the health-only port answers plaintext probes.
    assert health(target, pki.client) == SERVING
    assert isinstance(server.server, ServerWithHealthPort)
    assert health(f"127.0.0.1:{server.server.health_port}", tls_mod.PLAINTEXT) == SERVING
    with process_default(pki.client):
        roundtrip(client_for(server), "f1")


def test_tls_client_refuses_a_server_it_does_not_trust(
    secured: tuple[Pki, RetMemServer], tmp_path: Path
) -> None:
    _, server = secured
    stranger = Pki.create(tmp_path / "stranger", client_auth=False)
    assert refused(server.address(), stranger.client) == grpc.StatusCode.UNAVAILABLE


def test_mtls_refuses_missing_or_foreign_client_certificate(secured: tuple[Pki, RetMemServer]) -> None:
    pki, server = secured
    target = server.address()
    if not pki.server.client_auth:
        # TLS without client auth: anonymous clients are fine (the refusals apply to mTLS only).
        assert health(target, pki.anonymous) == SERVING
        return
    assert refused(target, pki.anonymous) == grpc.StatusCode.UNAVAILABLE
    assert refused(target, pki.foreign) == grpc.StatusCode.UNAVAILABLE
    with process_default(pki.anonymous), pytest.raises(errors.Unavailable):
        client_for(server).create_session("f2-anon", SPEC)
    # The right certificate works, and the refusals changed nothing.
    with process_default(pki.client):
        client = client_for(server)
        roundtrip(client, "f2")
        with pytest.raises(errors.NotFound):
            client.info("f2-anon")


def test_tls_settings_from_environment(tmp_path: Path) -> None:
    pki = Pki.create(tmp_path, client_auth=True)
    env = {
        "MEMLONG_TLS_CERT": str(pki.server.cert),
        "MEMLONG_TLS_KEY": str(pki.server.key),
        "MEMLONG_TLS_CA": str(pki.server.ca),
        "MEMLONG_TLS_CLIENT_AUTH": "require",
    }
    assert tls_mod.TlsConfig.from_env(env) == pki.server
    assert tls_mod.TlsConfig.from_env({}) == tls_mod.PLAINTEXT and not tls_mod.PLAINTEXT.enabled
    with pytest.raises(errors.InvalidArgument, match="unknown"):
        tls_mod.TlsConfig.from_env({**env, "MEMLONG_TLS_CERTT": "x"})
    with pytest.raises(errors.InvalidArgument, match="client_auth"):
        tls_mod.TlsConfig.from_env({"MEMLONG_TLS_CLIENT_AUTH": "require"})
    with pytest.raises(errors.InvalidArgument, match="no such file"):
        tls_mod.TlsConfig(cert=tmp_path / "missing.crt", key=pki.server.key)


def test_internal_tls_settings_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset: the internal policy inherits the public one; MEMLONG_INTERNAL_TLS_* set it; =off plaintext."""
    pki = Pki.create(tmp_path, client_auth=True)
    public = {"MEMLONG_TLS_CERT": str(pki.server.cert), "MEMLONG_TLS_KEY": str(pki.server.key)}
    internal = {
        "MEMLONG_INTERNAL_TLS_CERT": str(pki.server.cert),
        "MEMLONG_INTERNAL_TLS_KEY": str(pki.server.key),
        "MEMLONG_INTERNAL_TLS_CA": str(pki.server.ca),
        "MEMLONG_INTERNAL_TLS_CLIENT_AUTH": "require",
    }
    from_env = tls_mod.TlsConfig.internal_from_env
    assert from_env({}) is None and from_env(public) is None  # inherit
    assert from_env({**public, **internal}) == pki.server
    assert from_env({**public, "MEMLONG_INTERNAL_TLS": "off"}) == tls_mod.PLAINTEXT
    with pytest.raises(errors.InvalidArgument, match="MEMLONG_INTERNAL_TLS=off"):
        from_env({**internal, "MEMLONG_INTERNAL_TLS": "off"})
    with pytest.raises(errors.InvalidArgument, match="off or unset"):
        from_env({"MEMLONG_INTERNAL_TLS": "on"})
    with pytest.raises(errors.InvalidArgument, match="unknown"):
        from_env({"MEMLONG_INTERNAL_TLS_CERTT": "x"})

    # The process defaults: internal follows the public policy until it is set on its own.
    for name in [*public, *internal, "MEMLONG_INTERNAL_TLS"]:
        monkeypatch.delenv(name, raising=False)
    previous = tls_mod.configure(pki.anonymous), tls_mod.configure_internal(None)
    try:
        assert tls_mod.configured_internal_tls() is None and tls_mod.internal_tls() == pki.anonymous
        tls_mod.configure_internal(pki.client)
        assert tls_mod.internal_tls() == pki.client and tls_mod.process_tls() == pki.anonymous
        tls_mod.configure_internal(None)
        monkeypatch.setenv("MEMLONG_INTERNAL_TLS", "off")
        assert tls_mod.internal_tls() == tls_mod.PLAINTEXT and tls_mod.process_tls() == pki.anonymous
    finally:
        tls_mod.configure(previous[0])
        tls_mod.configure_internal(previous[1])


def test_internal_services_use_the_internal_policy(tmp_path: Path) -> None:
    """A ret-mem server and its clients take the process's internal policy, not the public one."""
    internal = Pki.create(tmp_path / "internal", client_auth=True)
    previous = tls_mod.configure(tls_mod.PLAINTEXT), tls_mod.configure_internal(internal.server)
    try:
        server = RetMemServer(RetMemConfig(data_dir=tmp_path / "data", internal_token="t"))
        server.start()
    finally:
        tls_mod.configure(previous[0])
        tls_mod.configure_internal(previous[1])
    try:
        target = server.address()
        assert refused(target, tls_mod.PLAINTEXT) == grpc.StatusCode.UNAVAILABLE
        assert refused(target, internal.anonymous) == grpc.StatusCode.UNAVAILABLE
        previous = tls_mod.configure(tls_mod.PLAINTEXT), tls_mod.configure_internal(internal.client)
        try:
            roundtrip(RetMemClient({"shard0": target}, timeout_s=5, internal_token="t"), "internal")
        finally:
            tls_mod.configure(previous[0])
            tls_mod.configure_internal(previous[1])
    finally:
        server.stop(grace_s=1)
        close_channels([server.address()])


def test_embedded_stack_public_tls_without_client_certs_internal_mtls(tmp_path: Path) -> None:
    """`memlong up` with mTLS required inside: a TLS client without a certificate uses the gateway
    (through gateway -> decoder -> ret-mem over mTLS), and no internal port takes a caller without the
    internal CA's client certificate, even one that holds the installation secret."""
    from memlong.api.decoder.v1 import decoder_pb2, decoder_pb2_grpc
    from memlong.api.retmem.v1 import retmem_pb2, retmem_pb2_grpc
    from memlong.client import Client
    from memlong.deploy.stack import EmbeddedStack
    from tests.factories import RecordingRetriever
    from tests.services.stack import ByteTokenizer, tiny_model

    public = Pki.create(tmp_path / "public", client_auth=False)
    internal = Pki.create(tmp_path / "internal", client_auth=True)
    model = tiny_model()
    stack = EmbeddedStack.start(
        tmp_path / "data",
        model.config,
        components=(model, ByteTokenizer(), RecordingRetriever()),
        tls=tls_mod.TlsConfig(cert=public.server.cert, key=public.server.key),  # no client auth
        internal_tls=internal.server,
    )
    where = stack.describe()
    try:
        with process_default(public.anonymous):  # trusts the public CA, presents no certificate
            client = Client(stack.gateway_address, stack.api_key, timeout_s=30)
            sid = client.create_session("tls").session_id
            client.append(sid, "alpha beta gamma delta " * 5)
            assert client.score(sid, "alpha beta").memory.memory_used

        token = (tmp_path / "data" / "internal.key").read_text().strip()

        def calls(tls: tls_mod.TlsConfig) -> list:
            retmem = retmem_pb2_grpc.RetMemStub(
                get_channel(where["retmem"], ChannelOptions(tls=tls, internal_token=token))
            )
            decoder = decoder_pb2_grpc.DecoderStub(
                get_channel(where["decoder"], ChannelOptions(tls=tls, internal_token=token))
            )
            return [
                lambda: retmem.GetSession(retmem_pb2.GetSessionRequest(session_id=sid), timeout=5),
                lambda: decoder.Describe(decoder_pb2.DescribeRequest(), timeout=5),
            ]

        strangers = (tls_mod.PLAINTEXT, internal.anonymous, internal.foreign, public.client)
        for stranger in strangers:
            for call in calls(stranger):
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE, stranger
        retmem_call, decoder_call = calls(internal.client)  # the internal CA's client certificate
        assert retmem_call().num_chunks > 0 and decoder_call() is not None
        # The public port does not take the internal CA's identity for its own (a separate policy).
        assert refused(stack.gateway_address, internal.client) == grpc.StatusCode.UNAVAILABLE
    finally:
        stack.stop(0)
        close_channels(list(where.values()))


def test_embedded_stack_default_internal_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset, the embedded stack's internal policy is plaintext on loopback and the public one elsewhere."""
    from memlong.deploy.stack import embedded_internal_tls

    for name in ("MEMLONG_INTERNAL_TLS", "MEMLONG_INTERNAL_TLS_CERT"):
        monkeypatch.delenv(name, raising=False)
    public = tls_mod.TlsConfig(server_name="example.org")
    previous = tls_mod.configure_internal(None)
    try:
        for host in ("127.0.0.1", "localhost", "::1"):
            assert embedded_internal_tls(host, public) == tls_mod.PLAINTEXT
        assert embedded_internal_tls("10.0.0.7", public) == public
        tls_mod.configure_internal(public)  # set for the process: used on loopback too
        assert embedded_internal_tls("127.0.0.1", tls_mod.PLAINTEXT) == public
    finally:
        tls_mod.configure_internal(previous)
