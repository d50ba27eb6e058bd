"""The decoder's write-behind appends (services/decoder/writer.py through SessionPort): in order, one
Append per append, a search made only after the appends asked for before it, bounded, and a failed
Append fails the call instead of being lost.

A fake ret-mem client stands in for the network: a dict of stored chunks, searched by brute force, whose
appends wait at a gate the test opens one Append at a time."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from memlong.errors import Unavailable
from memlong.memory import SearchResult
from memlong.rpc.channel import Deadline
from memlong.services.decoder.port import SessionPort

WAIT_S = 30.0  # only a guard against hanging: every wait below ends on an event
DIM, RB = 4, 6


class GatedStore:
    """ret-mem for one session: `append` blocks until `release()` lets one Append through."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.ids: list[int] = []
        self.emb: dict[int, np.ndarray] = {}
        self.calls: list[list[int]] = []  # ids of each Append, in the order they landed
        self.fail_at = fail_at  # the Append (0-based) that fails
        self._gate = threading.Semaphore(0)
        self.waiting = threading.Semaphore(0)  # released when an Append reaches the gate

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self._gate.release()

    def append(self, session_id, ids, embeddings, records, lengths, deadline=None) -> int:
        self.waiting.release()
        assert self._gate.acquire(timeout=WAIT_S)
        if self.fail_at == len(self.calls):
            self.calls.append([])
            raise Unavailable("ret-mem went away")
        self.calls.append([int(i) for i in ids])
        for i, e in zip(ids, embeddings, strict=True):
            self.ids.append(int(i))
            self.emb[int(i)] = np.asarray(e, np.float32)
        return len(ids)

    def search(self, session_id, queries, top_k, deadline=None, calls=None) -> SearchResult:
        ids = np.array(sorted(self.ids), np.int64)
        q = len(queries)
        out = SearchResult(
            np.full((q, top_k), -1, np.int64),
            np.full((q, top_k), -np.inf, np.float32),
            np.zeros((q, top_k, RB), np.uint8),
            np.zeros((q, top_k), np.int32),
        )
        if len(ids):
            emb = np.stack([self.emb[i] for i in ids]).astype(np.float64)
            scores = (emb[None] * np.asarray(queries, np.float64)[:, None]).sum(axis=2).astype(np.float32)
            for r in range(q):
                best = np.sort(np.lexsort((ids, -scores[r]))[:top_k])  # chronological
                n = len(best)
                out.ids[r, :n], out.scores[r, :n] = ids[best], scores[r, best]
                out.records[r, :n], out.lengths[r, :n] = _record(ids[best]), 1
        return out


def _emb(i: int) -> np.ndarray:
    return np.eye(DIM, dtype=np.float32)[i % DIM] * (1 + i)  # chunk i points along axis i % DIM


def _record(ids) -> np.ndarray:
    return np.repeat(np.asarray(ids, np.uint8)[:, None], RB, axis=1)


def _chunk(i: int):
    return np.array([i], np.int64), _emb(i)[None], _record([i]), np.ones(1, np.int32)


def _port(store: GatedStore, limit: int, executor=None) -> SessionPort:
    return SessionPort(
        store,
        "s",
        Deadline.after(WAIT_S),
        commit=True,
        alive=lambda: True,
        executor=executor,
        keep_recent=False,
        write_behind=limit,
    )


def _wait_for_append(store: GatedStore) -> None:
    assert store.waiting.acquire(timeout=WAIT_S)


def test_appends_return_at_once_and_land_in_order():
    store = GatedStore()
    port = _port(store, limit=8)
    port.append(*_chunk(0))  # returns at once: chunk 0 waits at the gate in the background
    _wait_for_append(store)
    for i in (1, 2, 3):
        port.append(*_chunk(i))  # queued behind chunk 0's Append
    assert store.calls == []
    store.release(4)
    port.flush()
    assert store.calls == [[0], [1], [2], [3]]  # the Appends the serving thread would have made
    assert port._writer.chunks == 4
    port.close()


def test_a_search_is_made_after_the_appends_asked_for_before_it():
    store = GatedStore()
    port = _port(store, limit=8)
    port.append(*_chunk(0))
    _wait_for_append(store)  # chunk 0 is in flight, not in the store
    query = _emb(0)[None]
    found = []
    search = threading.Thread(target=lambda: found.append(port.search(query, 2)))
    search.start()
    search.join(0.2)
    assert search.is_alive() and not found  # waits for chunk 0's Append
    store.release()
    search.join(WAIT_S)
    assert found[0].ids[0].tolist() == [0, -1] and found[0].records[0, 0].tolist() == [0] * RB
    port.close()


def test_a_search_started_ahead_waits_on_its_own_thread_for_the_appends_before_it():
    store = GatedStore()
    with ThreadPoolExecutor(1) as pool:
        port = _port(store, limit=8, executor=pool)
        port.append(*_chunk(0))
        _wait_for_append(store)
        ahead = port.search_async(lambda: _emb(0)[None], 2, lambda res: res.ids[0].tolist())
        port.append(*_chunk(1))  # asked for after the search: the search does not wait for it
        store.release()  # chunk 0 lands; the search runs (chunk 1 is next at the gate)
        assert ahead.result() == [0, -1]
        store.release()
        port.flush()
        assert store.calls == [[0], [1]]
        port.close()


def test_held_chunks_are_bounded_by_waiting_for_acknowledgements():
    store = GatedStore()
    port = _port(store, limit=2)
    port.append(*_chunk(0))
    _wait_for_append(store)
    port.append(*_chunk(1))  # two held: the limit
    third = threading.Thread(target=port.append, args=_chunk(2))
    third.start()
    third.join(0.2)
    assert third.is_alive()  # waits for room
    store.release()  # chunk 0 acknowledged: room for chunk 2
    third.join(WAIT_S)
    assert not third.is_alive()
    store.release(2)
    port.flush()
    assert store.ids == [0, 1, 2]
    port.close()


def test_a_failed_append_fails_the_call_and_what_was_queued_is_not_sent():
    store = GatedStore(fail_at=0)
    port = _port(store, limit=8)
    port.append(*_chunk(0))
    _wait_for_append(store)
    port.append(*_chunk(1))  # queued behind the Append that will fail
    store.release()
    with pytest.raises(Unavailable, match="went away"):
        port.flush()
    with pytest.raises(Unavailable):
        port.append(*_chunk(2))
    with pytest.raises(Unavailable):
        port.search(_emb(0)[None], 2)
    port.close()
    assert store.calls == [[]]  # chunk 1 was never sent
    assert store.ids == []  # nothing stored after the failure: the gateway rolls the append back


def test_close_drops_what_was_not_sent_and_waits_for_the_append_in_flight():
    store = GatedStore()
    port = _port(store, limit=8)
    port.append(*_chunk(0))
    _wait_for_append(store)
    port.append(*_chunk(1))
    closing = threading.Thread(target=port.close)
    closing.start()
    closing.join(0.2)
    assert closing.is_alive()  # chunk 0's Append is still in flight
    store.release()
    closing.join(WAIT_S)
    assert not closing.is_alive()
    assert store.calls == [[0]]  # chunk 1 was never sent, and nothing lands after close


def test_without_write_behind_each_append_is_made_before_the_call_reads_on():
    store = GatedStore()
    port = _port(store, limit=0)
    store.release()
    port.append(*_chunk(0))
    assert store.calls == [[0]] and port._writer is None
