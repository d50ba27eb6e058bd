"""SIGKILL during appends, a torn log tail, restart determinism, deletes that stay."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import numpy as np
import pytest

from memlong.errors import MemLongError, NotFound
from memlong.memory import SessionMemory
from memlong.services.retmem import wal
from memlong.services.retmem.client import RetMemClient
from memlong.services.retmem.shard import Shard

from .servers import ServerProcess, chunks, deterministic_chunk, scan, shard_holding, tiny_spec


def try_append(client: RetMemClient, spec, sid: str, seq: int, acked: dict, attempted: dict) -> bool:
    """Append chunk `seq` (`deterministic_chunk`) to session `sid`, noted in `attempted[sid]` before and
    in `acked[sid]` once acknowledged. False when the call failed (the server went away)."""
    attempted[sid].add(seq)
    try:
        client.append(sid, *deterministic_chunk(spec, seq))
    except MemLongError:
        return False
    acked[sid].add(seq)
    return True


def append_until_killed(
    client: RetMemClient, spec, sessions: list[str], per_session: int, kill_after: int, kill
) -> dict[str, tuple[set[int], set[int]]]:
    """One thread per session appends single chunks; `kill` fires once `kill_after` acks are in.

    Returns, per session, (acknowledged ids, attempted ids)."""
    acked = {s: set() for s in sessions}
    attempted = {s: set() for s in sessions}
    lock, fired = threading.Lock(), threading.Event()
    total = [0]

    def run(sid: str) -> None:
        for seq in range(per_session):
            if not try_append(client, spec, sid, seq, acked, attempted):
                return
            with lock:
                total[0] += 1
                if total[0] >= kill_after and not fired.is_set():
                    fired.set()
                    kill()

    threads = [threading.Thread(target=run, args=(s,)) for s in sessions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return {s: (acked[s], attempted[s]) for s in sessions}


@pytest.mark.parametrize("fsync", ["grouped", "per-append"])
def test_sigkill_during_appends_loses_no_acknowledged_chunk(tmp_path: Path, fsync: str) -> None:
    seed = {"grouped": 1234, "per-append": 99}[fsync]
    kill_after = int(np.random.default_rng(seed).integers(50, 950))
    spec = tiny_spec(memory_size=1000)
    sessions = [f"a0-{i}" for i in range(4)]
    proc = ServerProcess(tmp_path, fsync=fsync)
    proc.wait_serving()
    client = RetMemClient({"shard0": proc.target}, timeout_s=10)
    for s in sessions:
        client.create_session(s, spec)
    outcome = append_until_killed(
        client, spec, sessions, 250, kill_after, lambda: proc.proc.send_signal(signal.SIGKILL)
    )
    assert proc.proc.wait(timeout=30) == -signal.SIGKILL

    proc = ServerProcess(tmp_path, fsync=fsync)
    proc.wait_serving()
    client = RetMemClient({"shard0": proc.target}, timeout_s=10)
    lost = phantoms = dups = mismatches = acked_total = 0
    for s in sessions:
        acked, attempted = outcome[s]
        found = scan(client, s, spec)
        stored = set(found["ids"].tolist())
        acked_total += len(acked)
        lost += len(acked - stored)
        phantoms += len(stored - attempted)
        dups += found["duplicates"]
        mismatches += found["mismatches"]
    proc.kill(signal.SIGTERM)
    assert acked_total >= kill_after
    assert (lost, phantoms, dups, mismatches) == (0, 0, 0, 0)


def _write_records(directory: Path, n: int) -> None:
    log = wal.WriteAheadLog(directory, "per-append")
    log.open(1)
    for i in range(n):
        log.append({"op": "x", "i": i, "blob": bytes([i % 256]) * 100})
    log.close()


def _read(directory: Path) -> tuple[list[int], wal.ReplayReport]:
    report = wal.ReplayReport()
    return [rec["i"] for _, rec in wal.replay(directory, report)], report


@pytest.mark.parametrize(
    "damage",
    [
        "truncate_payload",
        "truncate_header",
        "flip_payload",
        "flip_header",
        "flip_crc",
        "garbage_tail",
        "zeros_tail",
    ],
)
def test_a_torn_log_tail_is_dropped_and_counted(tmp_path: Path, damage: str) -> None:
    _write_records(tmp_path, 20)
    (seg,) = tmp_path.glob("*.wal")
    data = bytearray(seg.read_bytes())
    last = len(data) - (
        wal.HEADER.size + len(__import__("msgpack").packb({"op": "x", "i": 19, "blob": b"\x13" * 100}))
    )
    expected = list(range(19))
    if damage == "truncate_payload":
        data = data[:-7]
    elif damage == "truncate_header":
        data = data[: last + 5]
    elif damage == "flip_payload":
        data[-3] ^= 0x10
    elif damage == "flip_header":
        data[last] ^= 0x01  # length field
    elif damage == "flip_crc":
        data[last + 5] ^= 0x80
    elif damage == "garbage_tail":
        data += np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes()
        expected = list(range(20))
    elif damage == "zeros_tail":
        data += bytes(4096)
        expected = list(range(20))
    seg.write_bytes(bytes(data))
    got, report = _read(tmp_path)
    assert got == expected
    assert report.dropped_records == 1 and report.dropped_bytes > 0
    again, report2 = _read(tmp_path)  # the tail was truncated away: a second open is clean
    assert again == expected and report2.dropped_records == 0


def test_a_shard_recovers_the_appends_before_a_torn_log_tail(tmp_path: Path) -> None:
    spec, rng = tiny_spec(), np.random.default_rng(3)
    shard = Shard("s", tmp_path, fsync="per-append")
    shard.open()
    shard.create_session("a", spec)
    for i in range(10):
        shard.append("a", *chunks(rng, spec, i, 1))
    shard.close()
    (seg,) = (tmp_path / "s" / "wal").glob("*.wal")
    seg.write_bytes(seg.read_bytes()[:-10])
    again = Shard("s", tmp_path)
    report = again.open()
    assert report.wal_dropped_records == 1
    assert again.bank.get("a").ids().tolist() == list(range(9))
    again.append("a", *chunks(rng, spec, 9, 1))  # the log continues cleanly after the cut
    again.close()
    third = Shard("s", tmp_path)
    third.open()
    assert third.bank.get("a").ids().tolist() == list(range(10))
    third.close()


@pytest.mark.parametrize("via", ["log", "snapshot"])
def test_the_same_top_k_before_and_after_recovery(tmp_path: Path, via: str) -> None:
    spec, rng = tiny_spec(memory_size=200), np.random.default_rng(4)
    shard = Shard("s", tmp_path)
    shard.open()
    shard.create_session("a", spec)
    queries = rng.standard_normal((1000, spec.dim)).astype(np.float32)
    for i in range(0, 400, 10):  # 400 chunks through a 200-chunk memory: evictions inside appends
        shard.append("a", *chunks(rng, spec, i, 10))
        shard.search("a", queries[i : i + 50], 8)  # counters steer which chunks get evicted
    shard.pin("a", shard.bank.get("a").ids()[:3])
    shard.evict("a", 20)
    before = shard.search("a", queries, 8)
    if via == "snapshot":
        shard.checkpoint()
    shard.close()
    again = Shard("s", tmp_path)
    again.open()
    after = again.search("a", queries, 8)
    assert np.array_equal(before.ids, after.ids)
    assert np.array_equal(before.scores, after.scores)
    assert np.array_equal(before.records, after.records)
    again.close()


def test_a_deleted_session_stays_deleted_across_a_restart(tmp_path: Path) -> None:
    spec, rng = tiny_spec(), np.random.default_rng(5)
    shard = shard_holding(tmp_path, spec, rng, 5, "gone", checkpoint=True)  # a snapshot before the delete
    shard.create_session("kept", spec)
    shard.delete_session("gone")
    shard.close()
    again = Shard("s", tmp_path)
    again.open()
    assert again.sessions() == ["kept"]
    with pytest.raises(NotFound):
        again.search("gone", np.zeros((1, spec.dim), np.float32), 1)
    again.close()


def _workload(shard: Shard, spec, rng: np.random.Generator, queries: np.ndarray) -> None:
    """Appends through a small memory (evictions inside appends), searches, pins, explicit evictions."""
    for i in range(0, 300, 10):
        shard.append("a", *chunks(rng, spec, i, 10))
        shard.search("a", queries[i : i + 20], 4)
        if i == 150:
            shard.pin("a", shard.bank.get("a").ids()[:2])
            shard.evict("a", 7)


def _same_memory(a, b) -> None:
    sa, sb = a.export_state(), b.export_state()
    assert sa.keys() == sb.keys()
    for key in sa:
        np.testing.assert_array_equal(sa[key], sb[key], err_msg=key)


def test_log_replay_removes_evictions_in_place_and_keeps_counters(tmp_path: Path, monkeypatch) -> None:
    """Replay applies logged evictions with SessionMemory.remove (no whole-session rebuild per
    eviction) and credits logged retrievals: the recovered memory equals the live one, counters
    and statistics included."""
    spec, rng = tiny_spec(memory_size=40), np.random.default_rng(6)
    queries = rng.standard_normal((320, spec.dim)).astype(np.float32)
    shard = Shard("s", tmp_path)
    shard.open()
    shard.create_session("a", spec)
    _workload(shard, spec, rng, queries)
    shard.append("a", *chunks(rng, spec, 300, 1))  # a mutation after the last search carries its hits
    live = shard.bank.get("a")
    assert live.stats()["eviction_rounds"] > 10
    shard.close()  # like a crash: no checkpoint, only the log
    rebuilds = []
    real = SessionMemory.from_state.__func__
    monkeypatch.setattr(
        SessionMemory,
        "from_state",
        classmethod(lambda cls, *a, **k: rebuilds.append(1) or real(cls, *a, **k)),
    )
    again = Shard("s", tmp_path)
    report = again.open()
    assert report.errors == [] and rebuilds == []
    _same_memory(live, again.bank.get("a"))
    again.close()


def test_searches_alone_log_a_credit_record_every_n_hits(tmp_path: Path) -> None:
    spec, rng = tiny_spec(), np.random.default_rng(7)
    shard = Shard("s", tmp_path, counter_flush_hits=40)
    shard.open()
    shard.create_session("a", spec)
    shard.append("a", *chunks(rng, spec, 0, 20))
    lsn = shard._wal.last_lsn
    for _ in range(25):  # 4 hits per search: a credit record at 40, 80 hits; 20 hits left pending
        shard.search("a", rng.standard_normal((1, spec.dim)).astype(np.float32), 4)
    assert shard._wal.last_lsn == lsn + 2
    counters = shard.bank.get("a").counters(np.arange(20))
    shard.close()  # like a crash: the pending 20 hits are lost, the logged 80 survive
    again = Shard("s", tmp_path)
    again.open()
    recovered = again.bank.get("a").counters(np.arange(20))
    assert recovered.sum() == 80 and counters.sum() == 100 and (recovered <= counters).all()
    assert again.bank.get("a").stats()["searches"] == 20
    again.close()


def test_checkpoint_snapshots_pending_hits_once(tmp_path: Path) -> None:
    """A checkpoint after searches only (a graceful stop) keeps the counters; they are not credited
    again by the next record."""
    spec, rng = tiny_spec(), np.random.default_rng(8)
    shard = shard_holding(tmp_path, spec, rng, 20, checkpoint=True)
    for _ in range(5):
        shard.search("a", rng.standard_normal((2, spec.dim)).astype(np.float32), 4)
    assert shard.checkpoint() == 1  # not dirty, but it has unlogged hits
    shard.append("a", *chunks(rng, spec, 20, 1))
    live = shard.bank.get("a")
    shard.close()
    again = Shard("s", tmp_path)
    again.open()
    _same_memory(live, again.bank.get("a"))
    again.close()


def test_evicting_an_id_range_removes_exactly_it_and_survives_restart(tmp_path: Path) -> None:
    spec, rng = tiny_spec(memory_size=200), np.random.default_rng(6)
    shard = Shard("s", tmp_path)
    shard.open()
    shard.create_session("a", spec)
    shard.append("a", *chunks(rng, spec, 0, 30))
    shard.pin("a", np.array([12, 25], np.int64))  # a pinned chunk inside the range goes too
    gone = shard.evict("a", id_range=(10, 20))
    assert gone.tolist() == list(range(10, 20))
    assert shard.evict("a", id_range=(10, 20)).tolist() == []  # again: nothing left there, no error
    kept = shard.bank.get("a").ids()
    assert kept.tolist() == list(range(10)) + list(range(20, 30))
    shard.close()
    again = Shard("s", tmp_path)
    again.open()  # replayed from the log
    assert again.bank.get("a").ids().tolist() == kept.tolist()
    again.evict("a", id_range=(0, 30))  # pinned 25 included
    assert len(again.bank.get("a")) == 0
    again.close()


def _log_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in (root / "s" / "wal").glob("*.wal"))


def test_a_shard_that_keeps_crashing_still_compacts_its_log(tmp_path: Path) -> None:
    """Each run writes less than the checkpoint threshold and dies without a checkpoint; what the
    next recovery replays stays bounded by the threshold, not by uptime: at most two checkpoint
    intervals (the log back to the previous checkpoint is kept for a damaged snapshot) plus a run."""
    spec, rng = tiny_spec(memory_size=10_000), np.random.default_rng(21)
    threshold = 16 << 10
    per_run = 40  # ~4.4 KiB of log per run: about a quarter of the threshold
    first = 0
    replayed = []
    expected = np.empty(0, np.int64)
    for run in range(12):
        replayed.append(_log_bytes(tmp_path) if run else 0)  # what this recovery replays
        shard = Shard("s", tmp_path, checkpoint_bytes=threshold)
        report = shard.open()
        assert np.array_equal(shard.bank.get("a").ids() if run else expected, expected)
        if run == 0:
            shard.create_session("a", spec)
        shard.append("a", *chunks(rng, spec, first, per_run))
        first += per_run
        expected = np.arange(first)
        shard._checkpointing.acquire()  # wait for a checkpoint the open or appends started
        shard._checkpointing.release()
        shard.close()  # like a kill: no checkpoint on the way out
        assert report.errors == []
    run_bytes = max(np.diff(replayed[:4]))  # one run's log, measured before any compaction
    assert max(replayed) <= 2 * threshold + run_bytes, replayed


def test_a_retired_range_survives_a_restart(tmp_path: Path) -> None:
    spec, rng = tiny_spec(), np.random.default_rng(22)
    shard = shard_holding(tmp_path, spec, rng, 6)
    assert shard.evict("a", id_range=(3, 12)).tolist() == [3, 4, 5]
    shard.close()  # no checkpoint: the log alone carries the retirement
    again = Shard("s", tmp_path)
    again.open()
    assert again.append("a", *chunks(rng, spec, 7, 2)) == 0  # a late writer's chunks stay out
    assert again.bank.get("a").ids().tolist() == [0, 1, 2]
    assert again.append("a", *chunks(rng, spec, 12, 1)) == 1
    again.close()


@pytest.mark.parametrize("transport", ["shm", "grpc"])
def test_a_restarted_server_is_reached_at_once_not_after_the_channels_reconnect_backoff(
    tmp_path: Path, transport: str
) -> None:
    """The server comes back in another process while this client's channel to it is in reconnect
    backoff (it failed to connect a few times): the first calls after it is serving succeed, reading and
    appending, instead of failing fast until the backoff runs out."""
    spec, data = tiny_spec(), tmp_path / "data"
    first = ServerProcess(data)
    first.wait_serving()
    client = RetMemClient({"shard0": first.target}, timeout_s=20, shared_memory=transport == "shm")
    client.create_session("s", spec)
    client.append("s", *deterministic_chunk(spec, 0))
    first.kill(signal.SIGKILL)
    for _ in range(6):  # each failed connect lengthens the channel's backoff (to about 1 s)
        with pytest.raises(MemLongError, match="failed to connect"):
            client.info("s")
    again = ServerProcess(data, "shard0", "grouped", "--port", str(first.port))
    try:
        again.wait_serving()
        assert client.info("s").num_chunks == 1
        client.append("s", *deterministic_chunk(spec, 1))
        found = client.search("s", np.asarray(deterministic_chunk(spec, 1)[1], np.float32), 1)
        assert found.ids.tolist() == [[1]]
    finally:
        again.kill(signal.SIGTERM)
