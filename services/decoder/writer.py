"""Write-behind appends: a serving call's chunks go to ret-mem from a background thread while the model
reads on.

A durable per-layer append (2.8 MiB, fsync) takes tens of milliseconds: made in the serving thread, it
stalls the model once per chunk boundary. Here `put` returns at once and one thread per call makes the
Appends, one per `put`, in order. A search waits only for the Appends put before it (`wait_for` the
`mark` taken when the search was asked for), so ret-mem sees the same calls in the same order as with
synchronous appends and answers the same, retrieval counters and evictions included; with prefetch that
wait happens on the prefetch thread, beside the model's work. What is held is bounded: a `put` that
would hold more than `limit` chunks waits for acknowledgements first (back-pressure).

Durability is unchanged for the caller: the call reports success only after `flush` (every chunk
acknowledged, so durable on ret-mem's side). The first failed Append stops the writer; its error is
raised by the next `put`, `wait_for` or `flush`, and chunks not yet sent are dropped (the gateway rolls
the whole append back, as it does for any failed call). `close` drops what was not sent and waits for
the Append in flight, so that nothing lands after the call has ended.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

import numpy as np

from memlong.rpc import tracing


class WriteBehind:
    """Chunks appended in order by a background thread; `send(ids, embeddings, records, lengths)` makes
    one ret-mem Append (it raises on failure). `remaining()`: seconds the call has left, for waits."""

    def __init__(self, send: Callable[..., object], limit: int, remaining: Callable[[], float]) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self._send = send
        self.limit = limit
        self._remaining = remaining
        self._cond = threading.Condition()
        self._queue: deque[tuple[tuple[np.ndarray, ...], int]] = deque()  # (arrays, chunks): not sent
        self._n_held = 0  # chunks put and not yet acknowledged (queued or in flight)
        self._put = 0  # puts so far
        self._done = 0  # puts acknowledged
        self._error: BaseException | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        self.chunks = 0  # chunks acknowledged

    # -- the serving thread -------------------------------------------------------------------------

    def put(self, ids: np.ndarray, embeddings: np.ndarray, records: np.ndarray, lengths: np.ndarray) -> None:
        """Queue one Append of these chunks (handed over: never changed afterwards); waits while `limit`
        chunks are held."""
        n = len(np.asarray(ids).reshape(-1))
        with self._cond:
            self._wait(lambda: self._n_held + n <= self.limit or self._n_held == 0)
            self._queue.append(((ids, embeddings, records, lengths), n))
            self._n_held += n
            self._put += 1
            self._cond.notify_all()
        if self._thread is None:
            self._thread = threading.Thread(
                target=tracing.in_current_context(self._run), name="write-behind", daemon=True
            )
            self._thread.start()

    def mark(self) -> int:
        """The puts so far: `wait_for(mark)` waits until they are all acknowledged."""
        with self._cond:
            return self._put

    def wait_for(self, mark: int) -> None:
        """Until the first `mark` puts are acknowledged; raises the writer's error if an Append failed."""
        with self._cond:
            self._wait(lambda: self._done >= mark)

    def flush(self) -> None:
        """Until every chunk put is acknowledged; raises the writer's error if an Append failed."""
        self.wait_for(self.mark())

    def close(self) -> None:
        """Drop what was not sent and wait for the Append in flight (its own deadline bounds it)."""
        with self._cond:
            self._closed = True
            while self._queue:
                self._n_held -= self._queue.pop()[1]
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    def _wait(self, ready: Callable[[], bool]) -> None:
        """Under the lock: until ready(), or the writer failed (raised here), or the call's time is up."""
        while True:
            if self._error is not None:
                raise self._error
            if ready():
                return
            left = self._remaining()
            if left <= 0:
                raise TimeoutError("the call's deadline passed while its appends were being stored")
            self._cond.wait(timeout=min(left, 1.0))

    # -- the writer thread --------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                parts, n = self._queue[0]  # stays counted as held until acknowledged
            try:
                self._send(*parts)
            except BaseException as exc:  # noqa: BLE001 - raised in the serving thread
                with self._cond:
                    self._error = exc
                    self._cond.notify_all()
                return
            with self._cond:
                if self._queue and self._queue[0][0] is parts:  # close() may have emptied the queue
                    self._queue.popleft()
                    self._n_held -= n
                self._done += 1
                self.chunks += n
                self._cond.notify_all()
