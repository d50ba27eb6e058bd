"""One call's view of a ret-mem session: the chunk loop's `MemoryPort` over `RetMemClient`.

- Every ret-mem call carries a timeout derived from the serving call's remaining time, and checks first
  that the serving call is still wanted (a cancelled call stops at the next chunk boundary).
- Chunks appended during the call are also kept here (`recent`) and merged into every search result.
  That makes two things exact: reads that must not change the session (`commit=False`: score and
  generate keep their own chunks to themselves), and prefetched searches issued before the current
  chunk's own appends reached ret-mem (the union of two top-k lists contains the top-k of the union).
- `search_async` runs query embedding and search on a background thread, so retrieval for the next
  chunk overlaps the model's work on the current one.

Not handled: a chunk evicted by ret-mem during the call can still be returned from `recent`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Executor
from concurrent.futures import TimeoutError as FutureTimeout

import grpc
import numpy as np

from memlong.errors import DeadlineExceeded, MemLongError, Unavailable, shown
from memlong.memory import PendingChunks, SearchResult
from memlong.rpc import tracing
from memlong.rpc.channel import Deadline
from memlong.services.retmem.client import RetMemClient


class CallCancelled(Exception):
    """The serving call was cancelled or ran out of time; its work stops here."""


class SessionPort:
    """MemoryPort for one serving call on one ret-mem session."""

    def __init__(
        self,
        client: RetMemClient,
        session_id: str,
        deadline: Deadline,
        *,
        commit: bool,
        alive: Callable[[], bool],
        executor: Executor | None,
        keep_recent: bool = True,
    ) -> None:
        self.client = client
        self.session_id = session_id
        self.deadline = deadline
        self.commit = commit
        self.alive = alive
        self.executor = executor
        self.keep_recent = keep_recent
        self._recent = PendingChunks()  # this call's own chunks, merged into every search
        self.retrieved_ids: list[int] = []
        self.stored_chunks = 0  # chunks the session held when the call opened it
        self.search_s = 0.0  # time in ret-mem searches (+ query embedding when in the background)

    # -- plumbing -----------------------------------------------------------------------------------

    def _check(self) -> None:
        if not self.alive():
            raise CallCancelled("the call was cancelled")
        if self.deadline.remaining() <= 0:
            raise CallCancelled("the call's deadline passed")

    def _remote(self, fn: Callable, *args):
        self._check()
        deadline = self.deadline.downstream()
        if deadline.remaining() <= 0:
            raise CallCancelled("no time left for a ret-mem call")
        try:
            return fn(self.session_id, *args, deadline=deadline)
        except DeadlineExceeded as exc:
            raise CallCancelled(f"no time left for a ret-mem call: {exc}") from exc
        except Unavailable as exc:
            raise Unavailable(f"ret-mem unreachable for session {shown(self.session_id)}: {exc}") from exc
        except grpc.RpcError as err:
            if err.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
                raise CallCancelled(f"ret-mem call ended: {err.code().name}") from err
            raise

    # -- MemoryPort ---------------------------------------------------------------------------------

    def append(
        self, ids: np.ndarray, embeddings: np.ndarray, records: np.ndarray, lengths: np.ndarray
    ) -> int:
        if self.keep_recent:
            self._recent.add(ids, embeddings, records, lengths)
        if self.commit:
            return int(self._remote(self.client.append, ids, embeddings, records, lengths))
        self._check()
        return len(ids)

    def search(self, queries: np.ndarray, top_k: int) -> SearchResult:
        t0 = time.perf_counter()
        remote = self._remote(self.client.search, queries, top_k)
        self.search_s += time.perf_counter() - t0
        return self._finish(queries, remote, top_k)

    def search_async(self, make_queries: Callable[[], np.ndarray], top_k: int) -> Callable[[], SearchResult]:
        if self.executor is None:
            return lambda: self.search(make_queries(), top_k)

        def run() -> tuple[np.ndarray, SearchResult]:
            t0 = time.perf_counter()  # the query's embedding runs here too, overlapped with compute
            queries = make_queries()
            remote = self._remote(self.client.search, queries, top_k)
            self.search_s += time.perf_counter() - t0
            return queries, remote

        # in_current_context: the prefetch's ret-mem call stays in the serving call's trace.
        future = self.executor.submit(tracing.in_current_context(run))

        def wait() -> SearchResult:
            try:
                queries, remote = future.result(timeout=max(self.deadline.remaining(), 0.0))
            except FutureTimeout as exc:
                raise CallCancelled("the call's deadline passed during retrieval") from exc
            except (MemLongError, CallCancelled):
                raise
            return self._finish(queries, remote, top_k)

        return wait

    # -- merging this call's own chunks -------------------------------------------------------------

    def _finish(self, queries: np.ndarray, remote: SearchResult, top_k: int) -> SearchResult:
        result = self._recent.merge(queries, remote, top_k)
        self.retrieved_ids.extend(int(i) for i in result.ids.ravel() if i >= 0)
        return result
