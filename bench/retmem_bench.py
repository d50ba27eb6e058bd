"""ret-mem benchmark: the decoder's per-chunk retrieval call, appends, recovery.

    python bench/retmem_bench.py [--iters 300] [--out bench/results]

Per-chunk retrieval (1 query row, top-8, SmolLM2 memory-layer K/V (2, 3, 128, 64) bf16 = 96 KiB per
chunk, 384-d embeddings) against sessions of 32k / 256k / 1M tokens (250 / 2000 / 8000 chunks),
over gRPC on loopback (server in its own process) and in-process (LocalStore), in one run. Append
throughput with fsync per append and grouped (1 and 8 concurrent writers). Recovery time of a
1M-token session from the log alone and from a snapshot. Writes retmem.json and retmem.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from memlong.services.retmem.client import RetMemClient  # noqa: E402
from memlong.services.retmem.store import LocalStore, SessionSpec  # noqa: E402

SPEC_KW = dict(dim=384, kv_shape=(2, 3, 128, 64), kv_dtype="bfloat16")
SIZES = {"32k": 250, "256k": 2000, "1M": 8000}  # tokens -> chunks of 128
TOP_K = 8
BATCH = 32


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


class Server:
    def __init__(self, data_dir: Path, fsync: str) -> None:
        cmd = [
            sys.executable,
            "-m",
            "memlong.services.retmem",
            "serve",
            "--port",
            "0",
            "--data-dir",
            str(data_dir),
            "--fsync",
            fsync,
            "--checkpoint-mb",
            "1000000",
            "--drain-s",
            "0",
            "--max-message-mb",
            "64",
        ]
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        self.port = int(self.proc.stdout.readline().strip().split("=")[1])
        self.client = RetMemClient({"shard0": f"127.0.0.1:{self.port}"}, timeout_s=120)

    def wait_serving(self) -> float:
        """Seconds from process start until health is SERVING (watch stream, no polling sleeps)."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as ch:
            req = health_pb2.HealthCheckRequest(service="memlong.retmem.v1.RetMem")
            for reply in health_pb2_grpc.HealthStub(ch).Watch(req, timeout=600, wait_for_ready=True):
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return time.perf_counter() - self.t0
        raise RuntimeError("server never became SERVING")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)
        self.proc.wait(timeout=600)


def make_batch(rng: np.random.Generator, spec: SessionSpec, first: int, n: int):
    ids = np.arange(first, first + n, dtype=np.int64)
    emb = rng.standard_normal((n, spec.dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    kv = rng.integers(0, 1 << 16, (n, spec.record_bytes // 2), dtype=np.uint16).view(np.uint8)
    return ids, emb, kv, np.full(n, spec.chunk_tokens, np.int32)


def fill(store, sid: str, spec: SessionSpec, n: int, seed: int) -> None:
    store.create_session(sid, spec)
    rng = np.random.default_rng(seed)
    for lo in range(0, n, BATCH):
        store.append(sid, *make_batch(rng, spec, lo, min(BATCH, n - lo)))


REPLY_BYTES = TOP_K * 96 * 1024  # K/V bytes of one per-chunk retrieval (768 KiB)
ECHO = "memlong.bench.Echo"


def summarize(lat_s: list[float], payload: int = REPLY_BYTES) -> dict:
    lat_ms = np.array(lat_s) * 1e3
    p50, p99 = float(np.percentile(lat_ms, 50)), float(np.percentile(lat_ms, 99))
    return {
        "p50_ms": round(p50, 3),
        "p99_ms": round(p99, 3),
        "mean_ms": round(float(lat_ms.mean()), 3),
        "MBps_at_p50": round(payload / 1e6 / (p50 / 1e3), 1),
        "iters": len(lat_s),
    }


def interleaved(calls: dict, iters: int, block: int = 10, warmup: int = 20) -> dict:
    """Time each call `iters` times, alternating blocks of `block` calls between them, so that load
    from other processes on a shared machine falls on every path alike. Returns {name: summary}."""
    for f in calls.values():
        for _ in range(warmup):
            f()
    lat: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(0, iters, block):
        for name, f in calls.items():
            for _ in range(block):
                t = time.perf_counter()
                f()
                lat[name].append(time.perf_counter() - t)
    return {name: summarize(v) for name, v in lat.items()}


def searcher(store, sid: str, dim: int, seed: int, streamed: bool = False):
    """A per-chunk retrieval call (1 query row, top-8) with a fresh random query each time."""
    rng = np.random.default_rng(seed)

    def call() -> None:
        q = rng.standard_normal((1, dim)).astype(np.float32)
        res = search_streamed(store, sid, q) if streamed else store.search(sid, q, TOP_K)
        assert res.records.shape == (1, TOP_K, 96 * 1024)

    return call


def search_streamed(client: RetMemClient, sid: str, q: np.ndarray):
    """The same call through the server-streaming Search RPC (one message per row), for comparison."""
    from memlong.api.retmem.v1 import retmem_pb2 as pb
    from memlong.services.common import tensor
    from memlong.services.retmem.client import _Rows

    spec = client.spec(sid)
    rows = _Rows(spec, len(q), TOP_K)
    req = pb.SearchRequest(session_id=sid, queries=tensor.encode(q), top_k=TOP_K)
    for msg in client._stub(sid).Search(req, timeout=client.timeout_s):
        rows.add(msg)
    return rows.result()


# ------------------------------------------------------------------ the floor: a raw-bytes echo


def echo_server() -> int:
    """Serve raw-bytes RPCs (no protobuf, no checksum, no work) with the services' server settings:
    Unary and Stream reply REPLY_BYTES, Small replies 1 byte. Prints ECHO_PORT=<port>."""
    import grpc

    from memlong.services.common.server import ServerOptions, Service, create_server

    payload = np.random.default_rng(0).integers(0, 256, REPLY_BYTES, np.uint8).tobytes()

    def stream(request, context):
        yield payload

    handler = grpc.method_handlers_generic_handler(
        ECHO,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(lambda request, context: payload),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
            "Small": grpc.unary_unary_rpc_method_handler(lambda request, context: b"x"),
        },
    )
    service = Service(ECHO, lambda servicer, server: server.add_generic_rpc_handlers((handler,)), None)
    server, port = create_server("127.0.0.1:0", [service], ServerOptions(max_message_bytes=64 << 20))
    sys.stdout.write(f"ECHO_PORT={port}\n")
    sys.stdout.flush()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.stop(0)
    return 0


class EchoProcess:
    def __init__(self) -> None:
        from memlong.rpc.channel import ChannelOptions, get_channel

        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--echo-server"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        port = int(self.proc.stdout.readline().strip().split("=")[1])
        channel = get_channel(f"127.0.0.1:{port}", ChannelOptions(max_message_bytes=64 << 20))
        self.unary = channel.unary_unary(f"/{ECHO}/Unary")
        self.stream = channel.unary_stream(f"/{ECHO}/Stream")
        self.small = channel.unary_unary(f"/{ECHO}/Small")

    def calls(self) -> dict:
        def unary() -> None:
            assert len(self.unary(b"q", timeout=30, wait_for_ready=True)) == REPLY_BYTES

        def stream() -> None:
            assert len(b"".join(self.stream(b"q", timeout=30, wait_for_ready=True))) == REPLY_BYTES

        return {
            "echo_unary_768KiB": unary,
            "echo_stream_768KiB": stream,
            "echo_unary_1B": lambda: self.small(b"q", timeout=30),
        }

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


def append_throughput(
    client: RetMemClient, spec: SessionSpec, writers: int, per_writer: int, tag: str
) -> dict:
    sids = [f"app-{tag}-{w}" for w in range(writers)]
    for s in sids:
        client.create_session(s, spec)
    batches = {s: make_batch(np.random.default_rng(i), spec, 0, per_writer) for i, s in enumerate(sids)}

    def run(s: str) -> None:
        ids, emb, kv, lengths = batches[s]
        for i in range(per_writer):
            client.append(s, ids[i : i + 1], emb[i : i + 1], kv[i : i + 1], lengths[i : i + 1])

    t = time.perf_counter()
    threads = [threading.Thread(target=run, args=(s,)) for s in sids]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    dt = time.perf_counter() - t
    n = writers * per_writer
    return {
        "writers": writers,
        "chunks": n,
        "chunks_per_s": round(n / dt, 1),
        "MBps": round(n * spec.record_bytes / 1e6 / dt, 1),
        "ms_per_append": round(dt / per_writer * 1e3, 3),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--appends", type=int, default=200, help="single-chunk appends per writer")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.echo_server:
        return echo_server()
    work = Path(tempfile.mkdtemp(prefix="retmem-bench-", dir=os.environ.get("RETMEM_BENCH_DIR")))
    result: dict = {
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        },
        "settings": {
            "top_k": TOP_K,
            "chunk_tokens": 128,
            "kv_shape": [2, 3, 128, 64],
            "kv_dtype": "bfloat16",
            "record_bytes": 96 * 1024,
            "dim": 384,
            "query_rows": 1,
            "iters": args.iters,
            "append_batch_for_fill": BATCH,
            "data_dir": str(work),
            "grpc": "loopback, server in a separate process, 64 MiB message limit; per-chunk call = unary Retrieve",
            "timing": "all paths of one session size interleaved in blocks of 10 calls (shared machine)",
        },
        "retrieval": {},
        "append": {},
        "recovery": {},
    }
    local = LocalStore()
    server = Server(work / "grouped", "grouped")
    server.wait_serving()
    echo = EchoProcess()
    for label, n in SIZES.items():
        spec = SessionSpec(memory_size=n, **SPEC_KW)
        sid = f"ret-{label}"
        t = time.perf_counter()
        fill(server.client, sid, spec, n, seed=n)
        fill_s = time.perf_counter() - t
        fill(local, sid, spec, n, seed=n)
        calls = {
            "grpc": searcher(server.client, sid, spec.dim, seed=1),
            "in_process": searcher(local, sid, spec.dim, seed=1),
            "grpc_streamed": searcher(server.client, sid, spec.dim, seed=1, streamed=True),
            **echo.calls(),
        }
        r = interleaved(calls, args.iters)
        local.delete_session(sid)
        floor = r["echo_unary_768KiB"]["p50_ms"]
        result["retrieval"][label] = {
            "chunks": n,
            "tokens": n * 128,
            **r,
            "grpc_over_in_process_p50": round(r["grpc"]["p50_ms"] / r["in_process"]["p50_ms"], 2),
            "floor_over_in_process_p50": round(
                (r["in_process"]["p50_ms"] + floor) / r["in_process"]["p50_ms"], 2
            ),
            "grpc_overhead_p50_ms": round(r["grpc"]["p50_ms"] - r["in_process"]["p50_ms"], 3),
            "grpc_fill_MBps": round(n * spec.record_bytes / 1e6 / fill_s, 1),
        }
        print(label, json.dumps(result["retrieval"][label]), flush=True)
    echo.stop()
    small = SessionSpec(memory_size=100_000, **SPEC_KW)
    result["append"]["grouped_1_writer"] = append_throughput(server.client, small, 1, args.appends, "g1")
    result["append"]["grouped_8_writers"] = append_throughput(
        server.client, small, 8, args.appends // 2, "g8"
    )
    # Recovery of the 1M-token session (plus the others) from the log only: kill -9, restart.
    server.stop(signal.SIGKILL)
    wal_bytes = sum(p.stat().st_size for p in (work / "grouped").rglob("*.wal"))
    again = Server(work / "grouped", "grouped")
    t_wal = again.wait_serving()
    again.client.search("ret-1M", np.ones((1, 384), np.float32), TOP_K)
    again.stop(signal.SIGTERM)  # graceful: snapshot at stop
    snap = Server(work / "grouped", "grouped")
    t_snap = snap.wait_serving()
    snap.stop(signal.SIGKILL)
    result["recovery"] = {
        "log_replay_s": round(t_wal, 2),
        "snapshot_s": round(t_snap, 2),
        "log_bytes": wal_bytes,
        "note": "process start to SERVING, 1M-token session + 256k + 32k + append sessions",
    }
    per = Server(work / "per_append", "per-append")
    per.wait_serving()
    result["append"]["per_append_1_writer"] = append_throughput(per.client, small, 1, args.appends, "p1")
    result["append"]["per_append_8_writers"] = append_throughput(
        per.client, small, 8, args.appends // 2, "p8"
    )
    per.stop(signal.SIGKILL)
    print(json.dumps(result["append"]), json.dumps(result["recovery"]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "retmem.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "retmem.md").write_text(markdown(result))
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        "# ret-mem benchmark",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores (shared with other work; load average at start "
        f"{m.get('loadavg_at_start', 'not recorded')}), Python {m['python']}. "
        "Per-chunk retrieval: 1 query row, top-8, K/V (2, 3, 128, 64) bf16 = 96 KiB per chunk "
        "(768 KiB per call), 384-d embeddings; gRPC on loopback with the server in its own process. "
        "Every path of one session size is timed in the same run, interleaved in blocks of 10 calls.",
        "",
        "Command: `python bench/retmem_bench.py` (writes retmem.json and this file).",
        "",
        "| session | chunks | gRPC p50 ms | gRPC p99 ms | gRPC MB/s | in-proc p50 ms | in-proc p99 ms | in-proc MB/s | gRPC/in-proc p50 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, x in r["retrieval"].items():
        g, p = x["grpc"], x["in_process"]
        lines.append(
            f"| {label} tokens | {x['chunks']} | {g['p50_ms']} | {g['p99_ms']} | {g['MBps_at_p50']} | "
            f"{p['p50_ms']} | {p['p99_ms']} | {p['MBps_at_p50']} | {x['grpc_over_in_process_p50']} |"
        )
    lines += [
        "",
        "The floor: the same loopback transfer with no work at all, measured interleaved with the rows "
        "above (a raw-bytes echo server with the services' server settings: no protobuf, no checksum, "
        "no search). `floor/in-proc` = (in-process + echo of 768 KiB) / in-process, the best ratio any "
        "gRPC reply of 768 KiB could reach on this machine.",
        "",
        "| session | echo 1 B p50 ms | echo 768 KiB unary p50 ms | echo 768 KiB streamed p50 ms | "
        "Search (streamed) p50 ms | Retrieve (unary) p50 ms | gRPC overhead ms | floor/in-proc | gRPC/in-proc |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, x in r["retrieval"].items():
        lines.append(
            f"| {label} | {x['echo_unary_1B']['p50_ms']} | {x['echo_unary_768KiB']['p50_ms']} | "
            f"{x['echo_stream_768KiB']['p50_ms']} | {x['grpc_streamed']['p50_ms']} | {x['grpc']['p50_ms']} | "
            f"{x['grpc_overhead_p50_ms']} | {x['floor_over_in_process_p50']} | {x['grpc_over_in_process_p50']} |"
        )
    big = r["retrieval"][list(r["retrieval"])[-1]]
    floor, over = big["echo_unary_768KiB"]["p50_ms"], big["grpc_overhead_p50_ms"]
    lines += [
        "",
        f"At {list(r['retrieval'])[-1]} tokens gRPC adds {over} ms to the in-process call; {floor} ms of "
        f"that is the bare loopback transfer of 768 KiB (the echo), and {big['echo_unary_1B']['p50_ms']} ms of "
        "the echo is the fixed cost of any Python gRPC call on this machine (1-byte echo). The rest, "
        f"{round(over - floor, 3)} ms, is the service's own work per call: decoding the query, building the "
        "reply in place (one 768 KiB copy into the message), protobuf serialisation and parsing (one copy "
        "each), the CRC-32 on both sides (ISA-L: ~0.01 ms each) and the handler's thread hand-off. "
        "The 1.3x target is below the floor here: even a reply that cost nothing to produce would be "
        f"{big['floor_over_in_process_p50']}x the in-process call.",
    ]
    lines += [
        "",
        "| append (1 chunk per call) | writers | chunks/s | MB/s | ms per append |",
        "|---|---|---|---|---|",
    ]
    for name, a in r["append"].items():
        lines.append(
            f"| {name} | {a['writers']} | {a['chunks_per_s']} | {a['MBps']} | {a['ms_per_append']} |"
        )
    rec = r["recovery"]
    lines += [
        "",
        f"Recovery (process start to SERVING, {rec['log_bytes'] / 1e6:.0f} MB of log incl. the 1M-token "
        f"session): log replay {rec['log_replay_s']} s, from snapshot {rec['snapshot_s']} s.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
