"""No unsafe deserialisation anywhere; FAISS files are read only when their checksum matches."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memlong.api.retmem.v1 import retmem_pb2, retmem_pb2_grpc
from memlong.errors import DataLoss
from memlong.services.retmem import snapshot
from memlong.services.retmem.server import INTEGRITY_NAME, SERVICE_NAME, RetMemConfig, RetMemServer
from memlong.services.retmem.shard import Shard

from .servers import REPO, chunks, shard_holding, tiny_spec

FORBIDDEN = [
    re.compile(r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle|joblib)\b", re.M),
    re.compile(r"\bpickle\.(loads?|dumps?|Unpickler)\b"),
    re.compile(r"allow_pickle\s*=\s*True"),
]


def _python_files() -> list[Path]:
    skip = {".venv", ".git", "build", ".cache", "data"}
    return [p for p in REPO.rglob("*.py") if not skip & set(p.relative_to(REPO).parts)]


def test_no_pickle_in_repository() -> None:
    offenders = []
    me = Path(__file__).resolve()
    for path in _python_files():
        if path.resolve() == me:
            continue
        text = path.read_text(errors="replace")
        offenders += [f"{path.relative_to(REPO)}: {rx.pattern}" for rx in FORBIDDEN if rx.search(text)]
        for m in re.finditer(r"torch\.load\(", text):
            call = text[m.start() : text.find(")", m.start()) + 1]
            if "weights_only=True" not in call:
                offenders.append(f"{path.relative_to(REPO)}: torch.load without weights_only=True")
    assert not offenders, offenders


def test_faiss_file_with_bad_checksum_is_not_loaded(tmp_path: Path, monkeypatch) -> None:
    spec, rng = tiny_spec(), np.random.default_rng(0)
    shard = shard_holding(tmp_path, spec, rng, 20, checkpoint=True)
    expected = shard.bank.get("a").ids()
    shard.close()
    (gen,) = (tmp_path / "s" / "snapshots").glob("*/*")
    index_file = gen / snapshot.INDEX_FILE
    data = bytearray(index_file.read_bytes())
    data[-5] ^= 0xFF
    index_file.write_bytes(bytes(data))

    calls = []
    real = snapshot.faiss.deserialize_index
    monkeypatch.setattr(snapshot.faiss, "deserialize_index", lambda *a: calls.append(1) or real(*a))
    again = Shard("s", tmp_path)
    report = again.open()
    assert calls == [], "a FAISS file with a bad checksum was deserialised"
    assert report.index_files_rejected == 1
    assert np.array_equal(again.bank.get("a").ids(), expected)  # rebuilt from embeddings
    again.close()


def _three_checkpoints(root: Path) -> tuple[Shard, np.ndarray, np.ndarray]:
    """Sessions a and b, written between three checkpoints (so the log no longer holds a's creation)
    and after the last; returns the open shard and the ids a and b hold."""
    spec, rng = tiny_spec(), np.random.default_rng(1)
    shard = Shard("s", root)
    shard.open()
    shard.create_session("a", spec)
    shard.create_session("b", spec)
    for k in range(4):
        shard.append("a", *chunks(rng, spec, 5 * k, 5))
        shard.append("b", *chunks(rng, spec, 3 * k, 3))
        if k < 3:
            shard.checkpoint()
    return shard, shard.bank.get("a").ids(), shard.bank.get("b").ids()


def _damage(gen: Path) -> None:
    path = gen / "records.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def _generations(root: Path, sid: str) -> list[Path]:
    return sorted((root / "s" / "snapshots" / sid.encode().hex()).iterdir())


def test_damaged_newest_snapshot_falls_back_to_the_older_one_plus_the_log(tmp_path: Path) -> None:
    shard, ids_a, ids_b = _three_checkpoints(tmp_path)
    state_a = shard.bank.get("a").export_state()
    shard.close()
    older, newest = _generations(tmp_path, "a")
    _damage(newest)
    again = Shard("s", tmp_path)
    report = again.open()
    assert report.snapshot_errors == 1 and report.sessions_lost == 0, report.errors
    got = again.bank.get("a").export_state()
    for key in ("ids", "records", "embeddings", "lengths"):
        assert np.array_equal(got[key], state_a[key]), key
    assert np.array_equal(again.bank.get("b").ids(), ids_b)
    assert newest.exists() and older.exists()  # evidence is not deleted by recovery
    again.close()


def test_a_session_with_no_usable_snapshot_answers_data_loss_and_keeps_its_files(tmp_path: Path) -> None:
    spec = tiny_spec()
    shard, _, ids_b = _three_checkpoints(tmp_path)
    shard.close()
    gens = _generations(tmp_path, "a")
    for gen in gens:
        _damage(gen)
    evidence = {p: p.read_bytes() for gen in gens for p in gen.iterdir()}
    wal_before = sorted((tmp_path / "s" / "wal").glob("*.wal"))

    server = RetMemServer(RetMemConfig(data_dir=tmp_path, shards=("s",)))
    server.start()
    try:
        assert server.recovery["s"].sessions_lost == 1
        assert set(server.lost_sessions()) == {"a"}
        shard = server.shards["s"]
        for call in (
            lambda: shard.info("a"),
            lambda: shard.append("a", *chunks(np.random.default_rng(9), spec, 100, 1)),
            lambda: shard.search("a", np.ones((1, spec.dim), np.float32), 2),
            lambda: shard.create_session("a", spec),
        ):
            with pytest.raises(DataLoss, match="could not be recovered"):
                call()
        assert np.array_equal(shard.bank.get("b").ids(), ids_b)  # the other session serves on
        shard.checkpoint()  # a's log records are evidence too: no segment goes
        assert set(wal_before) <= set((tmp_path / "s" / "wal").glob("*.wal"))
        assert {p: p.read_bytes() for p in evidence} == evidence

        channel = grpc.insecure_channel(server.address())
        health = health_pb2_grpc.HealthStub(channel)
        check = lambda name: health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status  # noqa: E731
        assert check(SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING
        assert check(INTEGRITY_NAME) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert server.servicer.memory_report()["s"]["sessions_lost"] == 1
        stub = retmem_pb2_grpc.RetMemStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.GetSession(retmem_pb2.GetSessionRequest(session_id="a"), timeout=5)
        assert err.value.code() == grpc.StatusCode.DATA_LOSS
        # The operator's way out: delete the session; the alarm clears.
        stub.DeleteSession(retmem_pb2.DeleteSessionRequest(session_id="a"), timeout=5)
        assert check(INTEGRITY_NAME) == health_pb2.HealthCheckResponse.SERVING
        assert server.servicer.memory_report()["s"]["sessions_lost"] == 0
        channel.close()
    finally:
        server.stop(grace_s=1)


def test_verified_faiss_file_is_adopted_not_rebuilt(tmp_path: Path, monkeypatch) -> None:
    spec, rng = tiny_spec(), np.random.default_rng(2)
    shard = shard_holding(tmp_path, spec, rng, 20, checkpoint=True)
    queries = rng.standard_normal((30, spec.dim)).astype(np.float32)
    before = shard.search("a", queries, 4)
    shard.close()
    loaded = []
    real = snapshot.faiss.deserialize_index
    monkeypatch.setattr(snapshot.faiss, "deserialize_index", lambda *a: loaded.append(real(*a)) or loaded[-1])
    again = Shard("s", tmp_path)
    report = again.open()
    assert report.index_files_rejected == 0 and len(loaded) == 1
    assert again.bank.get("a")._index is loaded[0]
    after = again.search("a", queries, 4)
    assert np.array_equal(before.ids, after.ids) and np.array_equal(before.records, after.records)
    again.close()


@pytest.fixture
def written_shard(tmp_path: Path) -> Path:
    """The root of a shard written under a permissive umask (0o022), in a data folder it created:
    sessions appended, checkpointed (snapshots, marker), one deleted (tombstone), closed."""
    old = os.umask(0o022)
    try:
        spec, rng = tiny_spec(), np.random.default_rng(0)
        shard = Shard("s", tmp_path / "data")
        shard.open()
        for sid in ("a", "b"):
            shard.create_session(sid, spec)
            shard.append(sid, *chunks(rng, spec, 0, 20))
        shard.checkpoint()
        shard.delete_session("b")
        shard.close()
    finally:
        os.umask(old)
    return tmp_path / "data" / "s"


def test_a_shards_files_are_private_to_its_user(written_shard: Path) -> None:
    """Log, tombstones, snapshots, K/V files and the checkpoint marker are created owner-only, whatever
    the umask lets through: they hold other tenants' K/V and session ids."""
    files = [p for p in written_shard.rglob("*") if p.is_file()]
    kinds = {p.relative_to(written_shard).parts[0] for p in files}
    assert {"wal", "tombstones", "snapshots", "kv", "checkpoint.json"} <= kinds
    shared = [str(p) for p in files if stat.S_IMODE(p.stat().st_mode) & 0o077]
    assert not shared, f"readable by group or others: {shared}"


def test_a_shards_folders_are_private_to_its_user(written_shard: Path) -> None:
    """The folders a shard creates (its root, log, tombstones, K/V, snapshots and a folder per session,
    named by the session id) are owner-only (0700) under a permissive umask: other local users can
    neither list the session ids nor reach the files. Folders above the root it creates are too."""
    inside = [p for p in written_shard.rglob("*") if p.is_dir()]
    assert {"wal", "tombstones", "snapshots", "kv"} <= {p.relative_to(written_shard).parts[0] for p in inside}
    assert any(len(p.relative_to(written_shard).parts) == 3 for p in inside), "no snapshot generation folder"
    modes = {str(p): stat.S_IMODE(p.stat().st_mode) for p in [written_shard.parent, written_shard, *inside]}
    wrong = {p: oct(m) for p, m in modes.items() if m != 0o700}
    assert not wrong, f"folders not owner-only: {wrong}"
