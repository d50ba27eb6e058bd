"""One shard: a MemoryBank of whole sessions plus durability (write-ahead log, snapshots, tombstones).

Every mutation runs under its session's lock in this order: apply to the in-memory core (which
validates and may refuse), append the log record, wait until it is fsynced, release the lock. So no
reader ever sees a chunk that is not durable, and the log holds only operations that succeeded.
If the log cannot be written the shard fails stop (Unavailable from then on).

The log records the *ids* each eviction removed (explicit or inside an append), and replay removes
exactly those (`SessionMemory.remove`), so replay never depends on retrieval counters. Counters are
still logged, cheaply: a search only adds its returned ids to the session's pending hits in memory;
the next logged mutation of the session carries them (no extra record, no extra fsync), and a
session that only searches writes one `credit` record per `counter_flush_hits` hits (one fsync wait
for that one search). Replay credits them before applying the record. A crash therefore loses at
most the hits since the session's last record and never more than `counter_flush_hits` of them; a
checkpoint (and so a graceful stop) snapshots them and clears the pending list.

K/V on disk: with a data directory, each chunk's K/V bytes go once to append-only data files
(`kvfiles`), written before the log record that refers to them and synced with the log (an append
is acknowledged once both syncs are done). A batch is checked whole first (the core's
`plan_append`, the CRCs, a replay's stored bytes): one that is refused writes nothing. The
memory core holds a 16-byte reference per chunk instead of the record, and so do the log records and
snapshots: resident memory is the index, ids, counters and metadata, whatever the stored size.
Searches and fetches read the K/V back with positional reads and check each record's CRC-32 (a
mismatch is DATA_LOSS). A replayed append whose K/V fail their CRC was never acknowledged (its bytes
had not reached the disk when the power went): the log is cut there, like a torn tail. A checkpoint
deletes data files that neither the sessions, their kept snapshot generations nor the kept log refer
to. Data written by versions that kept K/V inline (in log records and snapshots) is moved into data
files when it is recovered.

Deleted session ids are written to a tombstone log before anything is removed and are never
reused, so a delete survives restarts and stale snapshots. Without a data directory the shard is
purely in memory (`Shard(name, data_dir=None)`).

Damaged snapshots: a checkpoint keeps each session's previous snapshot generation and the log back
to the previous checkpoint (its cut is kept in `checkpoint.json`). When the newest generation fails
its checksums, recovery loads the previous one and replays the log after it, if the log still holds
every record since (else, or when no generation is intact, the session is *lost*: its files and its
log records are kept untouched, every call on it answers DATA_LOSS, `lost_sessions()` lists it for
health and metrics, and checkpoints delete no log segment until an operator deletes the session).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from memlong.atomic import private_dir, write_atomic
from memlong.errors import AlreadyExists, DataLoss, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from memlong.gpu_index import GpuIndexes
from memlong.ids import check_session_id
from memlong.memory import AppendPlan, MemoryBank, MemoryConfig, SearchResult, SessionMemory
from memlong.services.common.tensor import checksum

from . import kvfiles, snapshot
from .kvfiles import REF_BYTES, CrcMismatch, KVFiles, referenced_files
from .store import SessionInfo, SessionSpec, as_records, check_lengths
from .wal import ReplayReport, WriteAheadLog, replay, truncate_from

log = logging.getLogger(__name__)

IMPORT_TMP = 0  # LSN used to name an import's snapshot until its log record has an LSN
CHECKPOINT_FILE = "checkpoint.json"  # {"cut": last LSN the latest checkpoint's snapshots cover}


@dataclass
class RecoveryReport:
    """What `Shard.open` found on disk."""

    sessions: int = 0
    snapshots_loaded: int = 0
    snapshot_errors: int = 0
    index_files_rejected: int = 0
    wal_records: int = 0
    wal_dropped_records: int = 0
    wal_dropped_bytes: int = 0
    tombstones: int = 0
    sessions_lost: int = 0  # no intact snapshot (or the log no longer covers an older one): DATA_LOSS
    kv_torn_records: int = 0  # a replayed record's K/V failed their CRC: the log was cut there
    kv_bytes_replayed: int = 0  # K/V bytes read back (and checked) for replayed records
    kv_migrated_chunks: int = 0  # inline K/V of older versions moved into data files
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class _Meta:
    spec: SessionSpec
    lock: threading.Lock = field(default_factory=threading.Lock)
    applied_lsn: int = 0  # last log record reflected in memory
    dirty: bool = True  # changed since its last snapshot
    deleted: bool = False
    # Retrievals not yet logged: returned ids of each search, and search/query counts.
    hits: list[np.ndarray] = field(default_factory=list)
    n_hits: int = 0
    searches: int = 0
    queries: int = 0

    def take_hits(self) -> dict[str, Any]:
        """The pending retrievals as log-record fields (empty when none), and clear them."""
        if not self.searches:
            return {}
        ids, counts = np.unique(np.concatenate(self.hits), return_counts=True) if self.hits else ((), ())
        fields_ = {
            "hits": np.asarray(ids, np.int64).tobytes(),
            "hit_n": np.asarray(counts, np.int64).tobytes(),
            "searches": self.searches,
            "queries": self.queries,
        }
        self.clear_hits()
        return fields_

    def clear_hits(self) -> None:
        self.hits, self.n_hits, self.searches, self.queries = [], 0, 0, 0


@dataclass(frozen=True)
class StoredResult(SearchResult):
    """A search result and the CRC-32 each record was stored with ((q, k) uint32, padding: the CRC-32
    of a zero record); None where the shard keeps K/V in memory (nothing stored with a checksum)."""

    crcs: np.ndarray | None = None


def as_rows(spec: SessionSpec, kv: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    """An append's K/V as one uint8 row of record_bytes per chunk (views, no copy)."""
    if isinstance(kv, np.ndarray):
        return list(as_records(spec, kv))
    rows = list(kv)
    for i, r in enumerate(rows):
        if not isinstance(r, np.ndarray) or r.dtype != np.uint8 or r.shape != (spec.record_bytes,):
            raise InvalidArgument(f"kv[{i}]", f"must be ({spec.record_bytes},) uint8")
    return rows


def _crc_error(index: int) -> InvalidArgument:
    return InvalidArgument(f"chunks[{index}].kv.checksum", "CRC-32 of data does not match")


def _check_crcs(rows: Sequence[np.ndarray], crcs: np.ndarray | None) -> None:
    if crcs is None:
        return
    for i, (r, c) in enumerate(zip(rows, crcs, strict=True)):
        if checksum(r) != int(c):
            raise _crc_error(i)


class _TornKV(Exception):
    """A replayed record's K/V are not what it says: it was never acknowledged."""


def _arr(buf: bytes, dtype: Any, *shape: int) -> np.ndarray:
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


def _session_dirname(session_id: str) -> str:
    return session_id.encode().hex()  # ids may hold '.' and ':'; hex is always a safe file name


class Shard:
    """Sessions hashed to this shard, with their durability. Thread-safe."""

    def __init__(
        self,
        name: str,
        data_dir: Path | None,
        fsync: str = "grouped",
        checkpoint_bytes: int = 1 << 30,
        counter_flush_hits: int = 4096,
        kv_file_bytes: int = 1 << 30,
        gpu: GpuIndexes | None = None,  # keep the sessions' search indexes on this GPU
    ) -> None:
        self.name = name
        self.counter_flush_hits = counter_flush_hits
        self.root = None if data_dir is None else Path(data_dir) / name
        self.fsync = fsync
        self.checkpoint_bytes = checkpoint_bytes
        self.bank = MemoryBank(gpu)
        self._meta: dict[str, _Meta] = {}
        self._deleted: set[str] = set()
        self._lost: dict[str, str] = {}  # session id -> why it could not be recovered
        self._prev_cut = 0  # LSN cut of the latest checkpoint: the log after it is kept one round more
        self._lock = threading.RLock()  # session set, checkpoints
        self._wal: WriteAheadLog | None = None
        # K/V data files (None: no data directory, K/V stay in the memory core) and, per file, the
        # last log record that refers to it (a file the kept log refers to is kept).
        self.kv = None if self.root is None else KVFiles(self.root / "kv", kv_file_bytes)
        self._kv_lsn: dict[int, int] = {}
        self._tombs: WriteAheadLog | None = None
        self._failed: BaseException | None = None
        self._checkpointing = threading.Lock()
        self._checkpoint_at = checkpoint_bytes
        self.ready = False

    # ------------------------------------------------------------------------------ lifecycle

    @property
    def healthy(self) -> bool:
        return self.ready and self._failed is None

    def open(self) -> RecoveryReport:
        """Recover from disk (snapshots, then the log) and start logging. Never raises on bad data."""
        t0 = time.perf_counter()
        report = RecoveryReport()
        if self.root is not None:
            self._recover(report)
        report.sessions = len(self._meta)
        report.seconds = time.perf_counter() - t0
        self.ready = True
        self._maybe_checkpoint()  # a log left long by earlier runs is compacted now, not after more writes
        return report

    def close(self) -> None:
        self.ready = False
        for w in (self._wal, self._tombs):
            if w is not None:
                w.close()
        if self.kv is not None:
            self.kv.close()

    def _config(self, spec: SessionSpec) -> MemoryConfig:
        """The memory core's settings for a session: with K/V on disk its records are references."""
        config = spec.memory_config()
        return config if self.kv is None else dataclasses.replace(config, record_bytes=REF_BYTES)

    # --------------------------------------------------------------------------------- access

    def _session(self, session_id: str) -> _Meta:
        if not self.ready:
            raise Unavailable(f"shard {self.name} is not ready")
        if self._failed is not None:
            raise Unavailable(f"shard {self.name} stopped after a storage failure")
        check_session_id(session_id)
        meta = self._meta.get(session_id)
        if meta is None and session_id in self._lost:
            raise DataLoss(f"session {session_id!r} could not be recovered: {self._lost[session_id]}")
        if meta is None:
            raise NotFound(f"session {session_id!r} not found")
        return meta

    def _locked(self, session_id: str) -> tuple[_Meta, SessionMemory]:
        """Acquire the session lock; the caller releases meta.lock."""
        meta = self._session(session_id)
        meta.lock.acquire()
        if meta.deleted:
            meta.lock.release()
            raise NotFound(f"session {session_id!r} not found")
        return meta, self.bank.get(session_id)

    def _log(self, meta: _Meta, record: dict[str, Any], kv_bytes: int = 0) -> None:
        """Append a record for an already applied change (carrying the pending hits); returns once durable.

        kv_bytes: K/V bytes the record refers to (a recovery reads them back)."""
        meta.dirty = True
        if self._wal is None:
            return
        try:
            meta.applied_lsn = self._wal.append({**record, **meta.take_hits()}, kv_bytes)
        except OSError as e:
            self._failed = e
            log.exception("shard %s: write-ahead log failed; failing stop", self.name)
            raise Unavailable(f"shard {self.name}: storage failure") from e
        self._maybe_checkpoint()

    def _maybe_checkpoint(self) -> None:
        """Start a background checkpoint once the log holds `checkpoint_bytes` more than at the last one.

        The log's size counts what earlier runs left in it (`WriteAheadLog.bytes_written` starts at the
        size of the segments found on open), so a shard that keeps crashing before it reaches the
        threshold still compacts: what recovery replays stays bounded by the threshold."""
        if self._wal is None:
            return
        if self._wal.bytes_written >= self._checkpoint_at and self._checkpointing.acquire(blocking=False):
            self._checkpoint_at = self._wal.bytes_written + self.checkpoint_bytes
            threading.Thread(target=self._background_checkpoint, name="checkpoint", daemon=True).start()

    # ------------------------------------------------------------------------------ operations

    def create_session(self, session_id: str, spec: SessionSpec) -> None:
        check_session_id(session_id)
        if not self.ready or self._failed is not None:
            raise Unavailable(f"shard {self.name} is not ready")
        with self._lock:
            if session_id in self._deleted:
                raise AlreadyExists(f"session {session_id!r} was deleted; session ids are not reused")
            if session_id in self._lost:
                raise DataLoss(f"session {session_id!r} could not be recovered: {self._lost[session_id]}")
            meta = _Meta(spec)
            with meta.lock:
                self.bank.create(session_id, self._config(spec))
                self._meta[session_id] = meta
                try:
                    self._log(meta, {"op": "create", "sid": session_id, "spec": spec.to_dict()})
                except Unavailable:
                    self._meta.pop(session_id, None)
                    self.bank.delete(session_id)
                    raise

    def append(
        self,
        session_id: str,
        ids: np.ndarray,
        embeddings: np.ndarray,
        kv: np.ndarray | Sequence[np.ndarray],
        lengths: np.ndarray,
        crcs: np.ndarray | None = None,
    ) -> int:
        """Store chunks (see SessionMemory.append); returns how many were new. Durable on return.

        kv: (n, record_bytes) uint8 or typed (n, *kv_shape) records, or n uint8 rows of record_bytes
        each wherever they lie (views of a received message or of a shared-memory region: written to
        the data files from there). crcs: the CRC-32 the caller says each record has (the wire's
        chunks[i].kv.checksum); a record that differs is INVALID_ARGUMENT naming that field, and
        nothing is stored."""
        meta, mem = self._locked(session_id)
        try:
            rows = as_rows(meta.spec, kv)
            check_lengths(meta.spec, np.asarray(lengths))
            kv_bytes = 0
            if self.kv is not None:
                # Every check the core makes, once, before anything reaches the data files: a refused
                # batch leaves no bytes behind. The K/V themselves are checked in _write_kv.
                plan = mem.plan_append(ids, embeddings, lengths)
                records, kv_bytes = self._write_kv(meta.spec, mem, plan, rows, crcs)
                n_new = mem.apply(plan, records)
            else:
                _check_crcs(rows, crcs)
                stacked = np.stack(rows) if rows else np.empty((0, meta.spec.record_bytes), np.uint8)
                records = as_records(meta.spec, kv if isinstance(kv, np.ndarray) else stacked)
                plan = mem.plan_append(ids, embeddings, lengths, records)
                n_new = mem.apply(plan)
            if n_new == 0:
                return 0
            new = plan.new
            self._log(
                meta,
                {
                    "op": "append",
                    "sid": session_id,
                    "ids": plan.ids[new].tobytes(),
                    "emb": plan.embeddings[new].tobytes(),
                    "rec" if self.kv is None else "ref": np.ascontiguousarray(records[new]).tobytes(),
                    "len": plan.lengths[new].tobytes(),
                    "evicted": plan.evicted.tobytes(),
                },
                kv_bytes,
            )
            if self.kv is not None:
                self._note_kv(records[new], meta.applied_lsn)
            return n_new
        finally:
            meta.lock.release()

    def _write_kv(
        self,
        spec: SessionSpec,
        mem: SessionMemory,
        plan: AppendPlan,
        records: list[np.ndarray],
        crcs: np.ndarray | None,
    ) -> tuple[np.ndarray, int]:
        """Write a batch's new K/V (one uint8 row per chunk) to the data files, each checked against
        its CRC-32 in `crcs` first; returns the references the core stores and the bytes written. A
        replay of a stored chunk is compared with the stored bytes here (different bytes:
        AlreadyExists) and gets the stored reference, so the core sees an exact replay. The rest of
        the batch has passed `SessionMemory.plan_append` (`plan`): nothing is written for a batch the
        core would refuse."""
        assert self.kv is not None
        ids, n_old = plan.ids, plan.n_old  # replays form a prefix
        if ids.shape != (len(records),):
            raise InvalidArgument("ids", f"has {len(ids)} entries but the batch has {len(records)} records")
        refs = np.zeros((len(ids), REF_BYTES), np.uint8)  # (n, REF_BYTES); zero: never stored
        if n_old:
            _check_crcs(records[:n_old], None if crcs is None else crcs[:n_old])
            held_ids = mem.ids()
            pos = np.searchsorted(held_ids, ids[:n_old])
            held = pos < len(held_ids)
            held[held] = held_ids[pos[held]] == ids[:n_old][held]
            if held.any():
                where = np.flatnonzero(held)
                stored_refs, _ = mem.fetch(ids[:n_old][held])
                stored = self.kv.read(stored_refs, spec.record_bytes)
                same = np.array([np.array_equal(stored[j], records[i]) for j, i in enumerate(where)])
                if not same.all():
                    bad = ids[:n_old][held][~same][:8].tolist()
                    raise AlreadyExists(f"chunk ids already stored with different content: {bad}")
                refs[where] = stored_refs
        if n_old < len(ids):
            try:
                refs[n_old:] = self.kv.write(records[n_old:], None if crcs is None else crcs[n_old:])
            except CrcMismatch as e:
                raise _crc_error(n_old + e.index) from None
        return refs, (len(ids) - n_old) * spec.record_bytes

    def _note_kv(self, refs: np.ndarray, lsn: int) -> None:
        for f in referenced_files(refs):
            self._kv_lsn[f] = max(lsn, self._kv_lsn.get(f, 0))

    def _read_kv(self, spec: SessionSpec, records: np.ndarray) -> np.ndarray:
        """The core's records as K/V: read from the data files when they are references."""
        return records if self.kv is None else self.kv.read(records, spec.record_bytes)

    def search(
        self,
        session_id: str,
        queries: np.ndarray,
        top_k: int,
        into: np.ndarray | None = None,
    ) -> StoredResult:
        """Top-k chunks per query row (SessionMemory.search), with the CRC-32 each record was stored
        with; each record read from the data files is checked against it. into: where to put the
        records ((q, top_k, record_bytes) uint8, e.g. a shared-memory region)."""
        meta, mem = self._locked(session_id)
        try:
            result = mem.search(queries, top_k)
            rb, crcs = meta.spec.record_bytes, None
            if self.kv is not None:
                crcs = kvfiles.crcs(result.records, rb)  # (q, k)
                kv = self.kv.read(result.records, rb, out=into)  # (q, k, record_bytes)
            elif into is not None:
                into.reshape(result.records.shape)[...] = result.records
                kv = into.reshape(result.records.shape)
            else:
                kv = result.records
            result = StoredResult(result.ids, result.scores, kv, result.lengths, crcs)
            if self._wal is not None:
                hit = result.ids[result.ids >= 0]  # (h,)
                meta.hits.append(hit)
                meta.n_hits += len(hit)
                meta.searches += 1
                meta.queries += len(result.ids)
                if meta.n_hits >= self.counter_flush_hits:
                    self._log(meta, {"op": "credit", "sid": session_id})
            return result
        finally:
            meta.lock.release()

    def fetch(self, session_id: str, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        meta, mem = self._locked(session_id)
        try:
            records, lengths = mem.fetch(ids)
            return self._read_kv(meta.spec, records), lengths
        finally:
            meta.lock.release()

    def _set_pin(self, session_id: str, ids: np.ndarray, on: bool) -> None:
        meta, mem = self._locked(session_id)
        try:
            ids = np.asarray(ids, np.int64)
            (mem.pin if on else mem.unpin)(ids)
            self._log(meta, {"op": "pin", "sid": session_id, "ids": ids.tobytes(), "on": on})
        finally:
            meta.lock.release()

    def pin(self, session_id: str, ids: np.ndarray) -> None:
        self._set_pin(session_id, ids, True)

    def unpin(self, session_id: str, ids: np.ndarray) -> None:
        self._set_pin(session_id, ids, False)

    def evict(
        self, session_id: str, n_free: int | None = None, id_range: tuple[int, int] | None = None
    ) -> np.ndarray:
        """Evict by the policy (n_free chunks, None: the policy's default), or every stored chunk with
        an id in [id_range[0], id_range[1]) (pinned ones too) and retire the range: no id in it is
        stored afterwards (`SessionMemory.retire`). Returns the evicted ids, ascending."""
        meta, mem = self._locked(session_id)
        try:
            if id_range is None:
                evicted = mem.evict(n_free)
            else:
                ids = mem.ids()
                evicted = ids[(ids >= id_range[0]) & (ids < id_range[1])]
                if len(evicted):
                    mem.unpin(evicted)
                    self._log(meta, {"op": "pin", "sid": session_id, "ids": evicted.tobytes(), "on": False})
                    mem.remove(evicted)
            if len(evicted):
                self._log(meta, {"op": "evict", "sid": session_id, "ids": evicted.astype(np.int64).tobytes()})
            if id_range is not None:
                mem.retire(*id_range)
                self._log(meta, {"op": "retire", "sid": session_id, "first": id_range[0], "end": id_range[1]})
            return evicted
        finally:
            meta.lock.release()

    def spec(self, session_id: str) -> SessionSpec:
        """The session's fixed settings (no lock: a spec never changes)."""
        return self._session(session_id).spec

    def info(self, session_id: str) -> SessionInfo:
        meta, mem = self._locked(session_id)
        try:
            stats = {k: float(v) for k, v in mem.stats().items()}
            spec = meta.spec
            stats["bytes"] = float(len(mem) * (spec.record_bytes + 4 * spec.dim + 4))  # K/V counted in full
            return SessionInfo(session_id, meta.spec, len(mem), self.name, stats)
        finally:
            meta.lock.release()

    def sessions(self) -> list[str]:
        return self.bank.sessions()

    def lost_sessions(self) -> dict[str, str]:
        """Sessions recovery could not restore (id -> reason); their files are kept as found."""
        return dict(self._lost)

    def delete_session(self, session_id: str) -> None:
        """Delete for good: tombstone (durable) first, then memory and snapshots.

        A lost session can be deleted: the operator's way out of DATA_LOSS (its files go with it)."""
        with self._lock:
            if session_id in self._lost and session_id not in self._meta:
                self._tombstone(session_id)
                self._deleted.add(session_id)
                del self._lost[session_id]
                if self.root is not None:
                    shutil.rmtree(self.root / "snapshots" / _session_dirname(session_id), ignore_errors=True)
                return
            meta, _ = self._locked(session_id)
            try:
                self._tombstone(session_id)
                meta.deleted = True
                self._deleted.add(session_id)
                self._meta.pop(session_id, None)
                self.bank.delete(session_id)
            finally:
                meta.lock.release()
            if self.root is not None:
                shutil.rmtree(self.root / "snapshots" / _session_dirname(session_id), ignore_errors=True)

    def _tombstone(self, session_id: str) -> None:
        if self._tombs is not None:
            try:
                self._tombs.append({"sid": session_id})
            except OSError as e:
                self._failed = e
                raise Unavailable(f"shard {self.name}: storage failure") from e

    def export_session(self, session_id: str) -> tuple[SessionSpec, dict[str, Any]]:
        meta, mem = self._locked(session_id)
        try:
            state = mem.export_state()
            if self.kv is not None:
                state["records"] = self.kv.read(state["records"], meta.spec.record_bytes)
                state["record_bytes"] = meta.spec.record_bytes
            return meta.spec, state
        finally:
            meta.lock.release()

    def import_session(self, session_id: str, spec: SessionSpec, state: dict[str, Any]) -> int:
        """Create a session from an export; durable (snapshot + log record) on return."""
        check_session_id(session_id)
        if not self.ready or self._failed is not None:
            raise Unavailable(f"shard {self.name} is not ready")
        mem = SessionMemory.from_state(state)
        if mem.config != spec.memory_config():
            raise InvalidArgument("state", "memory settings do not match the session spec")
        with self._lock:
            if session_id in self._deleted or session_id in self._meta:
                raise AlreadyExists(f"session {session_id!r} exists or was deleted")
            kv_bytes = 0
            if self.kv is not None:  # the K/V go to the data files (durable before the snapshot names them)
                full = mem.export_state()
                refs = self.kv.write(full["records"])
                self.kv.sync()
                kv_bytes = full["records"].nbytes
                mem = SessionMemory.from_state({**full, "records": refs, "record_bytes": REF_BYTES})
            meta = _Meta(spec)
            with meta.lock:
                tmp = None
                if self.root is not None:
                    sdir = self.root / "snapshots" / _session_dirname(session_id)
                    tmp = snapshot.write(
                        sdir,
                        IMPORT_TMP,
                        spec.to_dict(),
                        mem.export_state(),
                        final=False,
                        kv=self._kv_layout(),
                    )
                self.bank.adopt(session_id, mem)
                self._meta[session_id] = meta
                self._log(meta, {"op": "import", "sid": session_id}, kv_bytes)
                if self.kv is not None:
                    self._note_kv(mem.fetch(mem.ids())[0], meta.applied_lsn)
                if tmp is not None:
                    snapshot.publish(tmp, meta.applied_lsn)
                meta.dirty = False
        return len(mem)

    # ----------------------------------------------------------------------------- checkpoint

    def _background_checkpoint(self) -> None:
        try:
            self.checkpoint(already_locked=True)
        except Exception:  # noqa: BLE001 - a failed checkpoint leaves the log intact
            log.exception("shard %s: checkpoint failed", self.name)

    def checkpoint(self, already_locked: bool = False) -> int:
        """Snapshot every changed session, then drop the log segments the snapshots cover."""
        if self._wal is None or self.root is None:
            return 0
        if not already_locked:
            self._checkpointing.acquire()
        try:
            with self._lock:
                cut = self._wal.rotate()
                written = 0
                for sid, meta in list(self._meta.items()):
                    with meta.lock:
                        if not (meta.dirty or meta.searches) or meta.deleted:
                            continue
                        sdir = self.root / "snapshots" / _session_dirname(sid)
                        previous = snapshot.generations(sdir)[:1] if sdir.exists() else []
                        snapshot.write(
                            sdir,
                            meta.applied_lsn,
                            meta.spec.to_dict(),
                            self.bank.get(sid).export_state(),
                            cut=cut,
                            kv=self._kv_layout(),
                        )
                        # Keep one older generation: recovery falls back to it if the new one is damaged.
                        snapshot.remove_older(sdir, min([meta.applied_lsn, *previous]))
                        meta.dirty = False
                        meta.clear_hits()  # in the snapshot's counters now; never log them twice
                        written += 1
                if not self._lost:  # a lost session's log records are evidence: keep every segment
                    self._wal.remove_segments_upto(self._prev_cut)
                    self._remove_unused_kv()
                self._prev_cut = cut
                write_atomic(self.root / CHECKPOINT_FILE, json.dumps({"cut": cut}), mode=0o600)
                return written
        finally:
            self._checkpointing.release()

    def _kv_layout(self) -> str:
        return snapshot.KV_INLINE if self.kv is None else snapshot.KV_FILES

    def _remove_unused_kv(self) -> None:
        """Delete the data files nothing can read any more: no stored chunk, no kept snapshot generation
        and no record of the kept log refers to them (under self._lock, after the log was cut)."""
        if self.kv is None or self.root is None:
            return
        newest = self.kv.active  # writes from now on land here or later: never candidates
        needed: set[int] = set()
        for sid, meta in list(self._meta.items()):
            with meta.lock:
                if not meta.deleted:
                    mem = self.bank.get(sid)
                    needed |= referenced_files(mem.fetch(mem.ids())[0])
        for sdir in (self.root / "snapshots").iterdir():
            for lsn in snapshot.generations(sdir):
                needed |= snapshot.kv_files(sdir / f"{lsn:020d}")
        segs = sorted((self.root / "wal").glob("*.wal"))
        first_kept = int(segs[0].stem) if segs else 0
        needed |= {f for f, lsn in self._kv_lsn.items() if lsn >= first_kept}
        needed |= {f for f in self.kv.files() if f >= newest}
        removed = self.kv.remove_unused(needed)
        self._kv_lsn = {f: lsn for f, lsn in self._kv_lsn.items() if f in needed}
        if removed:
            log.info("shard %s: removed %d unused K/V files", self.name, removed)

    # ------------------------------------------------------------------------------- recovery

    def _recover(self, report: RecoveryReport) -> None:
        assert self.root is not None
        snaps, waldir, tombdir = self.root / "snapshots", self.root / "wal", self.root / "tombstones"
        private_dir(snaps)  # and the shard's root: session ids (folder names) and K/V are private
        if self.kv is not None:
            self.kv.open()  # a fresh active file: K/V moved from older layouts during recovery go there
        tomb_report = ReplayReport()
        self._deleted = (
            {rec.get("sid") for _, rec in replay(tombdir, tomb_report)} if tombdir.exists() else set()
        )
        report.tombstones = len(self._deleted)
        self._prev_cut = int(_read_json(self.root / CHECKPOINT_FILE).get("cut", 0))
        segs = sorted(waldir.glob("*.wal")) if waldir.exists() else []
        log_from = int(segs[0].stem) if segs else None  # first LSN the log may still hold
        max_lsn = 0
        for sdir in sorted(snaps.iterdir()):
            sid = self._load_session_dir(sdir, report, log_from)
            if sid is not None:
                max_lsn = max(max_lsn, self._meta[sid].applied_lsn)
            elif _is_hex(sdir.name):  # lost: never reuse an LSN its snapshots name
                max_lsn = max([max_lsn, *snapshot.generations(sdir)])
        wal_report = ReplayReport()
        if waldir.exists():
            for lsn, rec in replay(waldir, wal_report):
                try:
                    self._replay_one(lsn, rec, snaps, report)
                except _TornKV as e:  # never acknowledged: cut the log here, like a torn tail
                    log.warning("shard %s: %s; the log is cut before lsn %d", self.name, e, lsn)
                    report.kv_torn_records += 1
                    wal_report.dropped_records += 1
                    wal_report.dropped_bytes += truncate_from(waldir, lsn)
                    wal_report.last_lsn = lsn - 1
                    break
            segs = sorted(waldir.glob("*.wal"))
            if segs:
                max_lsn = max(max_lsn, int(segs[-1].stem) - 1)
        report.wal_records = wal_report.records
        report.wal_dropped_records = wal_report.dropped_records
        report.wal_dropped_bytes = wal_report.dropped_bytes
        report.errors += wal_report.errors + tomb_report.errors
        report.sessions_lost = len(self._lost)
        for sid, why in self._lost.items():
            log.error(
                "shard %s: session %r is lost (%s); its files are kept, calls answer DATA_LOSS",
                self.name,
                sid,
                why,
            )
        for sdir in snaps.iterdir():  # leftovers: unacknowledged imports, deleted sessions
            sid = bytes.fromhex(sdir.name).decode(errors="replace") if _is_hex(sdir.name) else None
            if sid in self._lost:
                continue  # evidence: kept as found
            if sid not in self._meta:
                shutil.rmtree(sdir, ignore_errors=True)
            else:
                for p in sdir.glob("*.tmp"):
                    shutil.rmtree(p, ignore_errors=True)
        if self.kv is not None:
            self.kv.sync()  # K/V moved from older layouts: durable before anything names them
        self._wal = WriteAheadLog(waldir, self.fsync, None if self.kv is None else self.kv.sync)
        self._wal.open(max(max_lsn, wal_report.last_lsn) + 1)
        self._wal.bytes_written += report.kv_bytes_replayed  # what the next recovery would read again
        self._tombs = WriteAheadLog(tombdir, "per-append")
        self._tombs.open(tomb_report.last_lsn + 1)

    def _load_session_dir(self, sdir: Path, report: RecoveryReport, log_from: int | None) -> str | None:
        """Load a session's newest intact snapshot generation; an older one only when the log still
        holds every record after it (`log_from`: the first LSN the log holds). Otherwise the session
        is lost (see the module docstring). Returns the session id when loaded."""
        if not _is_hex(sdir.name):
            return None
        sid = bytes.fromhex(sdir.name).decode(errors="replace")
        if sid in self._deleted:
            shutil.rmtree(sdir, ignore_errors=True)
            return None
        self._lost.pop(sid, None)
        damaged: list[str] = []
        for lsn in snapshot.generations(sdir):
            try:
                snap = snapshot.read(sdir / f"{lsn:020d}")
                spec = SessionSpec.from_dict(snap.spec)
                mem = self._memory_from_snapshot(snap, report)
            except (snapshot.SnapshotError, InvalidArgument, KeyError, TypeError, ValueError) as e:
                report.snapshot_errors += 1
                report.errors.append(f"snapshot {sdir.name}/{lsn}: {e}")
                damaged.append(f"generation {lsn}: {e}")
                continue
            # The session's records after an older generation all lie past max(lsn, its checkpoint's cut).
            if damaged and (log_from is None or log_from > max(lsn, snap.cut) + 1):
                damaged.append(f"generation {lsn} is intact but the log no longer holds what followed it")
                break
            migrated = self.kv is not None and snap.kv == snapshot.KV_INLINE
            if migrated:
                mem = self._move_inline_kv(mem, report)
            self.bank.adopt(sid, mem)
            # Loaded from an older generation (or K/V just moved): dirty, so the next checkpoint writes
            # a sound one.
            self._meta[sid] = _Meta(spec, applied_lsn=lsn, dirty=bool(damaged) or migrated)
            report.snapshots_loaded += 1
            return sid
        if damaged:
            self._lost[sid] = "; ".join(damaged)
        return None

    @staticmethod
    def _memory_from_snapshot(snap: snapshot.LoadedSnapshot, report: RecoveryReport) -> SessionMemory:
        """The snapshot's memory, adopting its verified FAISS index; rebuilt when the file is unusable."""
        if snap.index is not None:
            try:
                return SessionMemory.from_state(snap.state, index=snap.index)
            except InvalidArgument as e:
                if e.field != "index":
                    raise
                report.errors.append(f"snapshot index not adopted: {e}")
        if len(snap.state.get("ids", ())):
            report.index_files_rejected += 1
        return SessionMemory.from_state(snap.state)

    def _move_inline_kv(self, mem: SessionMemory, report: RecoveryReport) -> SessionMemory:
        """A memory holding K/V inline (an older version's snapshot) as one holding references."""
        assert self.kv is not None
        state = mem.export_state()
        refs = self.kv.write(state["records"])
        report.kv_migrated_chunks += len(refs)
        return SessionMemory.from_state({**state, "records": refs, "record_bytes": REF_BYTES})

    def _replay_one(self, lsn: int, rec: dict[str, Any], snaps: Path, report: RecoveryReport) -> None:
        sid, op = rec.get("sid"), rec.get("op")
        if self.kv is not None and "ref" in rec and isinstance(rec["ref"], bytes):
            self._note_kv(np.frombuffer(rec["ref"], np.uint8), lsn)  # kept log: its files are kept
        if sid in self._lost and op == "create":  # the log still holds the whole session: rebuild it
            report.errors.append(f"session {sid!r}: rebuilt from the log ({self._lost.pop(sid)})")
        if sid in self._deleted or sid in self._lost:
            return
        meta = self._meta.get(sid)
        if meta is not None and lsn <= meta.applied_lsn:
            return
        try:
            if op == "create":
                if meta is None:
                    self.bank.create(sid, self._config(SessionSpec.from_dict(rec["spec"])))
                    self._meta[sid] = meta = _Meta(SessionSpec.from_dict(rec["spec"]))
            elif op == "import":
                tmp = snaps / _session_dirname(sid) / f"{IMPORT_TMP:020d}.tmp"
                if tmp.exists():
                    snapshot.publish(tmp, lsn)
                if meta is not None:
                    self._meta.pop(sid)
                    self.bank.delete(sid)
                loaded = self._load_session_dir(snaps / _session_dirname(sid), report, lsn)
                if loaded is None:
                    raise FailedPrecondition(f"import snapshot of {sid!r} at lsn {lsn} is missing")
                meta = self._meta[sid]
            elif meta is None:
                raise NotFound(f"record {op!r} for unknown session {sid!r}")
            else:
                self._apply(sid, meta, op, rec, report)
            meta.applied_lsn = lsn
            meta.dirty = True
        except _TornKV:
            raise
        except Exception as e:  # noqa: BLE001 - recovery counts what it cannot apply and goes on
            report.errors.append(f"lsn {lsn} {op} {sid}: {type(e).__name__}: {e}")

    def _replayed_records(
        self, spec: SessionSpec, rec: dict[str, Any], n: int, report: RecoveryReport
    ) -> np.ndarray:
        """An append record's records for the core: references checked against the K/V files (_TornKV
        when they fail), or inline K/V (older versions), moved to the K/V files when there are some."""
        if "ref" in rec:
            refs = _arr(rec["ref"], np.uint8, n, REF_BYTES)
            if self.kv is None:
                raise FailedPrecondition("a record refers to K/V files but the shard has none")
            try:
                self.kv.read(refs, spec.record_bytes)
            except DataLoss as e:
                raise _TornKV(str(e)) from None
            report.kv_bytes_replayed += n * spec.record_bytes
            return refs
        records = _arr(rec["rec"], np.uint8, n, spec.record_bytes)
        if self.kv is None:
            return records
        report.kv_migrated_chunks += n
        return self.kv.write(records)

    def _apply(self, sid: str, meta: _Meta, op: str, rec: dict[str, Any], report: RecoveryReport) -> None:
        spec, mem = meta.spec, self.bank.get(sid)
        records = None
        if op == "append":  # checked first: a record with torn K/V changes nothing
            records = self._replayed_records(spec, rec, len(rec["ids"]) // 8, report)
        if "searches" in rec:  # retrievals since the previous record happened before this change
            mem.credit(
                _arr(rec["hits"], np.int64, -1),
                _arr(rec["hit_n"], np.int64, -1),
                searches=rec["searches"],
                queries=rec["queries"],
            )
        if op == "append":
            ids = _arr(rec["ids"], np.int64, -1)
            mem.remove(_arr(rec["evicted"], np.int64, -1))
            mem.append(
                ids,
                _arr(rec["emb"], np.float32, len(ids), spec.dim),
                records,
                _arr(rec["len"], np.int32, len(ids)),
            )
        elif op == "pin":
            ids = _arr(rec["ids"], np.int64, -1)
            (mem.pin if rec["on"] else mem.unpin)(ids)
        elif op == "evict":
            mem.remove(_arr(rec["ids"], np.int64, -1))
        elif op == "retire":
            mem.retire(rec["first"], rec["end"])
        elif op != "credit":
            raise ValueError(f"unknown op {op!r}")


def _is_hex(name: str) -> bool:
    try:
        bytes.fromhex(name)
    except ValueError:
        return False
    return bool(name)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
