"""A1: kill loop. SIGKILL the server every few seconds while 20 sessions append; after the final
restart: 0 acknowledged chunks lost, 0 phantoms, 0 duplicates, 0 checksum mismatches.
Run with `pytest -m chaos tests/retmem/test_chaos.py`."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import numpy as np
import pytest

from memlong.errors import MemLongError
from services.retmem.client import RetMemClient

from .conftest import ServerProcess, deterministic_chunk, tiny_spec
from .test_durability import scan


@pytest.mark.chaos
def test_a1_kill_loop(tmp_path: Path) -> None:
    rng = np.random.default_rng(77)
    spec = tiny_spec(memory_size=100_000)
    sessions = [f"chaos-{i}" for i in range(20)]
    acked = {s: set() for s in sessions}
    attempted = {s: set() for s in sessions}
    next_seq = dict.fromkeys(sessions, 0)
    created = False
    for _round in range(8):
        proc = ServerProcess(tmp_path)
        proc.wait_serving()
        client = RetMemClient({"shard0": proc.target}, timeout_s=5)
        if not created:
            for s in sessions:
                client.create_session(s, spec)
            created = True
        stop = threading.Event()

        def run(sid: str, client: RetMemClient, stop: threading.Event) -> None:
            while not stop.is_set():
                seq = next_seq[sid]
                attempted[sid].add(seq)
                try:
                    client.append(sid, *deterministic_chunk(spec, seq))
                except MemLongError:
                    return
                acked[sid].add(seq)
                next_seq[sid] = seq + 1

        threads = [threading.Thread(target=run, args=(s, client, stop)) for s in sessions]
        for t in threads:
            t.start()
        stop.wait(float(rng.uniform(1.0, 4.0)))  # the kill point: a random moment of a live workload
        proc.kill(signal.SIGKILL)
        stop.set()
        for t in threads:
            t.join(60)
    proc = ServerProcess(tmp_path)
    proc.wait_serving()
    client = RetMemClient({"shard0": proc.target}, timeout_s=30)
    totals = np.zeros(4, int)
    for s in sessions:
        found = scan(client, s, spec)
        stored = set(found["ids"].tolist())
        totals += [
            len(acked[s] - stored),
            len(stored - attempted[s]),
            found["duplicates"],
            found["mismatches"],
        ]
    proc.kill(signal.SIGTERM)
    assert sum(len(a) for a in acked.values()) > 0
    assert totals.tolist() == [0, 0, 0, 0]
