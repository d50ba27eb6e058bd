"""Multi-host ret-mem: shards in separate network namespaces (separate processes where namespaces
are not available), sessions placed by consistent hashing, one shard's loss confined to its own
sessions (clear UNAVAILABLE), and its sessions serving again after it returns with nothing lost.

The default run kills one shard once; `-m chaos` kills a random shard in each of several rounds.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from memlong.errors import MemLongError, Unavailable
from memlong.rpc.channel import close_channels
from memlong.services.retmem.client import RetMemClient
from memlong.services.retmem.routing import Ring
from tests.services.retmem.servers import deterministic_chunk, scan, tiny_spec, wait_serving

from .hosts import ShardCluster

SPEC = tiny_spec(memory_size=100_000)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ShardCluster]:
    c = ShardCluster(tmp_path, 3)
    try:
        c.start()
        for h in c.hosts:
            wait_serving(h.address)
        yield c
    finally:
        close_channels(list(c.shards.values()))
        c.destroy()


@dataclass
class Session:
    """One session's appends: ids acknowledged, ids attempted, errors, and ack times."""

    sid: str
    shard: str
    next_seq: int = 0
    acked: set[int] = field(default_factory=set)
    attempted: set[int] = field(default_factory=set)
    errors: Counter = field(default_factory=Counter)
    ack_times: list[float] = field(default_factory=list)


def append_loop(
    client: RetMemClient, s: Session, stop: threading.Event, progress: threading.Condition
) -> None:
    """Append chunk after chunk; on an error retry the same id (appends are idempotent). Every outcome is
    recorded under `progress` and announced on it, so the test waits on conditions, not on time."""
    while not stop.is_set():
        seq = s.next_seq
        s.attempted.add(seq)
        try:
            client.append(s.sid, *deterministic_chunk(SPEC, seq))
        except MemLongError as exc:
            with progress:
                s.errors[type(exc).__name__] += 1
                progress.notify_all()
            stop.wait(0.05)  # back off while the shard is away (workload pacing, not synchronisation)
            continue
        with progress:
            s.acked.add(seq)
            s.ack_times.append(time.monotonic())
            s.next_seq = seq + 1
            progress.notify_all()


def _until(progress: threading.Condition, condition, what: str, timeout_s: float = 120.0) -> None:
    """Wait until `condition()` holds, re-checked whenever an append loop reports; fail naming `what`
    after `timeout_s` (a bound against hangs: nothing is timed)."""
    with progress:
        assert progress.wait_for(condition, timeout_s), f"timed out waiting until {what}"


def _acks_since(sessions: list[Session], t: float) -> int:
    return sum(1 for s in sessions for a in s.ack_times if a > t)


def _errors(sessions: list[Session]) -> int:
    return sum(sum(s.errors.values()) for s in sessions)


def run(cluster: ShardCluster, rounds: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    client = RetMemClient(cluster.shards, timeout_s=5)
    ring = Ring(list(cluster.shards))
    sessions = [Session(f"mh-{i}", ring.owner(f"mh-{i}")) for i in range(24)]
    for s in sessions:
        client.create_session(s.sid, SPEC)
        assert client.info(s.sid).shard == s.shard  # placed by consistent hashing
    assert len({s.shard for s in sessions}) == 3

    stop, progress = threading.Event(), threading.Condition()
    threads = [threading.Thread(target=append_loop, args=(client, s, stop, progress)) for s in sessions]
    for t in threads:
        t.start()
    outages = []
    try:
        for _ in range(rounds):
            victim = cluster.hosts[int(rng.integers(len(cluster.hosts)))]
            mine = [s for s in sessions if s.shard == victim.name]
            others = [s for s in sessions if s.shard != victim.name]
            start = time.monotonic()  # a live workload: every session acknowledges a chunk first
            _until(
                progress, lambda t=start: all(_acks_since([s], t) for s in sessions), "all sessions append"
            )
            with progress:
                down, errors_before = time.monotonic(), _errors(mine)
            victim.kill(signal.SIGKILL)
            # The outage lasts until the victim's sessions have failed and the others went on.
            _until(progress, lambda m=mine, e=errors_before: _errors(m) > e, "the kill is seen")
            _until(
                progress,
                lambda o=others, t=down: _acks_since(o, t) >= 10,
                "other shards progress in the outage",
            )
            victim.start(cluster.ring)
            wait_serving(victim.address)  # health Watch stream until SERVING
            outages.append((victim.name, down, time.monotonic()))
        up = time.monotonic()
        _until(progress, lambda: all(_acks_since([s], up) for s in sessions), "every session appends again")
    finally:
        stop.set()
        for t in threads:
            t.join(60)

    victims = {name for name, _, _ in outages}
    for s in sessions:
        if s.shard not in victims:
            assert not s.errors, f"{s.sid} on healthy {s.shard} saw {dict(s.errors)}"
        else:
            # Loss is reported clearly (UNAVAILABLE), never as a wrong answer or another status.
            assert set(s.errors) <= {Unavailable.__name__}, (s.sid, dict(s.errors))
    for name, down, up in outages:
        others = [s for s in sessions if s.shard != name]
        during = sum(down < t < up for s in others for t in s.ack_times)
        assert during > 0, f"other shards made no progress while {name} was down"
        mine = [s for s in sessions if s.shard == name]
        assert sum(errs for s in mine for errs in s.errors.values()) > 0, "the kill was not observed"
    # Every session serves again after the last restart.
    for s in sessions:
        client.append(s.sid, *deterministic_chunk(SPEC, s.next_seq))
        s.acked.add(s.next_seq)
        s.attempted.add(s.next_seq)

    lost = phantoms = duplicates = mismatches = 0
    for s in sessions:
        found = scan(client, s.sid, SPEC)
        stored = set(found["ids"].tolist())
        lost += len(s.acked - stored)
        phantoms += len(stored - s.attempted)
        duplicates += found["duplicates"]
        mismatches += found["mismatches"]
    assert sum(len(s.acked) for s in sessions) > 100
    assert (lost, phantoms, duplicates, mismatches) == (0, 0, 0, 0)


def test_one_shard_lost_and_back_nothing_lost_others_unaffected(cluster: ShardCluster) -> None:
    run(cluster, rounds=1, seed=6)


@pytest.mark.chaos
def test_chaos_kill_random_shards_during_multi_shard_workload(cluster: ShardCluster) -> None:
    run(cluster, rounds=6, seed=66)
