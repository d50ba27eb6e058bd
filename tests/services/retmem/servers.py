"""Helpers for ret-mem tests: tiny specs, chunk factories, a server in a subprocess on port 0, health
polled with a deadline instead of sleeps, and a full scan that checks every stored chunk (the fixtures
are in conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memlong.services.retmem.client import RetMemClient
from memlong.services.retmem.server import SERVICE_NAME
from memlong.services.retmem.shard import Shard
from memlong.services.retmem.store import SessionSpec

REPO = Path(__file__).resolve().parents[3]
SERVING = health_pb2.HealthCheckResponse.SERVING


def tiny_spec(memory_size: int = 64, dim: int = 16) -> SessionSpec:
    """2 x 1 KV head x 4 tokens x 2 head_dim in bf16: 32-byte records."""
    return SessionSpec(dim=dim, kv_shape=(2, 1, 4, 2), kv_dtype="bfloat16", memory_size=memory_size)


def chunks(rng: np.random.Generator, spec: SessionSpec, first: int, n: int):
    """A batch of n chunks with ids first..first+n-1: (ids, embeddings, records, lengths)."""
    ids = np.arange(first, first + n, dtype=np.int64)
    emb = rng.standard_normal((n, spec.dim)).astype(np.float32)
    rec = rng.integers(0, 256, (n, spec.record_bytes), dtype=np.uint8)
    lengths = rng.integers(1, spec.chunk_tokens + 1, n).astype(np.int32)
    return ids, emb, rec, lengths


def open_shard(root: Path, **kw) -> Shard:
    """Shard "s" under data folder `root`, opened (whatever is on disk recovered)."""
    shard = Shard("s", root, **kw)
    shard.open()
    return shard


def shard_holding(
    root: Path,
    spec: SessionSpec,
    rng: np.random.Generator,
    n: int,
    sid: str = "a",
    *,
    checkpoint: bool = False,
) -> Shard:
    """`open_shard(root)` with session `sid` created and chunks 0..n-1 appended, then checkpointed
    (snapshots written) when `checkpoint`."""
    shard = open_shard(root)
    shard.create_session(sid, spec)
    shard.append(sid, *chunks(rng, spec, 0, n))
    if checkpoint:
        shard.checkpoint()
    return shard


def deterministic_chunk(spec: SessionSpec, seq: int):
    """Chunk content derived from its id alone, so a scan can check every byte after a crash."""
    rng = np.random.default_rng(seq)
    emb = rng.standard_normal((1, spec.dim)).astype(np.float32)
    rec = rng.integers(0, 256, (1, spec.record_bytes), dtype=np.uint8)
    return np.array([seq], np.int64), emb, rec, np.array([1 + seq % spec.chunk_tokens], np.int32)


def wait_serving(target: str, timeout_s: float = 60.0) -> None:
    """Block on a grpc.health.v1 Watch stream until SERVING; fail at the deadline (no sleeps).

    A stream cut by the server going away (a replica being replaced) is watched again on a new
    connection: UNAVAILABLE before the deadline is not an answer."""
    deadline = time.monotonic() + timeout_s
    request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
    while True:
        channel = grpc.insecure_channel(target)
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            for reply in stub.Watch(
                request, timeout=max(0.1, deadline - time.monotonic()), wait_for_ready=True
            ):
                if reply.status == SERVING:
                    return
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() >= deadline:
                raise
            continue
        finally:
            channel.close()
        raise TimeoutError(f"{target}: health stream ended before SERVING")


class ServerProcess:
    """`python -m memlong.services.retmem serve` in a subprocess, on port 0."""

    def __init__(self, data_dir: Path, shards: str = "shard0", fsync: str = "grouped", *extra: str) -> None:
        cmd = [
            sys.executable,
            "-m",
            "memlong.services.retmem",
            "serve",
            "--port",
            "0",
            "--data-dir",
            str(data_dir),
            "--shards",
            shards,
            "--fsync",
            fsync,
            *extra,
        ]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        line = self.proc.stdout.readline()  # blocks until the server prints its port (or dies)
        if not line.startswith("RETMEM_PORT="):
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r}")
        self.port = int(line.strip().split("=")[1])
        self.target = f"127.0.0.1:{self.port}"

    def wait_serving(self, timeout_s: float = 60.0) -> None:
        wait_serving(self.target, timeout_s)

    def kill(self, sig: int = 9) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)


def scan(client: RetMemClient, session_id: str, spec) -> dict[str, int]:
    """Full scan of a session; checks every stored chunk against the content its id implies."""
    _, state = client.export_session(session_id)
    ids = state["ids"]
    mismatches = 0
    for i, seq in enumerate(ids):
        _, emb, rec, lengths = deterministic_chunk(spec, int(seq))
        ok = np.array_equal(state["records"][i], rec[0]) and np.array_equal(state["embeddings"][i], emb[0])
        mismatches += not (ok and state["lengths"][i] == lengths[0])
    return {"ids": ids, "duplicates": len(ids) - len(np.unique(ids)), "mismatches": mismatches}
