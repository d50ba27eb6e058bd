"""Fixtures for ret-mem tests: an in-process server on port 0 and a client of it per transport."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from memlong.services.retmem.client import RetMemClient
from memlong.services.retmem.server import RetMemConfig, RetMemServer


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RetMemServer]:
    srv = RetMemServer(RetMemConfig(data_dir=tmp_path / "data", shards=("shard0",), fsync="grouped"))
    srv.start()
    yield srv
    srv.stop(grace_s=1)


@pytest.fixture(params=["shm", "grpc"])
def client(server: RetMemServer, request: pytest.FixtureRequest) -> RetMemClient:
    """A client of `server` with K/V through shared memory (same host), then with K/V in the messages."""
    return RetMemClient({"shard0": server.address()}, timeout_s=20, shared_memory=request.param == "shm")
