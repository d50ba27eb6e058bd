# ruff: noqa: B023 - each lambda is called at once, inside its own iteration
"""Congruence over gRPC: the service answers exactly like the in-process core, exactly like brute force,
and keeps ids and K/V aligned through many evictions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from memlong import errors
from memlong.memory import MemoryBank
from memlong.services.retmem.client import RetMemClient
from memlong.services.retmem.server import RetMemConfig, RetMemServer

from .servers import chunks, tiny_spec


def outcome(fn):
    """(kind, value): the result or the exception type, so both sides compare the same way."""
    try:
        return "ok", fn()
    except errors.MemLongError as e:
        return "error", type(e).__name__


def same(a, b) -> bool:
    if a[0] != b[0]:
        return False
    x, y = a[1], b[1]
    if hasattr(x, "ids") and hasattr(y, "ids"):
        return all(
            np.array_equal(getattr(x, f), getattr(y, f)) for f in ("ids", "scores", "records", "lengths")
        )
    if isinstance(x, tuple):
        return all(np.array_equal(p, q) for p, q in zip(x, y, strict=True))
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
        return np.array_equal(np.asarray(x), np.asarray(y))
    return x == y


def test_random_operations_answer_as_the_in_process_core_does(tmp_path: Path) -> None:
    """400 random operations (create, append, a replayed or conflicting append, search, evict, pin, fetch,
    delete, info; a graceful restart half-way) get the same answers and the same errors from the service
    as from an in-process MemoryBank."""
    rng = np.random.default_rng(2024)
    spec = tiny_spec(memory_size=32)
    config = RetMemConfig(data_dir=tmp_path, shards=("shard0",))
    server = RetMemServer(config)
    server.start()
    client = RetMemClient({"shard0": server.address()}, timeout_s=20)
    bank = MemoryBank()
    live: dict[str, int] = {}  # session -> next chunk id
    history: dict[str, list] = {}  # session -> appended batches (for replays)
    n_sessions = 0
    results = []
    for step in range(400):
        if step == 200:  # a graceful restart in the middle must not change any answer
            server.stop(grace_s=5)
            server = RetMemServer(config)
            server.start()
            client = RetMemClient({"shard0": server.address()}, timeout_s=20)
        if not live or rng.random() < 0.03:
            sid = f"s{n_sessions}"
            n_sessions += 1
            a = outcome(lambda: bank.create(sid, spec.memory_config()))
            a = (a[0], None) if a[0] == "ok" else a
            results.append(same(a, outcome(lambda: client.create_session(sid, spec))))
            live[sid], history[sid] = 0, []
            continue
        sid = list(live)[rng.integers(len(live))]
        op = rng.choice(
            [
                "append",
                "append",
                "search",
                "search",
                "evict",
                "pin",
                "unpin",
                "fetch",
                "replay",
                "conflict",
                "delete",
                "info",
            ],
            p=[0.2, 0.1, 0.2, 0.1, 0.06, 0.06, 0.04, 0.06, 0.06, 0.04, 0.02, 0.06],
        )
        mem = bank.get(sid)
        stored = mem.ids()
        if op == "append":
            batch = chunks(rng, spec, live[sid] + int(rng.integers(0, 3)), int(rng.integers(1, 6)))
            a, b = outcome(lambda: mem.append(*batch)), outcome(lambda: client.append(sid, *batch))
            if a[0] == "ok":
                live[sid] = int(batch[0][-1]) + 1
                history[sid].append(batch)
        elif op in ("replay", "conflict") and history[sid]:
            ids, emb, rec, lengths = history[sid][rng.integers(len(history[sid]))]
            if op == "conflict":
                rec = rec.copy()
                rec[0, 0] ^= 1
            a = outcome(lambda: mem.append(ids, emb, rec, lengths))
            b = outcome(lambda: client.append(sid, ids, emb, rec, lengths))
        elif op == "search":
            q = rng.standard_normal((int(rng.integers(1, 4)), spec.dim)).astype(np.float32)
            k = int(rng.integers(1, 10))
            a, b = outcome(lambda: mem.search(q, k)), outcome(lambda: client.search(sid, q, k))
        elif op == "evict":
            n_free = None if rng.random() < 0.5 else int(rng.integers(1, 8))
            a, b = outcome(lambda: mem.evict(n_free)), outcome(lambda: client.evict(sid, n_free))
        elif op in ("pin", "unpin", "fetch"):
            pick = rng.choice(stored, min(len(stored), 3), replace=False) if len(stored) else np.array([7])
            pick = np.sort(pick).astype(np.int64)
            if rng.random() < 0.1:
                pick = np.array([10_000], np.int64)  # unknown id
            if op == "fetch":
                a, b = outcome(lambda: mem.fetch(pick)), outcome(lambda: client.fetch(sid, pick))
            else:
                a = outcome(lambda: getattr(mem, op)(pick))
                b = outcome(lambda: getattr(client, op)(sid, pick))
        elif op == "delete":
            a, b = outcome(lambda: bank.delete(sid)), outcome(lambda: client.delete_session(sid))
            live.pop(sid)
        else:
            a = outcome(lambda: {k: float(v) for k, v in mem.stats().items()})
            b = outcome(lambda: client.info(sid).stats)
        if op in ("replay", "conflict") and not history[sid]:
            continue
        results.append(same(a, b))
        assert results[-1], (step, op, a, b)
    server.stop(grace_s=1)
    assert len(results) > 300 and all(results)


@pytest.fixture
def tie_session(client: RetMemClient):
    spec = tiny_spec(memory_size=300)
    rng = np.random.default_rng(7)
    client.create_session("b2", spec)
    ids, emb, rec, lengths = chunks(rng, spec, 0, 240)
    emb[100:140] = emb[0:40]  # duplicated embeddings: exact ties, broken by chunk order
    emb = np.round(emb, 1)  # coarse values: more near-ties
    for lo in range(0, 240, 40):
        client.append("b2", ids[lo : lo + 40], emb[lo : lo + 40], rec[lo : lo + 40], lengths[lo : lo + 40])
    return spec, ids, emb, rng


def test_search_is_exact_against_brute_force(client: RetMemClient, tie_session) -> None:
    spec, ids, emb, rng = tie_session
    queries = np.concatenate([emb[:50], np.round(rng.standard_normal((150, spec.dim)), 1)]).astype(np.float32)
    k = 8
    got = client.search("b2", queries, k)
    scores = queries.astype(np.float64) @ emb.astype(np.float64).T  # (q, n)
    for r in range(len(queries)):
        order = np.lexsort((ids, -scores[r]))[:k]  # score desc, then older first
        assert np.array_equal(got.ids[r], np.sort(ids[order])), r


def test_ids_and_kv_records_stay_aligned_through_many_evictions(client: RetMemClient) -> None:
    spec = tiny_spec(memory_size=32)
    client.create_session("b3", spec)
    rng = np.random.default_rng(8)

    def record_of(i: np.ndarray) -> np.ndarray:  # the K/V bytes implied by chunk ids: (n, record_bytes)
        return np.tile(i.astype("<i8").view(np.uint8).reshape(-1, 8), (1, spec.record_bytes // 8))

    for lo in range(0, 600, 5):
        ids = np.arange(lo, lo + 5, dtype=np.int64)
        emb = rng.standard_normal((5, spec.dim)).astype(np.float32)
        client.append("b3", ids, emb, record_of(ids), np.full(5, 1 + lo % 4, np.int32))
        if lo % 50 == 0:
            client.search("b3", rng.standard_normal((4, spec.dim)).astype(np.float32), 4)
    info = client.info("b3")
    assert info.stats["eviction_rounds"] >= 50
    assert info.num_chunks <= spec.memory_size
    mismatches = searches = 0
    for _ in range(100):
        res = client.search("b3", rng.standard_normal((100, spec.dim)).astype(np.float32), 8)
        flat_ids = res.ids.reshape(-1)
        valid = flat_ids >= 0
        expect = record_of(flat_ids[valid])
        mismatches += int((res.records.reshape(-1, spec.record_bytes)[valid] != expect).any(axis=1).sum())
        searches += len(res.ids)
    assert searches == 10_000 and mismatches == 0
