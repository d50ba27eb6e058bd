"""Tests of the memory bank core (memlong/memory.py): exact search against brute force, id-to-K/V
alignment under eviction, and validation of every input, at the core level.

Records and embeddings are derived deterministically from the chunk id, so any returned
(id, record) pair can be checked against the id alone.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import pytest

from memlong.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from memlong.memory import (
    MemoryBank,
    MemoryConfig,
    PendingChunks,
    SearchResult,
    SessionMemory,
    set_faiss_threads,
)

DIM, RECORD = 16, 40


@pytest.fixture(autouse=True, scope="module")
def _one_faiss_thread():
    """These indexes are tiny: OpenMP threads only add spin-wait stalls on a loaded test machine."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


# ----------------------------------------------------------------------------------- factories


def record_of(ids: np.ndarray, record_bytes: int = RECORD) -> np.ndarray:
    """(n, record_bytes) uint8: the id's 8 little-endian bytes, then a hash of (id, byte index)."""
    ids = np.asarray(ids, np.int64)
    rec = ((ids[:, None] * 2654435761 + np.arange(record_bytes) * 40503) >> 5) & 0xFF
    rec = rec.astype(np.uint8)  # (n, record_bytes)
    rec[:, :8] = ids.astype("<i8").view(np.uint8).reshape(-1, 8)
    return rec


def length_of(ids: np.ndarray) -> np.ndarray:
    return (np.asarray(ids) % 128 + 1).astype(np.int32)  # (n,)


def table(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    """Embedding of chunk id i is row i: (n, dim) float32, unit norm."""
    e = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def append(mem: SessionMemory, ids, emb_table: np.ndarray) -> int:
    ids = np.asarray(ids, np.int64)
    rb = mem.config.record_bytes
    return mem.append(ids, emb_table[ids], record_of(ids, rb), length_of(ids))


def make(memory_size: int = 64, dim: int = DIM, **kw) -> SessionMemory:
    return SessionMemory(MemoryConfig(dim=dim, record_bytes=RECORD, memory_size=memory_size, **kw))


def brute_topk(ids: np.ndarray, emb: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """NumPy brute force: top-k ids by float64 inner product, ties by lower id, rows ascending."""
    scores = (emb.astype(np.float64)[None] * queries.astype(np.float64)[:, None]).sum(-1)  # (q, n)
    rank = np.lexsort((np.broadcast_to(ids, scores.shape), -scores), axis=1)[:, :k]  # (q, k)
    return np.sort(ids[rank], axis=1)


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# -------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "field, value",
    [
        ("dim", 0),
        ("dim", -3),
        ("dim", True),
        ("dim", 1.5),
        ("dim", 1 << 20),
        ("record_bytes", 0),
        ("memory_size", 0),
        ("memory_size", "8"),
        ("protect_newest", 1.0),
        ("protect_newest", -0.1),
        ("protect_newest", float("nan")),
        ("drop_oldest", 1.5),
        ("evict_free", 0.0),
        ("evict_free", None),
    ],
)
def test_config_rejects_bad_field(field, value):
    kw = dict(dim=DIM, record_bytes=RECORD, memory_size=8)
    kw[field] = value
    with pytest.raises(InvalidArgument) as e:
        MemoryConfig(**kw)
    assert e.value.field == field


def test_config_bands_round_up():
    cfg = MemoryConfig(dim=4, record_bytes=1, memory_size=100, protect_newest=0.07, drop_oldest=0.05)
    assert (cfg.n_protect, cfg.n_oldest, cfg.n_evict) == (7, 5, 25)
    assert MemoryConfig(dim=4, record_bytes=1, memory_size=2, evict_free=0.01).n_evict == 1


# ----------------------------------------------------------------------------------- exact search


@pytest.mark.parametrize("top_k", [1, 5, 8, 17])
def test_search_equals_brute_force_with_duplicate_embeddings(top_k):
    rng = np.random.default_rng(1)
    n = 500
    emb = table(n, seed=1)
    dup_src = rng.choice(n, 120, replace=False)
    emb[rng.choice(n, 120, replace=False)] = emb[dup_src]  # deliberate exact ties
    mem = make(memory_size=n)
    append(mem, np.arange(n), emb)
    queries = np.concatenate(
        [rng.standard_normal((150, DIM)), emb[dup_src[:50]]]  # some queries sit exactly on duplicates
    ).astype(np.float32)
    res = mem.search(queries, top_k)
    np.testing.assert_array_equal(res.ids, brute_topk(np.arange(n), emb, queries, top_k))
    np.testing.assert_allclose(res.scores, np.take_along_axis(queries @ emb.T, res.ids, axis=1), atol=1e-5)


class SearchSpy:
    """Wraps the FAISS index to count candidate searches."""

    def __init__(self, index):
        self.index, self.calls = index, 0

    def search(self, *args):
        self.calls += 1
        return self.index.search(*args)


@pytest.mark.parametrize("top_k", [1, 3, 8, 40])
def test_search_breaks_massive_ties_by_chunk_order(top_k):
    # Entries in {-1, 0, 1}: every score is a small integer, exact in any float arithmetic, so
    # ties are everywhere, including across the boundary of FAISS's candidate list.
    rng = np.random.default_rng(2)
    n, dim = 400, 6
    emb = rng.integers(-1, 2, (n, dim)).astype(np.float32)
    mem = make(memory_size=n, dim=dim)
    append(mem, np.arange(n), emb)
    queries = rng.integers(-1, 2, (300, dim)).astype(np.float32)
    mem._index = spy = SearchSpy(mem._index)
    res = mem.search(queries, top_k)
    assert spy.calls > 1  # ties straddled the first candidate list, so it was widened
    np.testing.assert_array_equal(res.ids, brute_topk(np.arange(n), emb, queries, top_k))
    np.testing.assert_array_equal(res.scores, np.take_along_axis(queries @ emb.T, res.ids, axis=1))


def test_rows_are_chronological_and_padded():
    mem = make(memory_size=8)
    emb = table(10)
    append(mem, [2, 5, 9], emb)
    res = mem.search(emb[[9, 2]], 5)
    assert res.ids.shape == (2, 5) and res.records.shape == (2, 5, RECORD)
    np.testing.assert_array_equal(res.ids, [[2, 5, 9, -1, -1]] * 2)
    assert np.isneginf(res.scores[:, 3:]).all() and np.isfinite(res.scores[:, :3]).all()
    assert not res.records[:, 3:].any() and not res.lengths[:, 3:].any()
    np.testing.assert_array_equal(res.records[0, :3], record_of([2, 5, 9]))
    np.testing.assert_array_equal(res.lengths[1, :3], length_of([2, 5, 9]))
    assert res.ids.dtype == np.int64 and res.scores.dtype == np.float32
    assert res.records.dtype == np.uint8 and res.lengths.dtype == np.int32


def test_search_on_empty_memory_is_all_padding():
    res = make().search(np.ones((3, DIM), np.float32), 4)
    assert (res.ids == -1).all() and np.isneginf(res.scores).all() and res.records.shape == (3, 4, RECORD)


def test_the_faiss_thread_count_holds_in_every_thread_that_searches():
    """OpenMP keeps its thread count per thread: set in one thread, it must still hold in a worker (a
    server's gRPC thread) that searches, or that worker runs FAISS on every core, spinning."""
    default = ThreadPoolExecutor(1).submit(faiss.omp_get_max_threads).result()
    wanted = default + 1  # differs from the default on any machine
    mem, emb = make(), table(8)
    append(mem, np.arange(8), emb)

    def search_in_a_new_thread() -> int:
        mem.search(emb[:1], 2)
        return faiss.omp_get_max_threads()

    try:
        ThreadPoolExecutor(1).submit(set_faiss_threads, wanted).result()  # set in another thread
        assert ThreadPoolExecutor(1).submit(search_in_a_new_thread).result() == wanted
    finally:
        set_faiss_threads(None)
    assert ThreadPoolExecutor(1).submit(search_in_a_new_thread).result() == default
    with pytest.raises(InvalidArgument, match="faiss_threads"):
        set_faiss_threads(0)


# ---------------------------------------------------------------------------- alignment under eviction


def test_alignment_through_many_evictions():
    rng = np.random.default_rng(3)
    memory_size, total = 64, 20_000
    emb = table(total, seed=3)
    mem = make(memory_size=memory_size)
    next_id, rows, mismatches = 0, 0, 0
    while rows < 10_000:
        step = int(rng.integers(1, 7))
        append(mem, np.arange(next_id, next_id + step), emb)
        next_id += step + int(rng.random() < 0.2)  # occasional gaps in the id sequence
        assert len(mem) <= memory_size
        if rng.random() < 0.1:
            mem.pin(rng.choice(mem.ids(), 1))
        if rng.random() < 0.1:
            mem.unpin(mem.ids()[:8])
        if rng.random() < 0.05:
            mem.evict(int(rng.integers(0, 10)))
        q, k = int(rng.integers(1, 9)), int(rng.integers(1, 17))
        queries = rng.standard_normal((q, DIM)).astype(np.float32)
        res = mem.search(queries, k)
        rows += q
        stored = mem.ids()
        want = brute_topk(stored, emb[stored], queries, k)  # (q, min(k, n))
        np.testing.assert_array_equal(
            res.ids, np.pad(want, ((0, 0), (0, k - want.shape[1])), constant_values=-1)
        )
        valid = res.ids >= 0
        mismatches += int((res.records[valid] != record_of(res.ids[valid])).any(axis=1).sum())
        mismatches += int((res.lengths[valid] != length_of(res.ids[valid])).sum())
    assert mismatches == 0
    assert mem.stats()["eviction_rounds"] >= 50
    records, lengths = mem.fetch(mem.ids())
    np.testing.assert_array_equal(records, record_of(mem.ids()))
    np.testing.assert_array_equal(lengths, length_of(mem.ids()))
    assert mem._index.ntotal == len(mem)


# ------------------------------------------------------------------------------- eviction policy


def one_hot(n: int, dim: int) -> np.ndarray:
    return np.eye(n, dim, dtype=np.float32)  # (n, dim)


def test_counters_count_every_returned_row():
    mem = make(memory_size=16, dim=16)
    emb = one_hot(10, 16)
    append(mem, np.arange(10), emb)
    seen = np.zeros(10, np.int64)
    rng = np.random.default_rng(4)
    for _ in range(30):
        res = mem.search(emb[rng.integers(0, 10, 3)], int(rng.integers(1, 4)))
        np.add.at(seen, res.ids[res.ids >= 0], 1)
    np.testing.assert_array_equal(mem.counters(np.arange(10)), seen)
    assert mem.stats()["searches"] == 30 and mem.stats()["queries"] == 90


def test_frequently_retrieved_middle_chunks_survive():
    # memory 20: newest band 5, oldest band 1, one round frees 5.
    mem = make(memory_size=20, dim=32)
    emb = one_hot(32, 32)
    append(mem, np.arange(20), emb)
    for _ in range(5):
        mem.search(emb[[1, 2, 3, 4, 10]], 1)
    append(mem, [20], emb)
    # Oldest band {0}; then the least retrieved of 1..15 (16..19 + the new 20 are the newest band).
    expected = sorted(set(range(21)) - {0, 5, 6, 7, 8})
    np.testing.assert_array_equal(mem.ids(), expected)
    assert mem.stats()["eviction_rounds"] == 1 and mem.stats()["evicted_chunks"] == 5


def test_newest_band_is_never_evicted():
    rng = np.random.default_rng(5)
    mem = make(memory_size=16)  # newest band 4
    emb = table(2000, seed=5)
    accepted: list[int] = []
    for start in range(0, 600, 3):
        ids = np.arange(start, start + int(rng.integers(1, 4)))
        append(mem, ids, emb)
        accepted += ids.tolist()
        assert set(accepted[-4:]) <= set(mem.ids().tolist())
        # Retrieve only old chunks, so the newest would be the least retrieved.
        mem.search(emb[mem.ids()[:4]], 4)
    mem.evict(1000)
    np.testing.assert_array_equal(mem.ids(), accepted[-4:])


def test_pinned_chunks_are_never_evicted():
    mem = make(memory_size=16)
    emb = table(1000)
    append(mem, np.arange(16), emb)
    mem.pin([0, 7])
    for i in range(16, 600):
        append(mem, [i], emb)
        mem.search(emb[mem.ids()[-3:]], 3)
    assert {0, 7} <= set(mem.ids().tolist()) and mem.stats()["pinned"] == 2
    mem.unpin([0])
    mem.evict(1000)
    assert 0 not in mem.ids() and 7 in mem.ids()


def test_all_pinned_memory_refuses_append_and_changes_nothing():
    mem = make(memory_size=8)
    emb = table(20)
    append(mem, np.arange(8), emb)
    mem.pin(np.arange(8))
    before = mem.export_state()
    with pytest.raises(ResourceExhausted):
        append(mem, [8], emb)
    assert_same_state(before, mem.export_state())
    np.testing.assert_array_equal(mem.evict(), np.empty(0, np.int64))
    mem.unpin([3])
    append(mem, [8], emb)
    assert 3 not in mem.ids() and len(mem) == 8


def test_batch_larger_than_memory_is_refused():
    mem = make(memory_size=4)
    with pytest.raises(ResourceExhausted):
        append(mem, np.arange(5), table(5))
    assert len(mem) == 0


def test_explicit_evict_returns_ids_and_default_round():
    mem = make(memory_size=20)
    emb = table(30)
    append(mem, np.arange(20), emb)
    evicted = mem.evict()
    np.testing.assert_array_equal(evicted, [0, 1, 2, 3, 4])  # oldest band, then least retrieved (ties: older)
    assert len(mem) == 15
    with pytest.raises(InvalidArgument) as e:
        mem.evict(-1)
    assert e.value.field == "n_free"


# -------------------------------------------------------------------------------- idempotency


def test_replays_are_idempotent_and_conflicts_refused():
    mem = make(memory_size=8)
    emb = table(30)
    assert append(mem, np.arange(5), emb) == 5
    before = mem.export_state()
    assert append(mem, np.arange(5), emb) == 0
    assert_same_state(before, mem.export_state())
    assert append(mem, np.arange(3, 8), emb) == 3  # 3, 4 replayed; 5..7 new

    ids = np.array([4, 8], np.int64)
    rec = record_of(ids)
    rec[0, -1] ^= 1  # chunk 4 again, one bit different
    before = mem.export_state()
    with pytest.raises(AlreadyExists):
        mem.append(ids, emb[ids], rec, length_of(ids))
    with pytest.raises(AlreadyExists):
        mem.append(ids[:1], -emb[ids[:1]], record_of(ids[:1]), length_of(ids[:1]))
    assert_same_state(before, mem.export_state())


def test_replay_of_evicted_chunk_is_a_noop():
    mem = make(memory_size=8)
    emb = table(30)
    append(mem, np.arange(8), emb)
    append(mem, np.arange(8, 12), emb)  # evicts the oldest chunks
    assert 0 not in mem.ids()
    before = mem.export_state()
    junk = np.zeros((1, RECORD), np.uint8)
    assert mem.append(np.array([0], np.int64), emb[[5]], junk, np.array([1], np.int32)) == 0
    assert_same_state(before, mem.export_state())


def test_late_id_never_stored_is_refused_and_changes_nothing():
    """An id below the highest accepted that was never accepted is not a replay: it would be lost."""
    mem = make(memory_size=8)
    emb = table(40)
    append(mem, [0, 1, 2, 10, 11], emb)  # a gap 3..9: those ids were never sent
    append(mem, np.arange(12, 20), emb)  # evicts the oldest, so 0..2 are accepted but gone
    assert 0 not in mem.ids()
    before = mem.export_state()
    for ids in ([5], [2, 5], [5, 20], [7, 21]):  # late alone, after a replay, mixed with new ids
        with pytest.raises(FailedPrecondition, match=r"\[(5|7)\]|never"):
            append(mem, ids, emb)
        assert_same_state(before, mem.export_state())
    assert append(mem, [0, 1, 10], emb) == 0  # true replays, even of evicted chunks, stay no-ops
    # The history survives export/import (what snapshots and session moves carry).
    copy = SessionMemory.from_state(mem.export_state())
    with pytest.raises(FailedPrecondition):
        append(copy, [4], emb)
    assert append(copy, [1, 20], emb) == 1


def test_retired_ids_are_never_stored_afterwards():
    """A rolled-back range whose writer is still running: whatever it sends later is a no-op."""
    mem = make(memory_size=16)
    emb = table(40)
    append(mem, [0, 1, 2, 3], emb)
    mem.remove(np.array([2, 3]))
    mem.retire(2, 10)  # the failed write had reserved ids 2..9
    before = mem.export_state()
    assert append(mem, [3, 4, 9], emb) == 0  # the zombie writer's chunks, before and past its last
    assert_same_state(before, mem.export_state())
    assert append(mem, [10, 11], emb) == 2  # the retry, after the range
    mem.retire(20, 25)  # beyond everything: the history jumps; [12, 20) was never accepted
    with pytest.raises(FailedPrecondition):
        append(mem, [15], emb)
    assert SessionMemory.from_state(mem.export_state()).export_state()["accepted"].tolist() == [
        [0, 11],
        [20, 24],
    ]
    for bad in ((5, 5), (-1, 3), (3, 1)):
        with pytest.raises(InvalidArgument):
            mem.retire(*bad)


def test_accepted_history_stays_bounded():
    from memlong.memory import MAX_ACCEPTED_RUNS

    mem = make(memory_size=4)
    emb = table(2 * MAX_ACCEPTED_RUNS + 10)
    for i in range(0, 2 * MAX_ACCEPTED_RUNS + 4, 2):  # every other id: one run per chunk
        append(mem, [i], emb)
    runs = mem.export_state()["accepted"]
    assert len(runs) == MAX_ACCEPTED_RUNS
    with pytest.raises(FailedPrecondition):  # a recent gap is still known
        append(mem, [2 * MAX_ACCEPTED_RUNS + 1], emb)
    assert append(mem, [1], emb) == 0  # the oldest gaps merged: counted as accepted, a no-op


# ------------------------------------------------------------------------------------------ validation


def _batch(n: int = 4, start: int = 10):
    ids = np.arange(start, start + n, dtype=np.int64)
    return {
        "ids": ids,
        "embeddings": table(start + n)[ids],
        "records": record_of(ids),
        "lengths": length_of(ids),
    }


def _nan(b):
    b["embeddings"][1, 3] = np.nan


def _inf(b):
    b["embeddings"][0, 0] = np.inf


def _huge(b):
    b["embeddings"][0, 0] = 1e30


def _zero_length(b):
    b["lengths"][2] = 0


BAD_BATCHES = {
    "wrong width": ("embeddings", lambda b: b.update(embeddings=np.zeros((4, DIM + 1), np.float32))),
    "nan": ("embeddings", _nan),
    "inf": ("embeddings", _inf),
    "huge value": ("embeddings", _huge),
    "float64 embeddings": ("embeddings", lambda b: b.update(embeddings=b["embeddings"].astype(np.float64))),
    "1-d embeddings": ("embeddings", lambda b: b.update(embeddings=b["embeddings"].ravel())),
    "wrong record size": ("records", lambda b: b.update(records=np.zeros((4, RECORD + 1), np.uint8))),
    "int8 records": ("records", lambda b: b.update(records=b["records"].view(np.int8))),
    "int64 lengths": ("lengths", lambda b: b.update(lengths=b["lengths"].astype(np.int64))),
    "zero length": ("lengths", _zero_length),
    "int32 ids": ("ids", lambda b: b.update(ids=b["ids"].astype(np.int32))),
    "list ids": ("ids", lambda b: b.update(ids=b["ids"].tolist())),
    "2-d ids": ("ids", lambda b: b.update(ids=b["ids"].reshape(2, 2))),
    "negative ids": ("ids", lambda b: b.update(ids=b["ids"] - 12)),
    "unsorted ids": ("ids", lambda b: b.update(ids=b["ids"][::-1].copy())),
    "duplicate ids": ("ids", lambda b: b.update(ids=np.array([10, 11, 11, 12], np.int64))),
    "short embeddings": ("embeddings", lambda b: b.update(embeddings=b["embeddings"][:3])),
    "long records": ("records", lambda b: b.update(records=record_of(np.arange(5)))),
    "short lengths": ("lengths", lambda b: b.update(lengths=b["lengths"][:3])),
}


def _full_memory_and_bad_batch(case: str):
    """(memory, its state, the spoiled batch, the field it spoils): a full memory, so that a bad batch
    must not trigger eviction either."""
    field, spoil = BAD_BATCHES[case]
    mem = make(memory_size=8)
    append(mem, np.arange(8), table(8))
    batch = _batch()
    spoil(batch)
    return mem, mem.export_state(), batch, field


def _refused_naming(field: str, call, batch: dict) -> None:
    with pytest.raises(InvalidArgument) as e:
        call(**batch)
    assert e.value.field == field


@pytest.mark.parametrize("case", sorted(BAD_BATCHES))
def test_bad_append_names_field_and_changes_nothing(case):
    mem, before, batch, field = _full_memory_and_bad_batch(case)
    _refused_naming(field, mem.append, batch)
    assert_same_state(before, mem.export_state())


@pytest.mark.parametrize("case", sorted(BAD_BATCHES))
def test_plan_append_refuses_what_append_refuses_and_changes_nothing(case):
    """plan_append runs append's checks; without records (kept elsewhere) it skips only theirs."""
    mem, before, batch, field = _full_memory_and_bad_batch(case)
    _refused_naming(field, mem.plan_append, batch)
    del batch["records"]
    if field == "records":
        assert mem.plan_append(**batch).n_new == 4
    else:
        _refused_naming(field, mem.plan_append, batch)
    assert_same_state(before, mem.export_state())


def test_plan_append_counts_new_chunks_and_refuses_late_ids_conflicts_and_no_room():
    mem = make(memory_size=8)
    emb = table(40)
    append(mem, [0, 1, 2, 5, 6], emb)
    before = mem.export_state()

    def batch(ids, **change):
        ids = np.asarray(ids, np.int64)
        out = {"ids": ids, "embeddings": emb[ids], "records": record_of(ids), "lengths": length_of(ids)}
        return {**out, **change}

    ok = batch([5, 6, 7, 8])
    assert mem.plan_append(**ok).n_new == 2  # 5 and 6 are replays
    assert mem.plan_append(ok["ids"], ok["embeddings"], ok["lengths"]).n_new == 2
    with pytest.raises(FailedPrecondition, match=r"\[3\]"):
        mem.plan_append(**batch([3, 9]))
    other_emb = emb[[5, 9]].copy()
    other_emb[0, 0] += 1
    with pytest.raises(AlreadyExists, match=r"\[5\]"):
        mem.plan_append(**batch([5, 9], embeddings=other_emb))
    other_rec = batch([5, 9], records=record_of(np.array([6, 9])))
    with pytest.raises(AlreadyExists, match=r"\[5\]"):
        mem.plan_append(**other_rec)
    del other_rec["records"]  # the caller compares the records it keeps itself
    assert mem.plan_append(**other_rec).n_new == 1
    with pytest.raises(ResourceExhausted, match="exceeds memory_size"):
        mem.plan_append(**batch(np.arange(10, 19)))
    mem.pin(mem.ids())
    with pytest.raises(ResourceExhausted, match="memory full"):
        mem.plan_append(**batch(np.arange(10, 14)))
    mem.unpin(mem.ids())
    assert_same_state(before, mem.export_state())
    assert mem.append(**ok) == 2


def test_an_applied_plan_stores_what_append_stores_and_evicts_what_it_names():
    """apply(plan_append(...)) is append, checked once: the plan names the ids the append evicts."""
    emb = table(40)

    def batch(ids):
        ids = np.asarray(ids, np.int64)
        return {"ids": ids, "embeddings": emb[ids], "lengths": length_of(ids)}

    planned, appended = make(memory_size=8), make(memory_size=8)
    for mem in (planned, appended):
        append(mem, range(8), emb)
        mem.search(emb[[6, 7]], 2)  # counters: the least retrieved go first
    plan = planned.plan_append(**batch([7, 8, 9]))  # 7 is a replay
    assert (plan.n_old, plan.n_new) == (1, 2)
    evicted = plan.evicted.copy()
    assert len(evicted) == 2 and not np.isin([6, 7], evicted).any()
    assert planned.apply(plan, record_of(np.array([7, 8, 9]))) == 2
    assert appended.append(**batch([7, 8, 9]), records=record_of(np.array([7, 8, 9]))) == 2
    assert_same_state(planned.export_state(), appended.export_state())
    assert not np.isin(evicted, planned.ids()).any()


def test_a_plan_is_applied_once_to_the_memory_and_state_it_was_made_for():
    emb = table(40)
    ids = np.array([3, 4], np.int64)
    mem, other = make(), make()
    append(mem, range(3), emb)
    plan = mem.plan_append(ids, emb[ids], length_of(ids))
    with pytest.raises(RuntimeError, match="stale"):
        other.apply(plan, record_of(ids))
    with pytest.raises(RuntimeError, match="once"):
        mem.apply(plan)  # made without records: apply must get them
    with pytest.raises(InvalidArgument) as e:
        mem.apply(plan, record_of(ids, RECORD + 1))
    assert e.value.field == "records"
    mem.search(emb[:1], 1)  # a search changes counters, and so what an eviction would choose
    with pytest.raises(RuntimeError, match="stale"):
        mem.apply(plan, record_of(ids))
    plan = mem.plan_append(ids, emb[ids], length_of(ids), record_of(ids))
    with pytest.raises(RuntimeError, match="once"):
        mem.apply(plan, record_of(ids))  # the plan holds them already
    assert mem.apply(plan) == 2
    with pytest.raises(RuntimeError, match="stale"):
        mem.apply(plan)  # applied: the memory it was made for has changed
    assert list(mem.ids()) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "field, queries, top_k",
    [
        ("queries", np.zeros((2, DIM + 1), np.float32), 2),
        ("queries", np.zeros(DIM, np.float32), 2),
        ("queries", np.zeros((2, DIM), np.float64), 2),
        ("queries", np.full((2, DIM), np.nan, np.float32), 2),
        ("top_k", np.zeros((2, DIM), np.float32), 0),
        ("top_k", np.zeros((2, DIM), np.float32), True),
        ("top_k", np.zeros((2, DIM), np.float32), 2.0),
        ("top_k", np.zeros((2, DIM), np.float32), 9),
    ],
)
def test_bad_search_names_field_and_changes_nothing(field, queries, top_k):
    mem = make(memory_size=8)
    append(mem, np.arange(8), table(8))
    before = mem.export_state()
    with pytest.raises(InvalidArgument) as e:
        mem.search(queries, top_k)
    assert e.value.field == field
    assert_same_state(before, mem.export_state())


def test_unknown_ids_are_not_found_and_change_nothing():
    mem = make(memory_size=8)
    append(mem, [1, 2, 3], table(5))
    for call in (mem.fetch, mem.pin, mem.unpin, mem.counters):
        with pytest.raises(NotFound):
            call([2, 4])
    assert mem.stats()["pinned"] == 0
    with pytest.raises(InvalidArgument):
        mem.pin([1.5])


# ------------------------------------------------------------------------------ remove / credit


def test_remove_equals_the_eviction_it_replays():
    """Replaying each eviction by `remove` on a twin gives the same state and stats, step by step."""
    rng = np.random.default_rng(11)
    emb = table(400, seed=11)
    live, twin = make(memory_size=32), make(memory_size=32)
    for start in range(0, 400, 8):
        ids = np.arange(start, start + 8)
        before = live.ids()
        append(live, ids, emb)
        evicted = np.setdiff1d(before, live.ids())
        queries = rng.standard_normal((2, DIM)).astype(np.float32)
        hit = live.search(queries, 4).ids
        twin.remove(evicted)
        append(twin, ids, emb)
        twin.credit(*np.unique(hit, return_counts=True), searches=1, queries=2)
        if start % 64 == 0:
            gone = live.evict(3)
            twin.remove(gone[::-1])  # any order
        assert_same_state(live.export_state(), twin.export_state())
    # Alignment: every search returns each id's own record.
    queries = rng.standard_normal((50, DIM)).astype(np.float32)
    res = twin.search(queries, 8)
    np.testing.assert_array_equal(res.records, record_of(res.ids.ravel()).reshape(res.records.shape))
    np.testing.assert_array_equal(res.ids, brute_topk(twin.ids(), emb[twin.ids()], queries, 8))


@pytest.mark.parametrize(
    "ids, error, field",
    [
        ([2, 99], NotFound, None),
        ([2, 2], InvalidArgument, "ids"),
        ([[2, 3]], InvalidArgument, "ids"),
        ([2.0], InvalidArgument, "ids"),
        ([1, 3], FailedPrecondition, None),  # 1 is pinned
    ],
)
def test_bad_remove_changes_nothing(ids, error, field):
    mem = make(memory_size=8)
    append(mem, [1, 2, 3, 4], table(5))
    mem.pin([1])
    before = mem.export_state()
    with pytest.raises(error) as e:
        mem.remove(ids)
    if field is not None:
        assert e.value.field == field
    assert_same_state(before, mem.export_state())
    mem.remove([])  # empty: a no-op, not an eviction round
    assert_same_state(before, mem.export_state())


def test_remove_frees_slots_and_counts_one_round():
    mem = make(memory_size=4)
    emb = table(20)
    append(mem, [0, 1, 2, 3], emb)
    mem.remove([1, 3])
    assert mem.ids().tolist() == [0, 2] and mem._index.ntotal == 2
    assert (mem.stats()["eviction_rounds"], mem.stats()["evicted_chunks"]) == (1, 2)
    append(mem, [4, 5], emb)  # fits without evicting: the slots came back
    assert mem.stats()["eviction_rounds"] == 1 and len(mem) == 4
    rec, _ = mem.fetch(mem.ids())
    np.testing.assert_array_equal(rec, record_of(mem.ids()))


@pytest.mark.parametrize(
    "ids, counts, kw, error, field",
    [
        ([1, 9], [1, 1], {}, NotFound, None),
        ([1, 1], [1, 1], {}, InvalidArgument, "ids"),
        ([1], [-1], {}, InvalidArgument, "counts"),
        ([1], [1, 2], {}, InvalidArgument, "counts"),
        ([1], [1], {"searches": -1}, InvalidArgument, "searches"),
    ],
)
def test_credit_adds_counts_or_changes_nothing(ids, counts, kw, error, field):
    mem = make(memory_size=8)
    append(mem, [1, 2, 3], table(4))
    before = mem.export_state()
    with pytest.raises(error) as e:
        mem.credit(ids, counts, **kw)
    if field is not None:
        assert e.value.field == field
    assert_same_state(before, mem.export_state())
    mem.credit([3, 1], [2, 5], searches=4, queries=7)
    assert mem.counters([1, 2, 3]).tolist() == [5, 0, 2]
    assert (mem.stats()["searches"], mem.stats()["queries"]) == (4, 7)


def _flat_index(ids: np.ndarray, emb: np.ndarray) -> faiss.Index:
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(emb.shape[1]))
    index.add_with_ids(emb, ids)
    return faiss.deserialize_index(faiss.serialize_index(index))  # as a snapshot file gives it back


def _worked_memory(seed: int) -> tuple[SessionMemory, np.random.Generator]:
    """A 32-chunk memory after 300 chunks (embeddings `table(300, seed)`) were appended five at a time
    with searches between (evictions, counters) and two pinned; and the generator that drove it."""
    rng, emb = np.random.default_rng(seed), table(300, seed=seed)
    mem = make(memory_size=32)
    for start in range(0, 300, 5):
        append(mem, np.arange(start, start + 5), emb)
        mem.search(rng.standard_normal((2, DIM)).astype(np.float32), 4)
    mem.pin(mem.ids()[[3, 10]])
    return mem, rng


def _same_results(got: SearchResult, want: SearchResult) -> None:
    for a, b in zip(vars(got).values(), vars(want).values(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_from_state_adopts_a_matching_prebuilt_index():
    mem, rng = _worked_memory(12)
    state = mem.export_state()
    index = _flat_index(state["ids"], state["embeddings"])
    copy = SessionMemory.from_state(state, index=index)
    assert copy._index is index
    del index  # the memory keeps the owning object alive
    queries = rng.standard_normal((100, DIM)).astype(np.float32)
    _same_results(copy.search(queries, 8), mem.search(queries, 8))
    append(copy, np.arange(300, 310), table(310, seed=12))  # keeps working after adoption
    assert copy._index.ntotal == len(copy)


@pytest.mark.parametrize("damage", ["ids", "vector", "count", "type", "dim"])
def test_from_state_refuses_a_prebuilt_index_that_does_not_match(damage):
    mem = make(memory_size=16)
    append(mem, np.arange(10), table(10))
    state = mem.export_state()
    ids, emb = state["ids"], state["embeddings"].copy()
    if damage == "ids":
        index = _flat_index(ids + 1, emb)
    elif damage == "vector":
        emb[4, 0] = np.nextafter(emb[4, 0], np.float32(2))
        index = _flat_index(ids, emb)
    elif damage == "count":
        index = _flat_index(ids[:-1], emb[:-1])
    elif damage == "type":
        index = faiss.IndexFlatIP(DIM)
        index.add(emb)
    else:
        index = _flat_index(ids, np.zeros((10, DIM + 1), np.float32))
    with pytest.raises(InvalidArgument) as e:
        SessionMemory.from_state(state, index=index)
    assert e.value.field == "index"


# ------------------------------------------------------------------------------ export / import


def test_export_import_round_trip_gives_identical_results():
    mem, rng = _worked_memory(6)
    state = mem.export_state()
    buf = io.BytesIO()
    np.savez(buf, **state)  # npz-friendly: plain arrays and scalars
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as npz:
        copies = [SessionMemory.from_state(state), SessionMemory.from_state(dict(npz))]
    for copy in copies:
        assert_same_state(state, copy.export_state())
        assert copy.stats() == mem.stats()
    queries = rng.standard_normal((200, DIM)).astype(np.float32)
    results = [m.search(queries, 8) for m in (mem, *copies)]
    for res in results[1:]:
        _same_results(res, results[0])
    # Copies keep evolving the same way (pins, counters and max id came along).
    for m in (mem, *copies):
        append(m, np.arange(300, 310), table(310, seed=6))
    for copy in copies:
        assert_same_state(mem.export_state(), copy.export_state())


@pytest.mark.parametrize(
    "key, value",
    [
        ("version", 99),
        ("dim", 0),
        ("ids", np.array([3, 2], np.int64)),
        ("embeddings", np.zeros((2, DIM), np.float64)),
        ("records", np.zeros((3, RECORD), np.uint8)),
        ("pinned", np.zeros(2, np.int8)),
        ("max_id", 0),
        ("counters", None),
        ("accepted", np.array([[1, 1]], np.int64)),  # does not reach max_id
        ("accepted", np.array([[2, 2]], np.int64)),  # stored id 1 outside every run
        ("accepted", np.array([[1, 1], [2, 2]], np.int64)),  # adjacent runs not merged
        ("accepted", np.array([1, 2], np.int64)),  # not (k, 2)
    ],
)
def test_from_state_rejects_malformed_state(key, value):
    mem = make(memory_size=8)
    append(mem, [1, 2], table(3))
    state = mem.export_state()
    state[key] = value
    with pytest.raises(InvalidArgument) as e:
        SessionMemory.from_state(state)
    assert e.value.field == f"state.{key}"


# --------------------------------------------------------------------------------------- bank


def test_bank_sessions_lifecycle():
    bank = MemoryBank()
    cfg = MemoryConfig(dim=DIM, record_bytes=RECORD, memory_size=8)
    mem = bank.create("tenant-a:doc.1", cfg)
    assert bank.get("tenant-a:doc.1") is mem and "tenant-a:doc.1" in bank and "x" not in bank
    with pytest.raises(AlreadyExists):
        bank.create("tenant-a:doc.1", cfg)
    bank.create("b", cfg)
    assert bank.sessions() == ["b", "tenant-a:doc.1"] and len(bank) == 2
    bank.delete("b")
    with pytest.raises(NotFound):
        bank.get("b")
    with pytest.raises(NotFound):
        bank.delete("b")
    moved = bank.adopt("c", SessionMemory.from_state(mem.export_state()))
    assert bank.get("c") is moved


@pytest.mark.parametrize(
    "session_id",
    ["", "a" * 4096, "a" * 129, "abc\n", "has space", "slash/x", "é", None, 7, "..", "-rf", ".hidden", ":a"],
)
def test_bank_rejects_bad_session_ids(session_id):
    bank = MemoryBank()
    cfg = MemoryConfig(dim=DIM, record_bytes=RECORD, memory_size=8)
    for call in (
        lambda: bank.create(session_id, cfg),
        lambda: bank.get(session_id),
        lambda: bank.delete(session_id),
    ):
        with pytest.raises(InvalidArgument) as e:
            call()
        assert e.value.field == "session_id"
    assert bank.sessions() == []


def test_pending_chunks_merge_is_the_search_of_the_union():
    """PendingChunks.merge equals a search over stored and pending chunks together; when none of the
    pending chunks makes a row, the stored result comes back as it is (no record copied)."""
    emb = table(40, seed=9)
    rng = np.random.default_rng(9)
    whole, stored = make(), make()
    append(whole, range(40), emb)
    append(stored, range(30), emb)
    pending = PendingChunks()
    for lo in (30, 35):
        ids = np.arange(lo, lo + 5)
        pending.add(ids, emb[ids], record_of(ids), length_of(ids))
    for _ in range(5):
        queries = rng.standard_normal((3, DIM)).astype(np.float32)
        got, want = pending.merge(queries, stored.search(queries, 6), 6), whole.search(queries, 6)
        np.testing.assert_array_equal(got.ids, want.ids)
        np.testing.assert_array_equal(got.records, want.records)
        np.testing.assert_array_equal(got.lengths, want.lengths)
    # A query whose top 4 are all stored chunks: the stored result itself comes back.
    far = next(q for q in (emb[i : i + 1] for i in range(30)) if whole.search(q, 4).ids.max() < 30)
    res = stored.search(far, 4)
    assert pending.merge(far, res, 4) is res


def test_pending_chunks_added_between_searches_and_copies_merge_as_the_search_of_their_union():
    """Adds, merges and copies interleaved (a copy taken mid-session, then both sides adding): every
    merge equals a search over the stored chunks and exactly the pending chunks its object holds."""
    emb = table(200, seed=4)
    rng = np.random.default_rng(4)
    stored = make(memory_size=256)
    append(stored, range(40), emb)
    pending, held = PendingChunks(), [np.arange(0)]
    copies: list[tuple[PendingChunks, np.ndarray]] = []
    next_id = 40
    for step in range(24):
        ids = np.arange(next_id, next_id + int(rng.integers(0, 4)))
        next_id += len(ids)
        pending.add(ids, emb[ids], record_of(ids), length_of(ids))
        held.append(ids)
        if step % 6 == 2:
            copies.append((pending.copy(), np.concatenate(held)))
        if step % 6 == 4:  # the newest copy adds chunks of its own: the original never sees them
            copy, copy_held = copies[-1]
            extra = np.arange(150 + step, 151 + step)
            copy.add(extra, emb[extra], record_of(extra), length_of(extra))
            copies[-1] = (copy, np.concatenate([copy_held, extra]))
        queries = rng.standard_normal((2, DIM)).astype(np.float32)
        for chunks, ids_held in [(pending, np.concatenate(held)), *copies]:
            got = chunks.merge(queries, stored.search(queries, 5), 5)
            union = np.concatenate([np.arange(40), ids_held])
            np.testing.assert_array_equal(got.ids, brute_topk(union, emb[union], queries, 5))
            np.testing.assert_array_equal(got.records, record_of(got.ids.ravel()).reshape(2, 5, RECORD))
            np.testing.assert_array_equal(got.lengths, length_of(got.ids))


def test_pending_chunks_merge_does_not_rebuild_what_was_added():
    """A search reads the pending chunks where the adds put them: its memory is the (q, m, dim) scoring
    product it needs, not a fresh copy of every chunk added so far (which made a session's searches cost
    quadratic time in its pending chunks)."""
    import tracemalloc

    m, dim = 4000, 64
    rng = np.random.default_rng(5)
    pending = PendingChunks()
    for lo in range(0, m, 10):  # one add per stored chunk of a long read
        ids = np.arange(lo, lo + 10)
        pending.add(ids, rng.standard_normal((10, dim)).astype(np.float32), record_of(ids, 8), length_of(ids))
    query = rng.standard_normal((1, dim)).astype(np.float32)
    none = SearchResult(
        np.full((1, 4), -1, np.int64),
        np.full((1, 4), -np.inf, np.float32),
        np.zeros((1, 4, 8), np.uint8),
        np.zeros((1, 4), np.int32),
    )
    tracemalloc.start()
    try:
        pending.merge(query, none, 4)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    product = m * dim * 8  # float64 scores of every pending chunk, before the sum
    assert peak < 1.5 * product, f"merge allocated {peak / product:.2f}x the scoring product"
