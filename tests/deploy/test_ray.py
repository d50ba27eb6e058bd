"""The Ray Serve application on a local Ray instance: a plain gRPC client serves a session end to end
through gateway -> decoder -> ret-mem shards, and a shard's data survives its replica being killed
and replaced by Serve. Marked `ray` (Ray's start-up alone takes tens of seconds on a small machine):
`pytest -m ray tests/deploy/test_ray.py`."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from memlong.client import Client  # noqa: E402
from memlong.errors import Unavailable  # noqa: E402
from services.common.channel import close_channels  # noqa: E402
from services.ray_app.app import deploy  # noqa: E402
from services.ray_app.config import RayAppConfig  # noqa: E402
from services.retmem.routing import Ring  # noqa: E402
from tests.retmem.conftest import wait_serving  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
KEY = "ray-test-key"
BOOK = " ".join(["alpha beta gamma delta epsilon"] * 8)


def free_base_port(n: int) -> int:
    """A port p such that p .. p+n-1 are free now (probed, not reserved)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65535:
            continue
        try:
            socks = []
            for p in range(base, base + n):
                sk = socket.socket()
                socks.append(sk)
                sk.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for sk in socks:
                sk.close()
    raise RuntimeError("no free port range")


@pytest.fixture(scope="module")
def ray_instance() -> Iterator[None]:
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}},
    )
    yield
    serve.shutdown()
    ray.shutdown()


def replica_actor(deployment: str):
    """The live Serve replica actor of `deployment`."""
    entries = ray.util.list_named_actors(all_namespaces=True)
    for entry in entries:
        name = entry["name"]
        # SERVE_REPLICA::<app>#<deployment>#<replica id> (older Ray: <app>:<deployment>#<id>)
        if name.startswith("SERVE_REPLICA") and (f"#{deployment}#" in name or f":{deployment}#" in name):
            return ray.get_actor(name, namespace=entry["namespace"])
    raise LookupError(f"{deployment} not in {[e['name'] for e in entries]}")


def eventually(call, timeout_s: float = 15.0):
    """`call()`, repeated while it answers UNAVAILABLE ("retry later") and time remains."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except Unavailable:
            if time.monotonic() > deadline:
                raise


@pytest.mark.ray
def test_ray_app_serves_a_session_and_shard_data_survives_replica_restart(
    ray_instance, tmp_path: Path
) -> None:
    base = free_base_port(4)
    config = RayAppConfig(
        data_dir=tmp_path,
        gateway_port=base,
        decoder_port=base + 1,
        retmem_port=base + 2,
        shards=2,
        decoders=1,
        api_keys=((KEY, "tenant-r"),),
        components="tests.deploy.ray_components:tiny",
    )
    deploy(config)
    client = Client(config.gateway_address, KEY, timeout_s=60)
    session = client.create_session("ray")
    client.append(session.session_id, BOOK)
    before = client.get_session(session.session_id)
    assert before.chunks > 0 and before.tokens == len(BOOK.encode())
    score = client.score(session.session_id, "alpha beta gamma")
    # Session-stable routing: the session lives on its ring owner.
    ring = Ring(list(config.ring))
    owner = ring.owner(session.session_id)
    assert before.shard == owner

    # Kill the owning shard's replica; Serve replaces it and it recovers from its own data.
    actor = replica_actor(f"retmem-{owner}")
    ray.kill(actor, no_restart=True)
    with pytest.raises(ray.exceptions.RayActorError):  # returns once the old replica is gone
        ray.get(actor.__ray_ready__.remote(), timeout=60)
    wait_serving(config.ring[owner], timeout_s=180)  # its replacement has recovered
    after = eventually(lambda: client.get_session(session.session_id))
    assert (after.chunks, after.tokens) == (before.chunks, before.tokens)
    again = client.score(session.session_id, "alpha beta gamma")
    assert again.perplexity == pytest.approx(score.perplexity, rel=1e-5)
    client.delete_session(session.session_id)
    serve.delete(config.app_name)
    close_channels()
    assert not os.environ.get("RAY_ADDRESS")
