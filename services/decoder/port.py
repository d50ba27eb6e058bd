"""One call's view of a ret-mem session: the chunk loop's `MemoryPort` over `RetMemClient`.

- Every ret-mem call carries a timeout derived from the serving call's remaining time, and checks first
  that the serving call is still wanted (a cancelled call stops at the next chunk boundary).
- Chunks appended during the call are also kept here (`recent`) and merged into every search result,
  so reads that must not change the session (`commit=False`: score and generate keep their own chunks
  to themselves) are exact (the union of two top-k lists contains the top-k of the union).
- `search_async` runs query embedding, search and that merge on a background thread, so retrieval for
  the next chunk overlaps the model's work on the current one. It answers for the memory of the moment
  it is called (the chunks appended so far); the chunk loop uses it only where nothing was appended since.
  A search whose answer is not used is cancelled (`PrefetchedSearch.cancel`: a queued one never starts,
  a running one's ret-mem call is cancelled), and `close` cancels those still open when the call ends.

- With `write_behind` > 0 the call's appends are made by a background writer (writer.py), at most
  that many chunks unacknowledged; a search is made only after the appends asked for before it (for a
  search started ahead, on its own thread), so ret-mem answers as it would without the writer. `flush`
  waits for them all (the caller reports success only after it); `close` stops the writer.

Not handled: a chunk evicted by ret-mem during the call can still be returned from `recent`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import grpc
import numpy as np

from memlong.errors import DeadlineExceeded, Unavailable, shown
from memlong.memory import PendingChunks, SearchResult
from memlong.rpc import tracing
from memlong.rpc.channel import CallScope, Deadline
from memlong.services.retmem.client import RetMemClient

from .writer import WriteBehind


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
        write_behind: int = 0,
    ) -> None:
        self.client = client
        self.session_id = session_id
        self.deadline = deadline
        self.commit = commit
        self.alive = alive
        self.executor = executor
        self.keep_recent = keep_recent
        self._recent = PendingChunks()  # this call's own chunks, merged into every search
        # appends made in the background (commit only); searches wait for those asked for before them
        self._writer = (
            WriteBehind(self._append_now, write_behind, deadline.remaining)
            if commit and write_behind
            else None
        )
        self._ahead: set[PrefetchedSearch] = set()  # searches started ahead, neither read nor cancelled
        self.retrieved_ids: list[int] = []
        if executor is None:  # nothing runs in the background: the chunk loop retrieves at each boundary
            self.search_async = None

    # -- plumbing -----------------------------------------------------------------------------------

    def _check(self) -> None:
        if not self.alive():
            raise CallCancelled("the call was cancelled")
        if self.deadline.remaining() <= 0:
            raise CallCancelled("the call's deadline passed")

    def _remote(self, fn: Callable, *args, **kwargs):
        self._check()
        deadline = self.deadline.downstream()
        if deadline.remaining() <= 0:
            raise CallCancelled("no time left for a ret-mem call")
        try:
            return fn(self.session_id, *args, deadline=deadline, **kwargs)
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
        if self._writer is not None:
            self._check()
            with _in_time():
                self._writer.put(ids, embeddings, records, lengths)
            return len(ids)
        if self.commit:
            return self._append_now(ids, embeddings, records, lengths)
        self._check()
        return len(ids)

    def _append_now(self, ids, embeddings, records, lengths) -> int:
        return int(self._remote(self.client.append, ids, embeddings, records, lengths))

    def flush(self) -> None:
        """Every chunk appended so far is stored (acknowledged by ret-mem): call before reporting success."""
        if self._writer is not None:
            with _in_time():
                self._writer.flush()

    def search(self, queries: np.ndarray, top_k: int) -> SearchResult:
        self.flush()  # ret-mem answers after the appends made before the search, as without the writer
        remote = self._remote(self.client.search, queries, top_k)
        return self._note(self._recent.merge(queries, remote, top_k))

    def search_async(
        self, make_queries: Callable[[], np.ndarray], top_k: int, then: Callable[[SearchResult], Any]
    ) -> PrefetchedSearch:
        recent = self._recent.copy()  # the chunks appended so far: this search's memory
        mark = self._writer.mark() if self._writer is not None else 0  # and ret-mem has them first

        def run(calls: CallScope) -> tuple[SearchResult, Any]:
            if self._writer is not None:
                with _in_time():
                    self._writer.wait_for(mark)
            queries = make_queries()
            _check_wanted(calls)
            remote = self._remote(self.client.search, queries, top_k, calls=calls)
            result = recent.merge(queries, remote, top_k)
            _check_wanted(calls)
            return result, then(result)

        search = PrefetchedSearch(self, run)
        self._ahead.add(search)
        return search

    def close(self) -> None:
        """The call is over: cancel the searches started ahead that nobody will read, and stop the writer
        (what it had not sent is dropped; the Append in flight ends first)."""
        for search in list(self._ahead):
            search.cancel()
        if self._writer is not None:
            self._writer.close()

    def _note(self, result: SearchResult) -> SearchResult:
        self.retrieved_ids.extend(int(i) for i in result.ids.ravel() if i >= 0)
        return result


@contextlib.contextmanager
def _in_time() -> Iterator[None]:
    """The writer's wait for the call's deadline, as the call's end."""
    try:
        yield
    except TimeoutError as exc:
        raise CallCancelled(str(exc)) from exc


def _check_wanted(calls: CallScope) -> None:
    if calls.cancelled:
        raise CallCancelled("the search started ahead was cancelled")


class PrefetchedSearch:
    """A search running on the port's executor. Read it (`result`) or give it up (`cancel`), once."""

    def __init__(self, port: SessionPort, run: Callable[[CallScope], tuple[SearchResult, Any]]) -> None:
        self.port = port
        self.work_s = 0.0
        self._calls = CallScope()  # the search's ret-mem call, for cancel

        def timed() -> tuple[SearchResult, Any]:
            t0 = time.perf_counter()
            try:
                return run(self._calls)
            finally:
                self.work_s = time.perf_counter() - t0

        # in_current_context: the prefetch's ret-mem call stays in the serving call's trace.
        assert port.executor is not None
        self._future = port.executor.submit(tracing.in_current_context(timed))

    def result(self) -> Any:
        """`then` of the search's result (the retrieved ids are noted here, in the caller's order)."""
        self.port._ahead.discard(self)
        try:
            result, out = self._future.result(timeout=max(self.port.deadline.remaining(), 0.0))
        except FutureTimeout as exc:
            self.cancel()
            raise CallCancelled("the call's deadline passed during retrieval") from exc
        self.port._note(result)
        return out

    def cancel(self) -> None:
        """Give the search up: a queued one never starts; a running one stops before its next step and
        its ret-mem call is cancelled (ret-mem stops the work; the executor's thread is free again)."""
        self.port._ahead.discard(self)
        self._future.cancel()
        self._calls.cancel()
