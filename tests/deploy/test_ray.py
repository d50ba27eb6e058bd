"""The Ray Serve application on a local Ray instance: a plain gRPC client serves a session end to end
through gateway -> decoder -> ret-mem shards, and a shard's data survives its replica being killed
and replaced by Serve; `memlong ray up / status / down` drive it. About 50 s here (Ray's start-up is
most of it), so it is in the default run; marked `ray`: `pytest -m ray tests/deploy/test_ray.py` runs it
alone, `-m 'not ray'` leaves it out."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
import openai  # noqa: E402
from ray import serve  # noqa: E402

from memlong.client import Client  # noqa: E402
from memlong.deploy.ray_app import cli as ray_cli  # noqa: E402
from memlong.deploy.ray_app.cli import NODE_STARTUP_TIMEOUT, PROXY_READY_ENV  # noqa: E402
from memlong.errors import Unavailable  # noqa: E402
from memlong.rpc.channel import close_channels  # noqa: E402
from memlong.services.httpapi.config import DEFAULT_MODEL_ID  # noqa: E402
from memlong.services.retmem.routing import Ring  # noqa: E402
from tests.services.retmem.servers import wait_serving  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
KEY = "ray-test-key"
BOOK = " ".join(["alpha beta gamma delta epsilon"] * 8)


def free_base_port(n: int) -> int:
    """A port p such that p .. p+n-1 are free now (probed, not reserved), below the kernel's ephemeral
    range: Ray's own processes take ephemeral ports all the time, and one of them took a probed port
    there before the gateway bound it (a CI run: "Address already in use")."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(50):
        base = rng.randrange(max(1024, low - 12000), low - n)
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
    os.environ.setdefault(*PROXY_READY_ENV)  # inherited by the raylet, so by the Serve controller
    for attempt in (1, 2):
        try:
            ray.init(
                num_cpus=4,
                include_dashboard=False,
                log_to_driver=False,
                runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}},
            )
            break
        except Exception as err:  # Ray waits a fixed 30 s for its raylet: a busy 2-core CI can miss it
            if attempt == 2 or NODE_STARTUP_TIMEOUT not in str(err):
                raise
            ray.shutdown()
    # Loopback only: the GCS and every node (so every raylet and worker) on 127.0.0.1.
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    yield
    serve.shutdown()
    ray.shutdown()


def test_ray_up_starts_its_head_once_more_after_rays_node_startup_timeout(monkeypatch) -> None:
    """`ray start --head` that times out waiting for its raylet is stopped and started once more; a
    second timeout, or any other failure, is an error that carries what Ray said."""
    calls: list[str] = []

    def fake_run(cmd, **_kw):
        calls.append(cmd[1])
        said = outcomes.pop(0) if cmd[1] == "start" else ""
        return subprocess.CompletedProcess(cmd, 0 if said == "ok" else 1, stdout="", stderr=said)

    monkeypatch.setattr(ray_cli.subprocess, "run", fake_run)
    outcomes = [f"Exception: The current node {NODE_STARTUP_TIMEOUT}.", "ok"]
    ray_cli._start_head(2)
    assert calls == ["start", "stop", "start"]
    calls.clear()
    outcomes = [NODE_STARTUP_TIMEOUT, NODE_STARTUP_TIMEOUT]
    with pytest.raises(RuntimeError, match=NODE_STARTUP_TIMEOUT):
        ray_cli._start_head(2)
    assert calls == ["start", "stop", "start"]
    calls.clear()
    outcomes = ["port 6379 already in use"]
    with pytest.raises(RuntimeError, match="already in use"):
        ray_cli._start_head(2)
    assert calls == ["start"]


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


def memlong_ray(*args: str, timeout_s: float = 600) -> str:
    """`memlong ray ...` in a subprocess (the CLI module, as `memlong.cli` registers it)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-m", "memlong.deploy.ray_app.cli", "ray", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.ray
def test_ray_up_serves_a_session_end_to_end_and_shard_data_survives_replica_restart(
    ray_instance, tmp_path: Path
) -> None:
    address = ray.get_runtime_context().gcs_address
    base = free_base_port(5)
    out = memlong_ray(
        "up",
        f"--address={address}",
        f"--data-dir={tmp_path}",
        "--shards=2",
        f"--gateway-port={base}",
        f"--decoder-port={base + 1}",
        f"--retmem-port={base + 2}",
        f"--http-port={base + 4}",
        "--components=tests.deploy.ray_components:tiny",
    )
    settings = dict(line.split("=", 1) for line in out.splitlines() if line.startswith("MEMLONG_"))
    assert settings["MEMLONG_GATEWAY"] == f"127.0.0.1:{base}"
    ring = {f"shard{i}": f"127.0.0.1:{base + 2 + i}" for i in range(2)}
    status = json.loads(memlong_ray("status", f"--address={address}"))
    assert status["gateway"] == settings["MEMLONG_GATEWAY"]
    assert [s["address"] for s in status["shards"]] == list(ring.values())

    # A plain gRPC client, end to end: gateway -> decoder -> ret-mem shards.
    client = Client(settings["MEMLONG_GATEWAY"], settings["MEMLONG_API_KEY"], timeout_s=60)
    session = client.create_session("ray")
    client.append(session.session_id, BOOK)
    before = client.get_session(session.session_id)
    assert before.chunks > 0 and before.tokens == len(BOOK.encode())
    score = client.score(session.session_id, "alpha beta gamma")
    owner = Ring(list(ring)).owner(session.session_id)
    assert before.shard == owner  # session-stable routing: the ring owner holds it

    # The same session over HTTP: Serve's proxy -> the gateway deployment's ingress -> its gRPC API.
    assert settings["MEMLONG_HTTP"] == status["http"] == f"http://127.0.0.1:{base + 4}"
    with urllib.request.urlopen(settings["MEMLONG_HTTP"] + "/readyz", timeout=30) as r:
        assert r.status == 200
    http = openai.OpenAI(
        base_url=settings["MEMLONG_HTTP"] + "/v1", api_key=settings["MEMLONG_API_KEY"], max_retries=0
    )
    assert http.get(f"/sessions/{session.session_id}", cast_to=object)["tokens"] == before.tokens
    scored = http.completions.create(
        model=DEFAULT_MODEL_ID,
        prompt="alpha beta gamma",
        max_tokens=0,
        echo=True,
        extra_body={"session_id": session.session_id},
    )
    assert scored.model_extra["memlong"]["perplexity"] == pytest.approx(score.perplexity, rel=1e-5)
    streamed = http.completions.create(model=DEFAULT_MODEL_ID, prompt="alpha", max_tokens=3, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed)

    # Kill the owning shard's replica; Serve replaces it and it recovers from its own data.
    actor = replica_actor(f"retmem-{owner}")
    ray.kill(actor, no_restart=True)
    with pytest.raises(ray.exceptions.RayActorError):  # returns once the old replica is gone
        ray.get(actor.__ray_ready__.remote(), timeout=60)
    wait_serving(ring[owner], timeout_s=300)  # its replacement has recovered
    after = eventually(lambda: client.get_session(session.session_id))
    assert (after.chunks, after.tokens) == (before.chunks, before.tokens)
    again = client.score(session.session_id, "alpha beta gamma")
    assert again.perplexity == pytest.approx(score.perplexity, rel=1e-5)

    memlong_ray("down", f"--address={address}", "--keep-ray")
    with pytest.raises(Unavailable):
        Client(settings["MEMLONG_GATEWAY"], settings["MEMLONG_API_KEY"], timeout_s=5).list_sessions()
    close_channels()
