"""Per-session snapshots: .npy arrays + a FAISS index file + a JSON manifest of sha256 checksums.

`records.npy` holds the K/V records themselves (`kv: inline`, written by shards without K/V files and
by older versions) or 16-byte references into the shard's K/V files (`kv: files`; the manifest lists
the files they point into, so a checkpoint keeps the files an older generation needs).

Layout: `<session_dir>/<lsn:020d>/` where `lsn` is the last log record the snapshot reflects.
Written as `<lsn>.tmp/` (each file fsynced), renamed into place, then the parent directory fsynced:
a snapshot directory without `.tmp` is complete. Arrays are loaded with `allow_pickle=False` after
their checksum matches; the FAISS index is deserialised only when its checksum matches too, and is
then handed to `SessionMemory.from_state`, which adopts it only if it holds exactly the snapshot's ids
and embeddings (and otherwise rebuilds the exact flat index from the embeddings).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from memlong.atomic import fsync_dir, private_dir

from .kvfiles import referenced_files

FORMAT = 1
MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"
KV_INLINE = "inline"  # records.npy holds the K/V
KV_FILES = "files"  # records.npy holds references into the shard's K/V files


class SnapshotError(Exception):
    """A snapshot is incomplete or fails its checksums."""


@dataclass
class LoadedSnapshot:
    lsn: int
    spec: dict[str, Any]
    state: dict[str, Any]
    index: faiss.Index | None  # deserialised only when present and its sha256 matched the manifest
    cut: int = 0  # the log cut of the checkpoint that wrote it: no record of the session lies in (lsn, cut]
    kv: str = KV_INLINE  # what its records are (KV_INLINE or KV_FILES)


def _sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_file(path: Path, data: bytes | memoryview) -> str:
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return _sha256(data)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getbuffer()


def build_index(ids: np.ndarray, embeddings: np.ndarray, dim: int) -> faiss.Index:
    """The flat inner-product index keyed by chunk id, as the memory holds it."""
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if len(ids):
        index.add_with_ids(np.ascontiguousarray(embeddings, np.float32), np.ascontiguousarray(ids, np.int64))
    return index


def write(
    session_dir: Path,
    lsn: int,
    spec: dict[str, Any],
    state: dict[str, Any],
    final: bool = True,
    cut: int = 0,
    kv: str = KV_INLINE,
) -> Path:
    """Write a snapshot of `state` (SessionMemory.export_state()) as `<lsn>.tmp`, then publish it.

    With `final=False` the `.tmp` directory is left for the caller to `publish` later (imports
    publish only after their log record is durable).
    """
    private_dir(session_dir)
    tmp = session_dir / f"{lsn:020d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o700)
    files: dict[str, str] = {}
    scalars: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, np.ndarray):
            files[f"{key}.npy"] = _write_file(tmp / f"{key}.npy", _npy_bytes(value))
        else:
            scalars[key] = value.item() if isinstance(value, np.generic) else value
    index_bytes = faiss.serialize_index(build_index(state["ids"], state["embeddings"], spec["dim"]))
    index_sha = _write_file(tmp / INDEX_FILE, index_bytes.tobytes())
    manifest = {
        "format": FORMAT,
        "spec": spec,
        "scalars": scalars,
        "files": files,
        "index": {"file": INDEX_FILE, "sha256": index_sha},
        "cut": cut,
        "kv": kv,
    }
    if kv == KV_FILES:
        manifest["kv_files"] = sorted(referenced_files(state["records"]))
    _write_file(tmp / MANIFEST, json.dumps(manifest, sort_keys=True).encode())
    fsync_dir(tmp)
    return publish(tmp) if final else tmp


def publish(tmp: Path, lsn: int | None = None) -> Path:
    """Rename `<lsn>.tmp` to `<lsn>` (or to the given `lsn`) and make the rename durable."""
    final = tmp.with_suffix("") if lsn is None else tmp.parent / f"{lsn:020d}"
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    return final


def generations(session_dir: Path) -> list[int]:
    """Published snapshot LSNs of a session, newest first."""
    return sorted(
        (int(p.name) for p in session_dir.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True
    )


def read(path: Path) -> LoadedSnapshot:
    """Load and verify one published snapshot directory; SnapshotError if anything mismatches."""
    try:
        manifest = json.loads((path / MANIFEST).read_bytes())
    except (OSError, ValueError) as e:
        raise SnapshotError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SnapshotError(f"{path}: unsupported manifest")
    state: dict[str, Any] = dict(manifest["scalars"])
    for name, sha in manifest["files"].items():
        if "/" in name or not name.endswith(".npy"):
            raise SnapshotError(f"{path}: bad file name {name!r}")
        data = (path / name).read_bytes()
        if _sha256(data) != sha:
            raise SnapshotError(f"{path / name}: sha256 mismatch")
        state[name[: -len(".npy")]] = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    cut = manifest.get("cut", 0)
    cut = cut if isinstance(cut, int) else 0
    kv = manifest.get("kv", KV_INLINE)
    if kv not in (KV_INLINE, KV_FILES):
        raise SnapshotError(f"{path}: unknown K/V layout {kv!r}")
    return LoadedSnapshot(int(path.name), manifest["spec"], state, _load_index(path, manifest), cut, kv)


def kv_files(path: Path) -> set[int]:
    """The K/V files a published snapshot refers to, from its manifest (empty when unreadable)."""
    try:
        files = json.loads((path / MANIFEST).read_bytes()).get("kv_files", [])
    except (OSError, ValueError, AttributeError):
        return set()
    return {int(f) for f in files if isinstance(f, int)}


def _load_index(path: Path, manifest: dict[str, Any]) -> faiss.Index | None:
    """Deserialise the FAISS file only if its sha256 matches the manifest; None otherwise."""
    entry = manifest.get("index") or {}
    try:
        data = (path / entry["file"]).read_bytes()
    except (OSError, KeyError, TypeError):
        return None
    if _sha256(data) != entry.get("sha256"):
        return None
    try:
        return faiss.deserialize_index(np.frombuffer(data, np.uint8))
    except RuntimeError:  # checksum matched but FAISS cannot read it: a writer bug, rebuild instead
        return None


def remove_older(session_dir: Path, keep_lsn: int) -> None:
    """Delete published generations older than `keep_lsn` and any stray `.tmp` directories."""
    for p in session_dir.iterdir():
        if p.name.endswith(".tmp") or (p.name.isdigit() and int(p.name) < keep_lsn):
            shutil.rmtree(p, ignore_errors=True)
