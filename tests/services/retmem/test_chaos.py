"""Kill loop: SIGKILL the server every few seconds while 20 sessions append; after the final
restart: 0 acknowledged chunks lost, 0 phantoms, 0 duplicates, 0 checksum mismatches.
Run with `pytest -m chaos tests/services/retmem/test_chaos.py`; MEMLONG_CHAOS_ROUNDS sets the rounds (default 8),
and MEMLONG_CHAOS_REPORT=path.json writes the counts and each restart's recovery time (start to
SERVING) there (measured, never asserted)."""

from __future__ import annotations

import json
import os
import platform
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from memlong.services.retmem.client import RetMemClient

from .servers import ServerProcess, tiny_spec
from .test_durability import scan, try_append


@pytest.mark.chaos
def test_a_kill_loop_loses_no_acknowledged_chunk_and_adds_none(tmp_path: Path) -> None:
    """SIGKILL at random moments of a live workload, then restart: every acknowledged chunk is there, and
    no phantom, duplicate or corrupt one."""
    rng = np.random.default_rng(77)
    spec = tiny_spec(memory_size=100_000)
    sessions = [f"chaos-{i}" for i in range(20)]
    acked = {s: set() for s in sessions}
    attempted = {s: set() for s in sessions}
    next_seq = dict.fromkeys(sessions, 0)
    created = False
    rounds = int(os.environ.get("MEMLONG_CHAOS_ROUNDS", "8"))
    recovery_s = []
    for _round in range(rounds):
        t0 = time.monotonic()
        proc = ServerProcess(tmp_path)
        proc.wait_serving()
        recovery_s.append(time.monotonic() - t0)
        client = RetMemClient({"shard0": proc.target}, timeout_s=5)
        if not created:
            for s in sessions:
                client.create_session(s, spec)
            created = True
        stop = threading.Event()

        def run(sid: str, client: RetMemClient, stop: threading.Event) -> None:
            while not stop.is_set():
                seq = next_seq[sid]
                if not try_append(client, spec, sid, seq, acked, attempted):
                    return
                next_seq[sid] = seq + 1

        threads = [threading.Thread(target=run, args=(s, client, stop)) for s in sessions]
        for t in threads:
            t.start()
        stop.wait(float(rng.uniform(1.0, 4.0)))  # the kill point: a random moment of a live workload
        proc.kill(signal.SIGKILL)
        stop.set()
        for t in threads:
            t.join(60)
    t0 = time.monotonic()
    proc = ServerProcess(tmp_path)
    proc.wait_serving()
    recovery_s.append(time.monotonic() - t0)
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
    if os.environ.get("MEMLONG_CHAOS_REPORT"):
        wal = sum(p.stat().st_size for p in tmp_path.rglob("*.wal"))
        report = {
            "rounds": rounds,
            "sessions": len(sessions),
            "acknowledged": sum(len(a) for a in acked.values()),
            "lost": int(totals[0]),
            "phantom": int(totals[1]),
            "duplicated": int(totals[2]),
            "checksum_mismatches": int(totals[3]),
            "recovery_s": [round(x, 3) for x in recovery_s],
            "longest_recovery_s": round(max(recovery_s), 3),
            "wal_bytes_at_end": wal,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        }
        Path(os.environ["MEMLONG_CHAOS_REPORT"]).write_text(json.dumps(report, indent=1) + "\n")
    assert sum(len(a) for a in acked.values()) > 0
    assert totals.tolist() == [0, 0, 0, 0]
