"""K/V on disk: written once, read back checked, torn K/V cut like a torn log tail, unused files
deleted, K/V of the inline layout moved on recovery."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from memlong.errors import AlreadyExists, DataLoss, FailedPrecondition, InvalidArgument, ResourceExhausted
from memlong.memory import SessionMemory
from memlong.services.retmem.kvfiles import REF_BYTES
from memlong.services.retmem.shard import Shard
from memlong.services.retmem.store import SessionSpec

from .servers import chunks, open_shard, tiny_spec


def _files(root: Path, kind: str) -> list[Path]:
    return sorted((root / "s" / kind).glob("*"))


def _content(shard: Shard, sid: str) -> dict[str, np.ndarray]:
    _, state = shard.export_session(sid)
    return {k: state[k] for k in ("ids", "embeddings", "records", "lengths")}


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    for key in a:
        assert np.array_equal(a[key], b[key]), key


def _reopened_holds(root: Path, want: dict[str, np.ndarray], sid: str = "a") -> None:
    """The shard under `root`, opened again, holds `want` for session `sid`."""
    again = open_shard(root)
    try:
        _same(want, _content(again, sid))
    finally:
        again.close()


def _survives_restart(shard: Shard, root: Path, sid: str = "a") -> None:
    """Close `shard` (under `root`): opened again, it holds session `sid` as it was."""
    want = _content(shard, sid)
    shard.close()
    _reopened_holds(root, want, sid)


def test_kv_bytes_live_in_data_files_once_and_the_core_holds_references(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    spec = SessionSpec(dim=16, kv_shape=(3, 2, 2, 8, 4), kv_dtype="bfloat16", memory_size=100)  # 1.5 KiB
    shard = open_shard(tmp_path)
    shard.create_session("a", spec)
    ids, emb, rec, lengths = chunks(rng, spec, 0, 40)
    shard.append("a", ids, emb, rec, lengths)
    assert shard.bank.get("a").config.record_bytes == REF_BYTES  # what stays resident per chunk
    got = shard.search("a", emb[[3, 17]], 4)
    for row, want in enumerate((3, 17)):
        i = list(got.ids[row]).index(want)
        assert np.array_equal(got.records[row, i], rec[want])
    records, _ = shard.fetch("a", ids[5:9])
    assert np.array_equal(records, rec[5:9])
    kv_bytes = sum(p.stat().st_size for p in _files(tmp_path, "kv"))
    wal_bytes = sum(p.stat().st_size for p in _files(tmp_path, "wal"))
    assert kv_bytes == rec.nbytes  # each K/V byte once
    assert wal_bytes < rec.nbytes / 4  # the log carries references, not K/V
    shard.close()
    again = open_shard(tmp_path)
    assert np.array_equal(again.fetch("a", ids)[0], rec)
    again.close()


def test_a_replay_is_compared_with_the_stored_bytes(tmp_path: Path) -> None:
    spec, rng = tiny_spec(), np.random.default_rng(1)
    shard = open_shard(tmp_path)
    shard.create_session("a", spec)
    batch = chunks(rng, spec, 0, 5)
    assert shard.append("a", *batch) == 5
    before = sum(p.stat().st_size for p in _files(tmp_path, "kv"))
    assert shard.append("a", *batch) == 0  # the same bytes: a no-op, nothing written
    assert sum(p.stat().st_size for p in _files(tmp_path, "kv")) == before
    ids, emb, rec, lengths = batch
    other = rec.copy()
    other[2, 0] ^= 1
    with pytest.raises(AlreadyExists, match=r"\[2\]"):
        shard.append("a", ids, emb, other, lengths)
    assert np.array_equal(shard.fetch("a", ids)[0], rec)
    shard.close()


@pytest.mark.parametrize("on_disk", [True, False])
def test_an_append_checks_its_batch_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, on_disk: bool
) -> None:
    """The shard has the core plan the batch (every check) and stores that plan: the core's checks run
    once per append, whether the K/V go to data files first or stay in memory. The log gets exactly the
    evictions the plan named (a restart holds the same chunks)."""
    spec, rng = tiny_spec(memory_size=8), np.random.default_rng(3)
    shard = open_shard(tmp_path) if on_disk else Shard("s", None)
    if not on_disk:
        shard.open()
    shard.create_session("a", spec)
    checks = []
    real = SessionMemory._check_batch
    monkeypatch.setattr(
        SessionMemory, "_check_batch", lambda mem, *a, **k: checks.append(1) or real(mem, *a, **k)
    )
    assert shard.append("a", *chunks(rng, spec, 0, 6)) == 6
    assert len(checks) == 1
    assert shard.append("a", *chunks(rng, spec, 6, 4)) == 4  # evicts to make room
    assert len(checks) == 2
    if on_disk:
        _survives_restart(shard, tmp_path)
    else:
        shard.close()


def _refused_batch(case: str, rng: np.random.Generator, spec: SessionSpec, shard: Shard):
    """A batch the shard must refuse, holding new chunks (ids above every stored one) that an
    append would write to the data files, and the error it must raise."""
    ids, emb, rec, lengths = chunks(rng, spec, 20, 4)
    if case == "nan embedding":
        emb[3, 0] = np.nan
        return (ids, emb, rec, lengths), InvalidArgument, "embeddings: contains NaN"
    if case == "out-of-order id":  # 7 was never accepted: below the highest (15), so it came late
        ids[0] = 7
        return (ids, emb, rec, lengths), FailedPrecondition, r"chunk ids \[7\] .* increasing order"
    if case == "replay with other embedding":  # 15 is stored: same K/V and length, other embedding
        ids[0] = 15
        (rec[0],), (lengths[0],) = shard.fetch("a", ids[:1])
        return (ids, emb, rec, lengths), AlreadyExists, r"different content: \[15\]"
    if case == "lengths misaligned":
        return (ids, emb, rec, lengths[:3]), InvalidArgument, "lengths: batch has 3 rows but ids has 4"
    if case == "larger than memory":
        batch = chunks(rng, spec, 20, spec.memory_size + 1)
        return batch, ResourceExhausted, "exceeds memory_size"
    assert case == "memory full of pinned chunks"
    free = spec.memory_size - len(shard.bank.get("a"))
    shard.append("a", *chunks(rng, spec, 16, free))  # full, no eviction yet
    shard.pin("a", shard.bank.get("a").ids())
    ids, emb, rec, lengths = chunks(rng, spec, 16 + free, 4)
    return (ids, emb, rec, lengths), ResourceExhausted, "memory full"


@pytest.mark.parametrize(
    "case",
    [
        "nan embedding",
        "out-of-order id",
        "replay with other embedding",
        "lengths misaligned",
        "larger than memory",
        "memory full of pinned chunks",
    ],
)
def test_a_refused_append_writes_nothing_to_the_data_files(tmp_path: Path, case: str) -> None:
    """The core's checks run before the K/V reach the data files: a refused batch leaves their size
    as it was (no unreferenced bytes), the session as it was, and the error the core gives."""
    spec, rng = tiny_spec(memory_size=32), np.random.default_rng(9)
    shard = open_shard(tmp_path)
    shard.create_session("a", spec)
    shard.append("a", *chunks(rng, spec, 0, 5))
    shard.append("a", *chunks(rng, spec, 10, 6))  # 5..9 never sent: a later 5..9 is out of order
    batch, error, message = _refused_batch(case, rng, spec, shard)
    kv_before = [(p.name, p.stat().st_size) for p in _files(tmp_path, "kv")]
    want = _content(shard, "a")
    with pytest.raises(error, match=message):
        shard.append("a", *batch)
    assert [(p.name, p.stat().st_size) for p in _files(tmp_path, "kv")] == kv_before
    _same(want, _content(shard, "a"))
    shard.unpin("a", shard.bank.get("a").ids())  # room again after the pinned case
    assert shard.append("a", *chunks(rng, spec, 1000, 2)) == 2  # the shard goes on as before
    _survives_restart(shard, tmp_path)


def test_kv_that_never_reached_the_disk_cut_the_log_there(tmp_path: Path) -> None:
    """After a power loss a log record can be on disk without its K/V (it was never acknowledged):
    recovery keeps every record before it and drops it and the rest, like a torn tail."""
    spec, rng = tiny_spec(memory_size=200), np.random.default_rng(2)
    shard = open_shard(tmp_path)
    shard.create_session("a", spec)
    shard.append("a", *chunks(rng, spec, 0, 10))
    shard.checkpoint()
    shard.append("a", *chunks(rng, spec, 10, 5))
    shard.append("a", *chunks(rng, spec, 15, 5))
    shard.append("a", *chunks(rng, spec, 20, 5))
    want = _content(shard, "a")
    shard.close()
    kv = _files(tmp_path, "kv")[-1]
    data = kv.read_bytes()
    kv.write_bytes(data[: len(data) - 5 * spec.record_bytes - 3])  # ids 15..24 partly or wholly lost
    again = Shard("s", tmp_path)
    assert again.open().kv_torn_records == 1
    got = again.bank.get("a").ids()
    assert got.tolist() == list(range(15))
    _same({k: v[:15] for k, v in want.items()}, _content(again, "a"))
    assert again.append("a", *chunks(rng, spec, 15, 3)) == 3  # the cut ids are free again
    _survives_restart(again, tmp_path)


def test_a_torn_kv_record_is_reported(tmp_path: Path) -> None:
    spec, rng = tiny_spec(), np.random.default_rng(3)
    shard = open_shard(tmp_path)
    shard.create_session("a", spec)
    shard.append("a", *chunks(rng, spec, 0, 4))
    shard.close()
    kv = _files(tmp_path, "kv")[-1]
    data = bytearray(kv.read_bytes())
    data[-1] ^= 0xFF
    kv.write_bytes(bytes(data))
    again = Shard("s", tmp_path)
    report = again.open()
    assert (report.kv_torn_records, report.wal_dropped_records) == (1, 1)
    assert report.errors == []
    assert len(again.bank.get("a")) == 0  # the one append was the torn one
    again.close()


def test_damaged_kv_behind_a_snapshot_reads_as_data_loss(tmp_path: Path) -> None:
    spec, rng = tiny_spec(), np.random.default_rng(4)
    shard = open_shard(tmp_path)
    shard.create_session("a", spec)
    ids, emb, rec, lengths = chunks(rng, spec, 0, 6)
    shard.append("a", ids, emb, rec, lengths)
    shard.checkpoint()
    shard.close()
    kv = _files(tmp_path, "kv")[0]
    data = bytearray(kv.read_bytes())
    data[2 * spec.record_bytes + 1] ^= 0x10  # chunk 2
    kv.write_bytes(bytes(data))
    again = open_shard(tmp_path)
    with pytest.raises(DataLoss, match="CRC"):
        again.fetch("a", ids[2:3])
    assert np.array_equal(again.fetch("a", ids[3:])[0], rec[3:])
    again.close()


def test_checkpoints_delete_kv_files_nothing_refers_to(tmp_path: Path) -> None:
    spec, rng = tiny_spec(memory_size=20), np.random.default_rng(5)
    file_bytes = 8 * spec.record_bytes
    shard = open_shard(tmp_path, kv_file_bytes=file_bytes)
    shard.create_session("a", spec)
    shard.create_session("b", spec)
    shard.append("b", *chunks(rng, spec, 0, 3))
    for k in range(10):  # "a" keeps at most 20 of 80 chunks: old files die
        shard.append("a", *chunks(rng, spec, 8 * k, 8))
    assert len(_files(tmp_path, "kv")) >= 10
    for _ in range(3):  # the log and the older generation are kept one round: three checkpoints
        shard.checkpoint()
    left = _files(tmp_path, "kv")
    assert len(left) <= 5, left  # b's file, a's newest chunks' files, the active one
    want = {s: _content(shard, s) for s in ("a", "b")}
    shard.delete_session("b")
    shard.checkpoint()
    shard.close()
    again = open_shard(tmp_path, kv_file_bytes=file_bytes)
    _same(want["a"], _content(again, "a"))
    again.close()


def test_inline_kv_of_older_versions_moves_into_kv_files(tmp_path: Path) -> None:
    spec, rng = tiny_spec(memory_size=50), np.random.default_rng(6)
    old = Shard("s", tmp_path)
    old.kv = None  # what shards wrote before K/V files: K/V inside log records and snapshots
    old.open()
    old.create_session("a", spec)
    old.append("a", *chunks(rng, spec, 0, 10))
    old.checkpoint()  # an inline snapshot
    old.append("a", *chunks(rng, spec, 10, 10))  # inline log records after it
    old.pin("a", np.array([3], np.int64))
    want = _content(old, "a")
    old.close()
    assert not (tmp_path / "s" / "kv").exists()
    new = Shard("s", tmp_path)
    report = new.open()
    assert report.errors == [] and report.kv_migrated_chunks == 20
    assert new.bank.get("a").config.record_bytes == REF_BYTES
    _same(want, _content(new, "a"))
    new.checkpoint()
    new.checkpoint()
    new.close()
    _reopened_holds(tmp_path, want)


def test_export_and_import_between_disk_shards_keep_every_byte(tmp_path: Path) -> None:
    spec, rng = tiny_spec(), np.random.default_rng(7)
    src = open_shard(tmp_path / "src")
    src.create_session("a", spec)
    src.append("a", *chunks(rng, spec, 0, 12))
    spec_, state = src.export_session("a")
    dst = open_shard(tmp_path / "dst")
    assert dst.import_session("a", spec_, state) == 12
    _same(_content(src, "a"), _content(dst, "a"))
    dst.close()
    again = open_shard(tmp_path / "dst")
    _same(_content(src, "a"), _content(again, "a"))
    again.close()
    src.close()
