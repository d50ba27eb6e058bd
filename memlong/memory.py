"""The memory bank: per-session chunk memory of MemLong (arXiv 2408.16967), as a pure core.

A session's memory holds, for every stored chunk, its retriever embedding (for search) and an
opaque K/V record (the memory layer's keys and values, which the decoder attends to). Chunks are
keyed by *stable chunk ids*: the caller's chunk sequence numbers. The pieces:

- a FAISS `IndexIDMap2(IndexFlatIP)` keyed by chunk id. `remove_ids` on a bare flat index renumbers
  the vectors behind the removed ones; the id map keeps the ids we get back stable;
- slabs of embeddings and K/V records addressed by *slot*; evicted slots go on a free list, so an
  eviction never moves the (large) records;
- chronological metadata (id, slot, retrieval counter, pin, length) kept sorted by id, so id -> slot
  is one vectorised `searchsorted`;
- the MemLong paper's eviction policy: keep the newest band, drop the oldest small band,
  then the least-retrieved chunks in between; pinned chunks are never evicted.

Search is exact: FAISS proposes candidates, which are rescored in float64 and ranked with ties
broken by chunk order, and the candidate set is widened until no chunk outside it could still
enter the top-k. Results equal a NumPy brute force over the stored chunks.

No grpc, no file system, no torch. Not thread-safe: the host serialises calls per session.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from memlong.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from memlong.ids import check_session_id

if TYPE_CHECKING:
    from memlong.gpu_index import GpuIndexes

STATE_VERSION = 1
MAX_ACCEPTED_RUNS = 4096  # history of accepted ids, as runs of consecutive ids, per session
# Inputs above this magnitude could overflow float32 dot products inside FAISS (1e16^2 * dim).
MAX_ABS_VALUE = 1e16
# Unit roundoff of float32: bounds FAISS's score error when deciding if a candidate set is complete.
_F32_UNIT = 2.0**-24

# FAISS's OpenMP threads. OpenMP keeps the count per thread: `faiss.omp_set_num_threads` in one thread
# leaves every other one (a server's workers, a prefetch pool) at OpenMP's default of all cores, whose
# idle threads spin after each search. So the count is recorded here and each thread applies it to
# itself before its first FAISS call.
_faiss_threads: int | None = None  # None: OpenMP's default
_thread_state = threading.local()


def set_faiss_threads(n: int | None) -> None:
    """Threads every FAISS call of this process uses, whichever thread makes it (None: OpenMP's
    default)."""
    global _faiss_threads
    if n is not None and (not _is_int(n) or n < 1):
        raise InvalidArgument("faiss_threads", f"must be a positive integer, got {n!r}")
    _faiss_threads = n
    if n is not None:
        _apply_faiss_threads()


def _apply_faiss_threads() -> None:
    """Give this thread the count `set_faiss_threads` chose (once per thread and count)."""
    n = _faiss_threads
    if n is not None and getattr(_thread_state, "faiss_threads", None) != n:
        faiss.omp_set_num_threads(n)
        _thread_state.faiss_threads = n


# ----------------------------------------------------------------------------------------- helpers


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def _band(fraction: float, memory_size: int) -> int:
    """Chunks in a band of `fraction * memory_size`, rounded up (the epsilon absorbs 0.07*100 > 7)."""
    return max(0, math.ceil(fraction * memory_size - 1e-9))


def _check_array(field: str, x: Any, dtype: type, shape: tuple[int | None, ...]) -> np.ndarray:
    """`x` as a C-contiguous array of exactly `dtype` and `shape` (None: any length), else InvalidArgument."""
    if not isinstance(x, np.ndarray):
        raise InvalidArgument(field, f"expected a numpy array, got {type(x).__name__}")
    if x.dtype != np.dtype(dtype):
        raise InvalidArgument(field, f"dtype must be {np.dtype(dtype).name}, got {x.dtype.name}")
    if x.ndim != len(shape) or any(w is not None and w != s for w, s in zip(shape, x.shape, strict=True)):
        want = "(" + ", ".join("n" if w is None else str(w) for w in shape) + ")"
        raise InvalidArgument(field, f"shape must be {want}, got {x.shape}")
    return np.ascontiguousarray(x)


def _check_vectors(field: str, x: Any, dim: int) -> np.ndarray:
    """(n, dim) float32, finite and bounded in magnitude."""
    x = _check_array(field, x, np.float32, (None, dim))
    if not np.isfinite(x).all():
        raise InvalidArgument(field, "contains NaN or Inf")
    if x.size and np.abs(x).max() > MAX_ABS_VALUE:
        raise InvalidArgument(field, f"values must be at most {MAX_ABS_VALUE:g} in magnitude")
    return x


def _as_ids(field: str, ids: Any) -> np.ndarray:
    """Any 0-d/1-d integer array-like as (n,) int64."""
    arr = np.asarray(ids)
    if arr.size and (arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer)):
        raise InvalidArgument(field, f"must be integers, got {arr.dtype.name}")
    if arr.ndim > 1:
        raise InvalidArgument(field, f"must be 1-d, got shape {arr.shape}")
    return arr.astype(np.int64).reshape(-1)  # (n,)


# ---------------------------------------------------------------------------------- config, result


@dataclass(frozen=True)
class MemoryConfig:
    """Shape and policy of one session's memory.

    dim: retriever embedding width (384 for all-MiniLM-L6-v2).
    record_bytes: bytes of one chunk's K/V record, opaque to the bank
        (e.g. 2 * n_kv_heads * chunk * head_dim * itemsize).
    memory_size: the most chunks one session stores.
    protect_newest: fraction of memory_size; the newest chunks are never evicted.
    drop_oldest: fraction of memory_size; an eviction round drops this oldest band first.
    evict_free: fraction of memory_size freed by one eviction round (at least one chunk).
    """

    dim: int
    record_bytes: int
    memory_size: int
    protect_newest: float = 0.25
    drop_oldest: float = 0.05
    evict_free: float = 0.25

    def __post_init__(self) -> None:
        for name, hi in (("dim", 1 << 16), ("record_bytes", 1 << 28), ("memory_size", 1 << 31)):
            v = getattr(self, name)
            if not _is_int(v) or not 0 < v <= hi:
                raise InvalidArgument(name, f"must be an integer in 1..{hi}, got {v!r}")
        for name, lo_open, hi_open in (
            ("protect_newest", False, True),
            ("drop_oldest", False, False),
            ("evict_free", True, False),
        ):
            v = getattr(self, name)
            ok = _is_real(v) and math.isfinite(v) and (0 < v if lo_open else 0 <= v)
            ok = ok and (v < 1 if hi_open else v <= 1)
            if not ok:
                rng = f"{'(' if lo_open else '['}0, 1{')' if hi_open else ']'}"
                raise InvalidArgument(name, f"must be a fraction in {rng}, got {v!r}")

    @property
    def n_protect(self) -> int:
        """Size of the newest band, in chunks."""
        return _band(self.protect_newest, self.memory_size)

    @property
    def n_oldest(self) -> int:
        """Size of the oldest band, in chunks."""
        return _band(self.drop_oldest, self.memory_size)

    @property
    def n_evict(self) -> int:
        """Chunks one eviction round frees (at least one)."""
        return max(1, _band(self.evict_free, self.memory_size))


@dataclass(frozen=True)
class SearchResult:
    """Top-k chunks per query, each row in chronological order (ascending id).

    ids: (q, k) int64 chunk ids; -1 padding when fewer than k chunks are stored.
    scores: (q, k) float32 inner products aligned with ids; padding -inf.
    records: (q, k, record_bytes) uint8 K/V record of each id; padding rows zero.
    lengths: (q, k) int32 valid tokens in each chunk; padding 0.
    """

    ids: np.ndarray
    scores: np.ndarray
    records: np.ndarray
    lengths: np.ndarray


@dataclass(frozen=True)
class AppendPlan:
    """An append batch that passed every check of `SessionMemory.plan_append`, and what storing it does.

    Made for one memory in one state: `SessionMemory.apply` refuses it once that memory changed
    (another append, an eviction, a search's counters), so the checks it stands for still hold.
    ids: (n,) int64; embeddings: (n, dim) float32; lengths: (n,) int32: the checked batch.
    records: (n, record_bytes) uint8 when planned with them, else None (`apply` takes them).
    n_old: how many of the batch are replays (a prefix). evicted: (e,) ids the append evicts, ascending.
    """

    ids: np.ndarray
    embeddings: np.ndarray
    lengths: np.ndarray
    records: np.ndarray | None
    n_old: int
    evicted: np.ndarray
    evict_pos: np.ndarray  # chronological positions of `evicted` in the memory it was made for
    memory: SessionMemory  # the memory it was made for, and that memory's generation then
    generation: int

    @property
    def n_new(self) -> int:
        """Chunks the append stores."""
        return len(self.ids) - self.n_old

    @property
    def new(self) -> slice:
        """The batch's new chunks (replays form a prefix)."""
        return slice(self.n_old, len(self.ids))


class _PendingRows:
    """Row-aligned arrays of pending chunks, grown geometrically: an add writes only its own rows.

    Rows below a holder's `used` are never written again, so a copy of a PendingChunks shares them
    (each PendingChunks reads only its own first n rows)."""

    def __init__(self, capacity: int, dim: int) -> None:
        self.ids = np.empty(capacity, np.int64)  # (cap,)
        self.emb = np.empty((capacity, dim), np.float64)  # (cap, dim), exact copies of the float32 given
        self.lens = np.empty(capacity, np.int32)  # (cap,)
        self.part = np.empty(capacity, np.int64)  # (cap,) which add a row came from (its records)
        self.row = np.empty(capacity, np.int64)  # (cap,) the row within that add
        self.used = 0

    def grown(self, n: int, capacity: int) -> _PendingRows:
        """A new holder of `capacity` rows with the first `n` of this one."""
        other = _PendingRows(capacity, self.emb.shape[1])
        for name in ("ids", "emb", "lens", "part", "row"):
            getattr(other, name)[:n] = getattr(self, name)[:n]
        other.used = n
        return other


class PendingChunks:
    """Chunks held beside a memory without being written to it, merged into its search results.

    A read that must not change the memory (a served score or generate, a forked reader in an
    evaluation) keeps its own chunks here; the union of two top-k lists contains the top-k of the union,
    so `merge` is exact. Ranking as `SessionMemory.search`: score descending, then the older id.
    Chunks are kept in arrays that grow as they are added, so a search does not rebuild them: over a
    session's chunks, adds cost linear time in all and each merge is one pass over what is held.
    Adds come from one thread; a `copy` may merge on another meanwhile.
    """

    def __init__(self) -> None:
        self._n = 0  # rows of self._rows that are this object's
        self._rows: _PendingRows | None = None
        self._owner = True  # copies never write into shared rows: their first add takes its own
        self._rec: list[np.ndarray] = []  # (n_i, record_bytes) per add, as given

    def add(self, ids: np.ndarray, embeddings: np.ndarray, records: np.ndarray, lengths: np.ndarray) -> None:
        """Hold chunks. The records are kept as given, not copied (MBs each with per-layer memory): the
        caller hands them over and never changes them afterwards."""
        ids = np.array(ids, np.int64).reshape(-1)  # (m,)
        emb = np.array(embeddings, np.float32)  # (m, dim)
        lens = np.array(lengths, np.int32).reshape(-1)  # (m,)
        n, m = self._n, len(ids)
        rows = self._rows
        if rows is None:
            rows = _PendingRows(max(16, 2 * m), emb.shape[1])
        elif not self._owner or rows.used != n or n + m > len(rows.ids):
            rows = rows.grown(n, max(16, 2 * (n + m)))
        rows.ids[n : n + m], rows.emb[n : n + m], rows.lens[n : n + m] = ids, emb, lens
        rows.part[n : n + m], rows.row[n : n + m] = len(self._rec), np.arange(m)
        rows.used = self._n = n + m
        self._rows, self._owner = rows, True
        self._rec.append(np.asarray(records, np.uint8))

    def copy(self) -> PendingChunks:
        """The chunks added so far (arrays shared, never modified): later adds do not reach the copy."""
        other = PendingChunks()
        other._n, other._rows, other._owner, other._rec = self._n, self._rows, False, list(self._rec)
        return other

    def merge(self, queries: np.ndarray, stored: SearchResult, top_k: int) -> SearchResult:
        """Top-k of (stored rows ∪ these chunks) per query row, each row chronological."""
        if not self._rec:
            return stored
        assert self._rows is not None
        queries = np.asarray(queries, np.float32)
        m = self._n
        ids, emb, lens = self._rows.ids[:m], self._rows.emb[:m], self._rows.lens[:m]  # (m,), (m, dim), (m,)
        # (part, row) of each pending chunk: only the records chosen are copied (they are MBs each)
        part, row_in_part = self._rows.part[:m], self._rows.row[:m]  # (m,) each
        local = (emb[None] * queries.astype(np.float64)[:, None, :]).sum(axis=2).astype(np.float32)  # (q, m)
        q = len(queries)
        picks = []  # per row: (stored columns, pending chunks not in them, chosen candidates)
        for row in range(q):
            valid = np.flatnonzero(stored.ids[row] >= 0)  # (s,) columns of the stored result
            fresh = np.flatnonzero(~np.isin(ids, stored.ids[row][valid]))  # in both: counts once
            cand_ids = np.concatenate([stored.ids[row][valid], ids[fresh]])
            cand_scores = np.concatenate([stored.scores[row][valid], local[row][fresh]])
            best = np.lexsort((cand_ids, -cand_scores))[:top_k]
            picks.append((valid, fresh, best[np.argsort(cand_ids[best])]))  # chronological
        if stored.ids.shape == (q, top_k) and all(
            len(b) == len(v) and np.array_equal(v, np.arange(len(v))) and np.array_equal(b, v)
            for v, _, b in picks
        ):
            return stored  # none of these chunks made it: the stored rows as they are (no record copied)
        out = SearchResult(
            ids=np.full((q, top_k), -1, np.int64),
            scores=np.full((q, top_k), -np.inf, np.float32),
            records=np.zeros((q, top_k, self._rec[0].shape[1]), np.uint8),
            lengths=np.zeros((q, top_k), np.int32),
        )
        for row, (valid, fresh, best) in enumerate(picks):
            cand_ids = np.concatenate([stored.ids[row][valid], ids[fresh]])
            cand_scores = np.concatenate([stored.scores[row][valid], local[row][fresh]])
            cand_len = np.concatenate([stored.lengths[row][valid], lens[fresh]])
            n = len(best)
            out.ids[row, :n], out.scores[row, :n] = cand_ids[best], cand_scores[best]
            out.lengths[row, :n] = cand_len[best]
            for col, b in enumerate(best):
                if b < len(valid):
                    out.records[row, col] = stored.records[row][valid[b]]
                else:
                    j = fresh[b - len(valid)]
                    out.records[row, col] = self._rec[part[j]][row_in_part[j]]
        return out


# ---------------------------------------------------------------------------------------- eviction


def plan_eviction(
    counters: np.ndarray, pinned: np.ndarray, n_protect: int, n_oldest: int, n_free: int
) -> np.ndarray:
    """Positions (into chronological arrays) of the chunks one eviction round drops, ascending.

    counters, pinned: (n,) per stored chunk, oldest first. Candidates are the unpinned chunks outside
    the newest `n_protect`. The oldest `n_oldest` candidates go first, then the least-retrieved of
    the rest (ties: older first) until `n_free` are chosen. Returns fewer when candidates run out.
    """
    n = len(counters)
    movable = ~pinned  # (n,)
    movable[max(0, n - n_protect) :] = False
    cand = np.flatnonzero(movable)  # (c,) chronological
    if len(cand) <= n_free:
        return cand
    oldest = cand[: min(n_oldest, n_free)]
    rest = cand[len(oldest) :]
    by_use = np.lexsort((rest, counters[rest]))  # primary: counter, then age
    chosen = rest[by_use[: n_free - len(oldest)]]
    return np.sort(np.concatenate([oldest, chosen]))


# ----------------------------------------------------------------------------------------- session


class SessionMemory:
    """One session's memory: FAISS index keyed by stable chunk ids + K/V slab + counters + pins.

    Invariants, kept through every append, eviction and import: the index, the chronological
    metadata and the slabs hold exactly the same ids; the slot of an id holds that id's embedding
    and record; never more than `memory_size` chunks are stored.
    """

    def __init__(self, config: MemoryConfig) -> None:
        if not isinstance(config, MemoryConfig):
            raise InvalidArgument("config", f"expected MemoryConfig, got {type(config).__name__}")
        self.config = config
        # FAISS's IndexIDMap2 over a flat index, or a GpuFlatIndex (memlong.gpu_index): the same calls
        self._index: Any = faiss.IndexIDMap2(faiss.IndexFlatIP(config.dim))
        # Chronological metadata, one entry per stored chunk, sorted by id.
        self._ids = np.empty(0, np.int64)  # (n,)
        self._slots = np.empty(0, np.int64)  # (n,)
        self._counters = np.empty(0, np.int64)  # (n,)
        self._pinned = np.empty(0, np.bool_)  # (n,)
        self._lengths = np.empty(0, np.int32)  # (n,)
        # Slabs addressed by slot; they grow geometrically up to memory_size.
        self._emb = np.empty((0, config.dim), np.float32)  # (cap, dim)
        self._rec = np.empty((0, config.record_bytes), np.uint8)  # (cap, record_bytes)
        self._free = np.empty(0, np.int64)  # free slots, used from the end
        # An upper bound on stored embedding norms (never lowered), for the exactness check.
        self._max_norm = 0.0
        self._max_id = -1
        # Every id ever accepted, as sorted inclusive runs [first, last]: (k, 2) int64. Tells a replay
        # (an accepted id, stored or evicted) from an id that arrives late and was never stored.
        self._accepted = np.empty((0, 2), np.int64)
        self._eviction_rounds = 0
        self._evicted_chunks = 0
        self._searches = 0
        self._queries = 0
        # Bumped by every change an append plan depends on (chunks, counters, pins, accepted ids).
        self._generation = 0

    # ------------------------------------------------------------------------------- lookups

    def __len__(self) -> int:
        return len(self._ids)

    def ids(self) -> np.ndarray:
        """Stored chunk ids, ascending: (n,) int64."""
        return self._ids.copy()

    def _positions(self, ids: Any, field: str = "ids") -> np.ndarray:
        """Chronological positions of `ids`, (n,) int64; NotFound names the first unknown ids."""
        ids = _as_ids(field, ids)
        pos = np.searchsorted(self._ids, ids)  # (n,)
        found = pos < len(self._ids)
        found[found] = self._ids[pos[found]] == ids[found]
        if not found.all():
            missing = ids[~found][:8].tolist()
            raise NotFound(f"chunk ids not in memory: {missing}")
        return pos

    def fetch(self, ids: Any) -> tuple[np.ndarray, np.ndarray]:
        """(records (n, record_bytes) uint8, lengths (n,) int32) of `ids`; counters unchanged."""
        pos = self._positions(ids)
        return np.take(self._rec, self._slots[pos], axis=0), self._lengths[pos].copy()

    def counters(self, ids: Any) -> np.ndarray:
        """Retrieval counts of `ids`: (n,) int64."""
        return self._counters[self._positions(ids)].copy()

    def pin(self, ids: Any) -> None:
        """Pinned chunks are never evicted (they stay searchable). Unknown id: NotFound, no change."""
        self._pinned[self._positions(ids)] = True
        self._generation += 1

    def unpin(self, ids: Any) -> None:
        """Make chunks evictable again. Unknown id: NotFound, no change."""
        self._pinned[self._positions(ids)] = False
        self._generation += 1

    def credit(self, ids: Any, counts: Any, searches: int = 0, queries: int = 0) -> None:
        """Add retrievals that happened elsewhere (replay of logged counters): all or nothing.

        ids: (r,) distinct stored chunk ids; counts: (r,) non-negative increments of their retrieval
        counters; searches, queries: added to the statistics. Unknown ids are NotFound.
        """
        ids = _as_ids("ids", ids)  # (r,)
        counts = _as_ids("counts", counts)  # (r,)
        if len(counts) != len(ids):
            raise InvalidArgument("counts", f"has {len(counts)} entries but ids has {len(ids)}")
        if len(counts) and counts.min() < 0:
            raise InvalidArgument("counts", "must be non-negative")
        if len(np.unique(ids)) != len(ids):
            raise InvalidArgument("ids", "must not repeat an id")
        for name, v in (("searches", searches), ("queries", queries)):
            if not _is_int(v) or v < 0:
                raise InvalidArgument(name, f"must be a non-negative integer, got {v!r}")
        pos = self._positions(ids)
        self._counters[pos] += counts
        self._generation += 1
        self._searches += int(searches)
        self._queries += int(queries)

    def stats(self) -> dict[str, int]:
        """Counts for metrics: stored and pinned chunks, evictions, searches, payload bytes, max id."""
        n = len(self)
        return {
            "chunks": n,
            "pinned": int(self._pinned.sum()),
            "memory_size": self.config.memory_size,
            "eviction_rounds": self._eviction_rounds,
            "evicted_chunks": self._evicted_chunks,
            "searches": self._searches,
            "queries": self._queries,
            "bytes": n * (self.config.record_bytes + 4 * self.config.dim + 4),
            "max_id": self._max_id,
        }

    # -------------------------------------------------------------------------------- append

    def _check_batch(
        self, ids: Any, embeddings: Any, records: Any, lengths: Any, with_records: bool = True
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
        """Validate one append batch as a whole; returns contiguous arrays. Changes nothing.

        with_records False: the records are neither checked nor returned (None)."""
        ids = _check_array("ids", ids, np.int64, (None,))  # (n,)
        n = len(ids)
        embeddings = _check_vectors("embeddings", embeddings, self.config.dim)  # (n, dim)
        records = (
            _check_array("records", records, np.uint8, (None, self.config.record_bytes))
            if with_records
            else None
        )
        lengths = _check_array("lengths", lengths, np.int32, (None,))  # (n,)
        for field, arr in (("embeddings", embeddings), ("records", records), ("lengths", lengths)):
            if arr is not None and len(arr) != n:
                raise InvalidArgument(field, f"batch has {len(arr)} rows but ids has {n}")
        if n and ids.min() < 0:
            raise InvalidArgument("ids", "chunk ids must be >= 0")
        if n > 1 and not (np.diff(ids) > 0).all():
            raise InvalidArgument("ids", "chunk ids in a batch must be strictly increasing")
        if n and lengths.min() < 1:
            raise InvalidArgument("lengths", "every chunk must hold at least one token")
        return ids, embeddings, records, lengths

    def _check_replays(
        self, ids: np.ndarray, embeddings: np.ndarray, records: np.ndarray | None, lengths: np.ndarray
    ) -> None:
        """FailedPrecondition for an id never accepted; AlreadyExists if a stored id arrives with
        different bytes (records None: their bytes are not compared)."""
        run = np.searchsorted(self._accepted[:, 0], ids, side="right") - 1  # (r,) run that may hold it
        known = (run >= 0) & (ids <= self._accepted[np.maximum(run, 0), 1])
        if not known.all():
            late = ids[~known][:8].tolist()
            raise FailedPrecondition(
                f"chunk ids {late} are below the highest accepted id {self._max_id} and were never "
                "stored: ids must be sent in increasing order"
            )
        pos = np.searchsorted(self._ids, ids)  # (r,)
        held = pos < len(self._ids)
        held[held] = self._ids[pos[held]] == ids[held]
        if not held.any():
            return  # every replay refers to an evicted chunk: nothing left to compare
        pos, rows = pos[held], np.flatnonzero(held)
        slots = self._slots[pos]
        # Compare bytes, not values: -0.0 vs 0.0 is a different write.
        same = (self._emb[slots].view(np.uint32) == embeddings[rows].view(np.uint32)).all(axis=1)
        if records is not None:
            same &= (self._rec[slots] == records[rows]).all(axis=1)
        same &= self._lengths[pos] == lengths[rows]
        if not same.all():
            bad = ids[rows[~same]][:8].tolist()
            raise AlreadyExists(f"chunk ids already stored with different content: {bad}")

    def append(
        self, ids: np.ndarray, embeddings: np.ndarray, records: np.ndarray, lengths: np.ndarray
    ) -> int:
        """Store chunks; returns how many were newly stored.

        ids: (n,) int64 >= 0, strictly increasing: the caller's chunk sequence numbers.
        embeddings: (n, dim) float32 finite. records: (n, record_bytes) uint8. lengths: (n,) int32 >= 1.

        An id that was accepted before is a replay: a no-op when the stored chunk has the same bytes
        (or was evicted, so there is nothing to compare), AlreadyExists when it differs. An id below
        the highest accepted that was never accepted arrives out of order: FailedPrecondition naming
        it, and nothing of the batch is stored. New ids must exceed every id ever accepted.

        When the new chunks would overflow memory_size, one eviction round frees
        max(evict_free * memory_size, overflow) chunks; the newest band is counted over the memory
        as it will be after this append. If even that cannot make room (pinned and protected
        chunks), ResourceExhausted. Any error leaves the memory unchanged.
        """
        return self.apply(self.plan_append(ids, embeddings, lengths, records))

    def plan_append(self, ids: Any, embeddings: Any, lengths: Any, records: Any = None) -> AppendPlan:
        """Run every check `append` runs, changing nothing; the checked batch as a plan for `apply`.

        For a caller that keeps the K/V elsewhere and must refuse a batch before writing it there
        (ret-mem's data files): records None skips the records' own checks (their width, and a
        replay's stored bytes), which that caller then makes itself, handing the records to `apply`.
        Raises what `append` raises."""
        with_records = records is not None
        ids, embeddings, records, lengths = self._check_batch(ids, embeddings, records, lengths, with_records)
        n_old = int(np.searchsorted(ids, self._max_id, side="right"))  # replays form a prefix
        old = slice(0, n_old)
        self._check_replays(
            ids[old], embeddings[old], None if records is None else records[old], lengths[old]
        )
        m = len(ids) - n_old
        evict_pos = self._plan_room(m) if m else np.empty(0, np.int64)
        return AppendPlan(
            ids, embeddings, lengths, records, n_old, self._ids[evict_pos], evict_pos, self, self._generation
        )

    def apply(self, plan: AppendPlan, records: Any = None) -> int:
        """Store a batch `plan_append` checked; returns how many chunks were newly stored.

        records: the batch's (n, record_bytes) uint8 records when the plan was made without them
        (only their shape is checked here: the caller compared a replay's bytes), else None.
        A plan made for another memory, or before this memory last changed, is refused (RuntimeError:
        a caller's bug, not a client's). Nothing below the checks raises: the batch is stored whole."""
        if plan.memory is not self or plan.generation != self._generation:
            raise RuntimeError("append plan is stale: the memory changed since it was made")
        if (plan.records is None) == (records is None):
            raise RuntimeError("records must come with the plan or with apply, once")
        if records is None:
            records = plan.records
        else:
            records = _check_array("records", records, np.uint8, (len(plan.ids), self.config.record_bytes))
        new = plan.new
        if plan.n_new == 0:
            return 0
        if len(plan.evict_pos):
            self._drop(plan.evict_pos)
        self._store(plan.ids[new], plan.embeddings[new], records[new], plan.lengths[new])
        return plan.n_new

    def _plan_room(self, m: int) -> np.ndarray:
        """Positions to evict so that `m` new chunks fit; ResourceExhausted when impossible."""
        cfg = self.config
        if m > cfg.memory_size:
            raise ResourceExhausted(f"batch of {m} new chunks exceeds memory_size {cfg.memory_size}")
        need = len(self) + m - cfg.memory_size
        if need <= 0:
            return np.empty(0, np.int64)
        # The new chunks are the newest: they take their share of the protected band.
        n_protect = max(0, cfg.n_protect - m)
        pos = plan_eviction(
            self._counters, self._pinned.copy(), n_protect, cfg.n_oldest, max(cfg.n_evict, need)
        )
        if len(pos) < need:
            raise ResourceExhausted(
                f"memory full: {need} chunks must go but only {len(pos)} are neither pinned nor protected"
            )
        return pos

    def _store(
        self,
        ids: np.ndarray,
        embeddings: np.ndarray,
        records: np.ndarray,
        lengths: np.ndarray,
        indexed: bool = False,
    ) -> None:
        """Write already validated new chunks (ids above every stored id) into free slots.

        indexed: the FAISS index already holds exactly these vectors (a verified pre-built index).
        """
        m = len(ids)
        slots = self._take_slots(m)  # (m,)
        self._emb[slots] = embeddings
        self._rec[slots] = records
        if not indexed:
            _apply_faiss_threads()
            self._index.add_with_ids(embeddings, ids)
        self._ids = np.concatenate([self._ids, ids])
        self._slots = np.concatenate([self._slots, slots])
        self._counters = np.concatenate([self._counters, np.zeros(m, np.int64)])
        self._pinned = np.concatenate([self._pinned, np.zeros(m, np.bool_)])
        self._lengths = np.concatenate([self._lengths, lengths])
        norms = np.sqrt(np.einsum("nd,nd->n", embeddings, embeddings, dtype=np.float64))  # (m,)
        self._max_norm = max(self._max_norm, float(norms.max()))
        self._max_id = int(ids[-1])
        self._accept(ids)
        self._generation += 1

    def _accept(self, ids: np.ndarray) -> None:
        """Add new ids (strictly increasing, above every accepted id) to the accepted runs.

        Runs beyond MAX_ACCEPTED_RUNS merge the two oldest: the gap between them then counts as
        accepted (a late id there is a no-op, as before this history existed), so the history
        stays bounded whatever the client sends."""
        breaks = np.flatnonzero(np.diff(ids) != 1) + 1
        starts, ends = ids[np.r_[0, breaks]], ids[np.r_[breaks - 1, len(ids) - 1]]
        runs = np.stack([starts, ends], axis=1)  # (k, 2)
        acc = self._accepted
        if len(acc) and acc[-1, 1] + 1 == runs[0, 0]:
            acc = acc.copy()
            acc[-1, 1] = runs[0, 1]
            runs = runs[1:]
        self._accepted = _bounded_runs(np.concatenate([acc, runs]))

    def _take_slots(self, m: int) -> np.ndarray:
        """`m` free slots, growing the slabs (geometrically, capped at memory_size) when needed."""
        short = m - len(self._free)
        if short > 0:
            cap = len(self._emb)
            new_cap = min(self.config.memory_size, max(2 * cap, cap + short, 16))
            emb = np.empty((new_cap, self.config.dim), np.float32)  # (new_cap, dim)
            rec = np.zeros((new_cap, self.config.record_bytes), np.uint8)  # (new_cap, record_bytes)
            emb[:cap], rec[:cap] = self._emb, self._rec
            self._emb, self._rec = emb, rec
            # Lower slots last in the stack, so they are used first.
            self._free = np.concatenate([np.arange(new_cap - 1, cap - 1, -1, dtype=np.int64), self._free])
        slots = self._free[len(self._free) - m :][::-1].copy()  # (m,)
        self._free = self._free[: len(self._free) - m]
        return slots

    # ------------------------------------------------------------------------------ eviction

    def evict(self, n_free: int | None = None) -> np.ndarray:
        """Run one eviction round now; returns the evicted ids, ascending.

        Frees up to `n_free` chunks (default: evict_free * memory_size), fewer when the rest are
        pinned or in the newest band (newest protect_newest * memory_size stored chunks).
        """
        if n_free is None:
            n_free = self.config.n_evict
        if not _is_int(n_free) or n_free < 0:
            raise InvalidArgument("n_free", f"must be a non-negative integer, got {n_free!r}")
        cfg = self.config
        pos = plan_eviction(self._counters, self._pinned.copy(), cfg.n_protect, cfg.n_oldest, int(n_free))
        evicted = self._ids[pos].copy()
        if len(pos):
            self._drop(pos)
        return evicted

    def retire(self, first: int, end: int) -> None:
        """Count every id in [first, end) as accepted, stored or not: a later append of one is a replay
        (a no-op), never a new chunk. Rolling back a write whose writer may still be running (a cancelled
        ingest) removes its chunks and retires their ids, so that nothing it sends later is stored."""
        if not (_is_int(first) and _is_int(end)) or not 0 <= first < end:
            raise InvalidArgument("id_range", f"need 0 <= first < end, got [{first}, {end})")
        first, last = int(first), int(end) - 1
        acc = self._accepted
        keep = (acc[:, 1] < first - 1) | (acc[:, 0] > last + 1)  # runs that neither overlap nor touch
        touch = acc[~keep]
        if len(touch):
            first, last = min(first, int(touch[:, 0].min())), max(last, int(touch[:, 1].max()))
        runs = np.concatenate([acc[keep], [[first, last]]]).astype(np.int64)
        self._accepted = _bounded_runs(runs[np.argsort(runs[:, 0], kind="stable")])
        self._max_id = max(self._max_id, last)
        self._generation += 1

    def remove(self, ids: Any) -> None:
        """Remove exactly `ids` (any order, no repeats) from index, metadata and slabs.

        For replaying a logged eviction (and for callers that choose what to drop themselves). It
        counts in the statistics as one eviction round of len(ids) chunks, so that replaying an
        eviction through `remove` reproduces the live memory's `stats()` exactly. All or nothing:
        unknown ids are NotFound, repeated ids InvalidArgument, pinned ids FailedPrecondition (pinned
        chunks are never evicted), and any of these leaves the memory unchanged. Empty: a no-op.
        """
        ids = _as_ids("ids", ids)  # (r,)
        if len(ids) == 0:
            return
        if len(np.unique(ids)) != len(ids):
            raise InvalidArgument("ids", "must not repeat an id")
        pos = self._positions(ids)  # NotFound before any change
        if self._pinned[pos].any():
            bad = ids[self._pinned[pos]][:8].tolist()
            raise FailedPrecondition(f"chunk ids are pinned (unpin them first): {bad}")
        self._drop(np.sort(pos))

    def place_index(self, indexes: GpuIndexes) -> None:
        """Keep this memory's search index on a GPU from now on (same vectors, ids and results)."""
        index = indexes.new_index(self.config.dim)
        if len(self._ids):
            index.add_with_ids(np.take(self._emb, self._slots, axis=0), self._ids)  # chronological
        self._index = index

    def _drop(self, pos: np.ndarray) -> None:
        """Remove the chunks at chronological positions `pos` from index, metadata and slabs."""
        ids, slots = self._ids[pos], self._slots[pos]
        _apply_faiss_threads()
        removed = self._index.remove_ids(ids)
        if removed != len(ids):
            raise RuntimeError(f"index removed {removed} of {len(ids)} ids: index and metadata disagree")
        keep = np.ones(len(self._ids), np.bool_)
        keep[pos] = False
        self._ids, self._slots = self._ids[keep], self._slots[keep]
        self._counters, self._pinned, self._lengths = (
            self._counters[keep],
            self._pinned[keep],
            self._lengths[keep],
        )
        self._free = np.concatenate([self._free, slots[::-1]])
        self._eviction_rounds += 1
        self._evicted_chunks += len(pos)
        self._generation += 1

    # -------------------------------------------------------------------------------- search

    def search(self, queries: np.ndarray, top_k: int) -> SearchResult:
        """Exact top-k chunks by inner product for each query, rows in chronological order.

        queries: (q, dim) float32 finite. top_k: 1..memory_size. Equal scores rank the older chunk
        (lower id) first. The retrieval counter of every returned chunk grows by one per row it
        appears in. Fewer stored chunks than top_k: the row is padded (see SearchResult).
        """
        queries = _check_vectors("queries", queries, self.config.dim)  # (q, dim)
        if not _is_int(top_k) or not 1 <= top_k <= self.config.memory_size:
            raise InvalidArgument(
                "top_k", f"must be an integer in 1..{self.config.memory_size}, got {top_k!r}"
            )
        q, k, kk = len(queries), int(top_k), min(int(top_k), len(self))
        self._searches += 1
        self._queries += q
        if q == 0 or kk == 0:
            return self._padded(q, k)
        top_ids, top_scores = self._exact_topk(queries, kk)  # (q, kk), (q, kk)
        order = np.argsort(top_ids, axis=1)  # chronological within each row
        top_ids = np.take_along_axis(top_ids, order, axis=1)
        top_scores = np.take_along_axis(top_scores, order, axis=1)
        pos = np.searchsorted(self._ids, top_ids)  # (q, kk)
        np.add.at(self._counters, pos.ravel(), 1)
        self._generation += 1
        top_records = np.take(self._rec, self._slots[pos], axis=0)  # (q, kk, record_bytes)
        if kk == k:  # the common case: no padding, no second copy of the records
            return SearchResult(top_ids, top_scores, top_records, self._lengths[pos])
        out = self._padded(q, k)
        out.ids[:, :kk], out.scores[:, :kk] = top_ids, top_scores
        out.records[:, :kk], out.lengths[:, :kk] = top_records, self._lengths[pos]
        return out

    def _padded(self, q: int, k: int) -> SearchResult:
        """A result of q rows holding only padding."""
        return SearchResult(
            ids=np.full((q, k), -1, np.int64),  # (q, k)
            scores=np.full((q, k), -np.inf, np.float32),  # (q, k)
            records=np.zeros((q, k, self.config.record_bytes), np.uint8),  # (q, k, record_bytes)
            lengths=np.zeros((q, k), np.int32),  # (q, k)
        )

    def _exact_topk(self, queries: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-`kk` (ids, float32 scores) per query, ranked by (score desc, id asc): (q, kk) each.

        FAISS proposes k' candidates per row. A chunk outside them scores at most the k'-th FAISS
        score plus FAISS's rounding error, so when the kk-th exact score is above that bound the row
        is final; otherwise the row is redone with a wider k' (at worst k' = n, a full scan).
        """
        q, n = len(queries), len(self)
        out_ids = np.empty((q, kk), np.int64)  # (q, kk)
        out_scores = np.empty((q, kk), np.float32)  # (q, kk)
        # Worst-case float32 dot-product error, |err| <= dim * u * |q| * |e| (2x margin).
        qnorm = np.sqrt(np.einsum("qd,qd->q", queries, queries, dtype=np.float64))  # (q,)
        slack = 2.0 * self.config.dim * _F32_UNIT * qnorm * self._max_norm + 1e-30  # (q,)
        rows = np.arange(q)
        k_cand = min(n, max(2 * kk, kk + 16))
        _apply_faiss_threads()
        while len(rows):
            cand_scores, cand_ids = self._index.search(queries[rows], k_cand)  # (r, k') each
            exact = self._rescore(queries[rows], cand_ids)  # (r, k') float64
            rank = np.lexsort((cand_ids, -exact), axis=1)[:, :kk]  # (r, kk)
            top_ids = np.take_along_axis(cand_ids, rank, axis=1)
            top_exact = np.take_along_axis(exact, rank, axis=1)
            final = (k_cand == n) | (top_exact[:, -1] > cand_scores[:, -1] + slack[rows])  # (r,)
            out_ids[rows[final]] = top_ids[final]
            out_scores[rows[final]] = top_exact[final]
            rows = rows[~final]
            k_cand = min(n, 4 * k_cand)
        return out_ids, out_scores

    def _rescore(self, queries: np.ndarray, cand_ids: np.ndarray) -> np.ndarray:
        """Float64 inner products of each query with its candidates: (r, k').

        float32 x float32 products are exact in float64, and each row is reduced by the same
        summation, so equal embeddings get bit-equal scores: ties are real ties, broken by id.
        """
        slots = self._slots[np.searchsorted(self._ids, cand_ids)]  # (r, k')
        emb = np.take(self._emb, slots, axis=0).astype(np.float64)  # (r, k', dim)
        return (emb * queries.astype(np.float64)[:, None, :]).sum(axis=2)  # (r, k')

    # ---------------------------------------------------------------------- export / import

    def export_state(self) -> dict[str, Any]:
        """The whole memory as numpy arrays and scalars (no pickle; msgpack/npz friendly).

        Arrays are chronological, one row per stored chunk: ids (n,) int64, embeddings (n, dim)
        float32, records (n, record_bytes) uint8, lengths (n,) int32, counters (n,) int64,
        pinned (n,) bool. Scalars: version, the MemoryConfig fields, max_id and the statistics.
        """
        slots = self._slots
        state: dict[str, Any] = {"version": STATE_VERSION}
        state.update({f.name: getattr(self.config, f.name) for f in fields(MemoryConfig)})
        state.update(
            ids=self._ids.copy(),
            embeddings=np.take(self._emb, slots, axis=0),
            records=np.take(self._rec, slots, axis=0),
            lengths=self._lengths.copy(),
            counters=self._counters.copy(),
            pinned=self._pinned.copy(),
            max_id=self._max_id,
            accepted=self._accepted.copy(),
            eviction_rounds=self._eviction_rounds,
            evicted_chunks=self._evicted_chunks,
            searches=self._searches,
            queries=self._queries,
        )
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any], index: Any = None) -> SessionMemory:
        """Rebuild a memory from `export_state` output; InvalidArgument('state.<key>') if malformed.

        Scalars may be Python numbers or 0-d arrays (as `np.load` returns them). `index`: an
        optional pre-built FAISS index (e.g. from a checksum-verified snapshot file) to adopt instead
        of building one; it must be an IndexIDMap2 over an IndexFlatIP of width dim holding exactly
        the state's ids in order with exactly its embeddings, else InvalidArgument('index'). The check
        is two array comparisons (ids, then the vectors as a zero-copy view), no search or copy.
        """
        if not isinstance(state, dict):
            raise InvalidArgument("state", f"expected a dict, got {type(state).__name__}")

        def scalar(key: str, kind: type = int) -> Any:
            if key not in state:
                raise InvalidArgument(f"state.{key}", "missing")
            v = state[key]
            v = v.item() if isinstance(v, np.ndarray) and v.ndim == 0 else v
            if not (_is_int(v) if kind is int else _is_real(v)):
                raise InvalidArgument(f"state.{key}", f"expected {kind.__name__}, got {v!r}")
            return kind(v)

        if scalar("version") != STATE_VERSION:
            raise InvalidArgument("state.version", f"unsupported state version {state['version']!r}")
        try:
            config = MemoryConfig(
                **{
                    f.name: scalar(f.name, int if f.type in ("int", int) else float)
                    for f in fields(MemoryConfig)
                }
            )
        except InvalidArgument as e:
            raise InvalidArgument(f"state.{e.field}", str(e)) from None
        arrays = cls._check_state_arrays(state, config)
        mem = cls(config)
        ids = arrays["ids"]
        max_id = scalar("max_id")
        if len(ids) and max_id < ids[-1]:
            raise InvalidArgument("state.max_id", "below the highest stored id")
        if index is not None:
            mem._index = _checked_index(index, ids, arrays["embeddings"], config.dim)
        if len(ids):
            mem._store(
                ids, arrays["embeddings"], arrays["records"], arrays["lengths"], indexed=index is not None
            )
        mem._counters = arrays["counters"].copy()
        mem._pinned = arrays["pinned"].copy()
        mem._max_id = max_id
        mem._accepted = cls._check_accepted(state.get("accepted"), ids, max_id)
        for key in ("eviction_rounds", "evicted_chunks", "searches", "queries"):
            setattr(mem, f"_{key}", scalar(key))
        return mem

    @staticmethod
    def _check_accepted(accepted: Any, ids: np.ndarray, max_id: int) -> np.ndarray:
        """The state's accepted-id runs, checked; states written before they existed count every id
        up to max_id as accepted."""
        if accepted is None:
            return np.array([[0, max_id]] if max_id >= 0 else np.empty((0, 2)), np.int64).reshape(-1, 2)
        acc = _check_array("state.accepted", accepted, np.int64, (None, 2))
        if len(acc) > MAX_ACCEPTED_RUNS:
            raise InvalidArgument("state.accepted", f"more than {MAX_ACCEPTED_RUNS} runs")
        flat = acc.reshape(-1)
        if len(flat) and (
            flat.min() < 0 or not (np.diff(flat) >= 0).all() or not (acc[1:, 0] > acc[:-1, 1] + 1).all()
        ):
            raise InvalidArgument("state.accepted", "runs must be sorted, disjoint and non-negative")
        if (len(acc) and acc[-1, 1] != max_id) or (not len(acc) and max_id >= 0):
            raise InvalidArgument("state.accepted", "must end at max_id")
        run = np.searchsorted(acc[:, 0], ids, side="right") - 1
        if len(ids) and not ((run >= 0) & (ids <= acc[np.maximum(run, 0), 1])).all():
            raise InvalidArgument("state.accepted", "a stored id is outside every run")
        return acc.copy()

    @staticmethod
    def _check_state_arrays(state: dict[str, Any], config: MemoryConfig) -> dict[str, np.ndarray]:
        """The per-chunk arrays of a state, checked for dtype, shape and content."""
        spec = {
            "ids": (np.int64, (None,)),
            "embeddings": (np.float32, (None, config.dim)),
            "records": (np.uint8, (None, config.record_bytes)),
            "lengths": (np.int32, (None,)),
            "counters": (np.int64, (None,)),
            "pinned": (np.bool_, (None,)),
        }
        out = {}
        for key, (dtype, shape) in spec.items():
            if key not in state:
                raise InvalidArgument(f"state.{key}", "missing")
            out[key] = _check_array(f"state.{key}", state[key], dtype, shape)
        n = len(out["ids"])
        for key, arr in out.items():
            if len(arr) != n:
                raise InvalidArgument(f"state.{key}", f"has {len(arr)} rows but ids has {n}")
        if n > config.memory_size:
            raise InvalidArgument("state.ids", f"{n} chunks exceed memory_size {config.memory_size}")
        ids = out["ids"]
        if n and (ids.min() < 0 or (n > 1 and not (np.diff(ids) > 0).all())):
            raise InvalidArgument("state.ids", "must be non-negative and strictly increasing")
        _check_vectors("state.embeddings", out["embeddings"], config.dim)
        if n and out["lengths"].min() < 1:
            raise InvalidArgument("state.lengths", "every chunk must hold at least one token")
        if n and out["counters"].min() < 0:
            raise InvalidArgument("state.counters", "must be non-negative")
        return out


def _bounded_runs(runs: np.ndarray) -> np.ndarray:
    """Sorted accepted-id runs (k, 2), at most MAX_ACCEPTED_RUNS: the oldest ones merge into one."""
    if len(runs) <= MAX_ACCEPTED_RUNS:
        return runs
    extra = len(runs) - MAX_ACCEPTED_RUNS
    return np.concatenate([[[runs[0, 0], runs[extra, 1]]], runs[extra + 1 :]]).astype(np.int64)


def _checked_index(index: Any, ids: np.ndarray, embeddings: np.ndarray, dim: int) -> faiss.Index:
    """`index` downcast, if it is IndexIDMap2(IndexFlatIP(dim)) holding exactly (ids, embeddings)."""
    # Keep `index` itself: it is the Python object that owns the C++ index (downcasts do not).
    outer = index if isinstance(index, faiss.IndexIDMap2) else None
    inner = faiss.downcast_index(outer.index) if outer is not None else None
    if outer is None or not isinstance(inner, faiss.IndexFlatIP) or inner.d != dim:
        raise InvalidArgument("index", f"must be IndexIDMap2(IndexFlatIP({dim})), got {type(index).__name__}")
    n = len(ids)
    if outer.ntotal != n or inner.ntotal != n:
        raise InvalidArgument("index", f"holds {outer.ntotal} vectors, the state {n}")
    if n and not np.array_equal(faiss.vector_to_array(outer.id_map), ids):
        raise InvalidArgument("index", "ids differ from the state's")
    if n:
        stored = faiss.rev_swig_ptr(inner.get_xb(), n * dim)  # (n * dim,) float32 view, no copy
        if not np.array_equal(stored.view(np.uint32), embeddings.reshape(-1).view(np.uint32)):
            raise InvalidArgument("index", "vectors differ from the state's embeddings")
    return outer


# -------------------------------------------------------------------------------------------- bank


class MemoryBank:
    """Sessions by id. The dict is guarded by a lock; each SessionMemory is not thread-safe.

    gpu: every session registered here keeps its search index on that GPU (None: in RAM)."""

    def __init__(self, gpu: GpuIndexes | None = None) -> None:
        self._sessions: dict[str, SessionMemory] = {}
        self._lock = threading.Lock()
        self.gpu = gpu

    def create(self, session_id: str, config: MemoryConfig) -> SessionMemory:
        """A new, empty session; AlreadyExists if the id is taken."""
        return self.adopt(session_id, SessionMemory(config))

    def adopt(self, session_id: str, memory: SessionMemory) -> SessionMemory:
        """Register an existing memory (e.g. `SessionMemory.from_state` of a moved session)."""
        check_session_id(session_id)
        if not isinstance(memory, SessionMemory):
            raise InvalidArgument("memory", f"expected SessionMemory, got {type(memory).__name__}")
        with self._lock:
            taken = session_id in self._sessions
        if self.gpu is not None and not taken:
            memory.place_index(self.gpu)
        with self._lock:
            if session_id in self._sessions:
                raise AlreadyExists(f"session {session_id!r} already exists")
            self._sessions[session_id] = memory
        return memory

    def get(self, session_id: str) -> SessionMemory:
        """The session's memory; NotFound if absent."""
        check_session_id(session_id)
        with self._lock:
            memory = self._sessions.get(session_id)
        if memory is None:
            raise NotFound(f"session {session_id!r} not found")
        return memory

    def delete(self, session_id: str) -> None:
        """Forget the session and its memory; NotFound if absent."""
        check_session_id(session_id)
        with self._lock:
            if self._sessions.pop(session_id, None) is None:
                raise NotFound(f"session {session_id!r} not found")

    def sessions(self) -> list[str]:
        """Session ids, sorted."""
        with self._lock:
            return sorted(self._sessions)

    def __contains__(self, session_id: object) -> bool:
        with self._lock:
            return isinstance(session_id, str) and session_id in self._sessions

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)
