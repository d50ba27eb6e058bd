"""F6: no unsafe deserialisation anywhere; FAISS files are read only when their checksum matches."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from services.retmem import snapshot
from services.retmem.shard import Shard

from .conftest import REPO, chunks, tiny_spec

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
    shard = Shard("s", tmp_path)
    shard.open()
    shard.create_session("a", spec)
    shard.append("a", *chunks(rng, spec, 0, 20))
    shard.checkpoint()
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


def test_array_with_bad_checksum_falls_back_and_is_counted(tmp_path: Path) -> None:
    spec, rng = tiny_spec(), np.random.default_rng(1)
    shard = Shard("s", tmp_path)
    shard.open()
    shard.create_session("a", spec)
    shard.append("a", *chunks(rng, spec, 0, 5))
    shard.checkpoint()
    shard.close()
    (gen,) = (tmp_path / "s" / "snapshots").glob("*/*")
    path = gen / "records.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    again = Shard("s", tmp_path)
    report = again.open()  # never crashes, never loads the damaged array
    assert report.snapshot_errors == 1
    again.close()


def test_verified_faiss_file_is_adopted_not_rebuilt(tmp_path: Path, monkeypatch) -> None:
    spec, rng = tiny_spec(), np.random.default_rng(2)
    shard = Shard("s", tmp_path)
    shard.open()
    shard.create_session("a", spec)
    shard.append("a", *chunks(rng, spec, 0, 20))
    shard.checkpoint()
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
