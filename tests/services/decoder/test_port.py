"""The decoder's session port: a search started ahead and given up stops, and frees its thread.

A fake ret-mem client stands in for the network: its search waits until its call is cancelled (as
gRPC's call does when cancelled from another thread) or let go."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from memlong.memory import SearchResult
from memlong.rpc.channel import Deadline
from memlong.services.decoder.port import CallCancelled, SessionPort

WAIT_S = 30.0  # only a guard against hanging: every wait below ends on an event


class _Cancelled(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.CANCELLED


class _Call:
    def __init__(self, go: threading.Event) -> None:
        self.go, self.cancelled = go, False

    def cancel(self) -> None:
        self.cancelled = True
        self.go.set()


class WaitingClient:
    """search(...) adds its call to `calls`, then waits until the call is cancelled or `go` is set."""

    def __init__(self) -> None:
        self.entered, self.go = threading.Event(), threading.Event()
        self.started: list[_Call] = []

    def search(self, session_id, queries, top_k, deadline=None, calls=None):
        call = _Call(self.go)
        calls.add(call)
        self.started.append(call)
        self.entered.set()
        assert self.go.wait(WAIT_S)
        if call.cancelled:
            raise _Cancelled()
        q = len(queries)
        return SearchResult(
            np.tile(np.arange(top_k, dtype=np.int64), (q, 1)),
            np.zeros((q, top_k), np.float32),
            np.zeros((q, top_k, 4), np.uint8),
            np.ones((q, top_k), np.int32),
        )


@pytest.fixture
def executor():
    with ThreadPoolExecutor(1, "prefetch") as pool:
        yield pool


def _port(client, executor) -> SessionPort:
    return SessionPort(client, "s", Deadline.after(60), commit=False, alive=lambda: True, executor=executor)


def _free(executor) -> bool:
    """The executor's one thread runs new work: nothing given up still holds it."""
    return executor.submit(lambda: True).result(timeout=WAIT_S)


def test_closing_the_port_cancels_a_running_search_and_frees_its_thread(executor):
    client = WaitingClient()
    port = _port(client, executor)
    decoded = []
    search = port.search_async(lambda: np.zeros((1, 4), np.float32), 2, decoded.append)
    assert client.entered.wait(WAIT_S)
    port.close()  # the call is over
    assert client.started[0].cancelled
    assert _free(executor)
    assert decoded == []  # the K/V of a search nobody reads are not decoded
    with pytest.raises(CallCancelled):
        search.result()


def test_a_queued_search_given_up_never_starts(executor):
    client, gate = WaitingClient(), threading.Event()
    busy = executor.submit(gate.wait, WAIT_S)  # the one thread is taken: the search waits its turn
    embedded = []
    search = _port(client, executor).search_async(
        lambda: embedded.append(1) or np.zeros((1, 4), np.float32), 2, lambda r: r
    )
    search.cancel()
    gate.set()
    assert busy.result(timeout=WAIT_S) and _free(executor)
    assert embedded == [] and client.started == []


def test_a_search_that_was_read_is_not_cancelled_at_close(executor):
    client = WaitingClient()
    client.go.set()
    port = _port(client, executor)
    search = port.search_async(lambda: np.zeros((1, 4), np.float32), 2, lambda r: r.ids)
    np.testing.assert_array_equal(search.result(), [[0, 1]])
    assert port.retrieved_ids == [0, 1]
    port.close()
    assert not client.started[0].cancelled
