"""ret-mem benchmark: the decoder's per-chunk retrieval by transport, durable appends against the disk's
synced write bandwidth, recovery.

    python bench/retmem_bench.py [--records single,per_layer] [--sizes 32k,256k] [--out bench/results]

Per-chunk retrieval (1 query row, top-8, 384-d embeddings) of SmolLM2-135M K/V records, bf16:
- single-layer: (2, 3, 128, 64) = 96 KiB per chunk, 768 KiB per call;
- per-layer: every layer's own K/V, (30, 2, 3, 128, 64) = 2.81 MiB per chunk, 22.5 MiB per call;
against sessions of 32k / 256k / 1M tokens (250 / 2,000 / 8,000 chunks), K/V on disk (kvfiles), by:
- in_process: `Shard.search` in this process on the same files (the page cache is shared: the server's
  data directory is a hard-linked copy of the in-process shard's, so both read the same pages);
- shm: `RetMemClient` with the same-host transport (calls on loopback gRPC, K/V through /dev/shm);
- grpc: `RetMemClient` with K/V in the messages (loopback TCP);
and the transfer floors of the reply size, measured alongside: a raw-bytes gRPC echo over TCP and over a
Unix domain socket (unary, and streamed one record per message), and a bare Unix socket (no gRPC).
Every path of one size is timed in the same run, interleaved in blocks of 10 calls (shared machine).

Appends: durable (grouped fsync), one chunk per call with 1 and 4 writers and 8 chunks per call with 1
writer, through each transport, against the disk's synced write bandwidth measured in the same run
(sequential writes of one and of eight records, each followed by fdatasync, in the same directory).
Recovery of the largest single-layer session from the log and from a snapshot.

Writes retmem.json and retmem.md (with the machine and its load average). `--paths in_process,grpc`
runs an older tree that has no same-host transport (before/after comparisons).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from runinfo import loadavg, machine, write_results  # noqa: E402  (bench/ is on sys.path)

from memlong.services.retmem.client import RetMemClient  # noqa: E402
from memlong.services.retmem.shard import Shard  # noqa: E402
from memlong.services.retmem.store import SessionSpec  # noqa: E402

KINDS = {"single": (2, 3, 128, 64), "per_layer": (30, 2, 3, 128, 64)}
SIZES = {"32k": 250, "256k": 2000, "1M": 8000}  # tokens -> chunks of 128
TOP_K = 8
DIM = 384
ECHO = "memlong.bench.Echo"
PATHS = ("in_process", "shm", "grpc")


def spec_of(kind: str, memory_size: int) -> SessionSpec:
    return SessionSpec(dim=DIM, kv_shape=KINDS[kind], kv_dtype="bfloat16", memory_size=memory_size)


def client(port: int, shared: bool) -> RetMemClient:
    target = {"shard0": f"127.0.0.1:{port}"}
    try:
        return RetMemClient(target, timeout_s=300, max_message_bytes=64 << 20, shared_memory=shared)
    except TypeError:  # a tree from before the same-host transport
        return RetMemClient(target, timeout_s=300, max_message_bytes=64 << 20)


class Server:
    """`python -m memlong.services.retmem serve` in its own process."""

    def __init__(self, data_dir: Path, fsync: str = "grouped") -> None:
        cmd = [sys.executable, "-m", "memlong.services.retmem", "serve", "--port", "0"]
        cmd += ["--data-dir", str(data_dir), "--fsync", fsync, "--checkpoint-mb", "1000000"]
        cmd += ["--drain-s", "0", "--max-message-mb", "64"]
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


def fill(store, sid: str, spec: SessionSpec, n: int, seed: int) -> float:
    """Append n chunks in batches of ~24 MiB; returns MB/s."""
    store.create_session(sid, spec)
    rng = np.random.default_rng(seed)
    batch = max(1, min(32, (24 << 20) // spec.record_bytes))
    t = time.perf_counter()
    for lo in range(0, n, batch):
        store.append(sid, *make_batch(rng, spec, lo, min(batch, n - lo)))
    return n * spec.record_bytes / 1e6 / (time.perf_counter() - t)


def link_copy(src: Path, dst: Path) -> None:
    """A copy of a shard's directory whose K/V files are hard links (never rewritten: kvfiles.py), so two
    shards read the same pages; everything else is copied."""
    for path in src.rglob("*"):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif path.suffix == ".kv":
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


def summarize(lat_s: list[float], payload: int) -> dict:
    lat_ms = np.array(lat_s) * 1e3
    p50, p99 = float(np.percentile(lat_ms, 50)), float(np.percentile(lat_ms, 99))
    return {
        "p50_ms": round(p50, 3),
        "p99_ms": round(p99, 3),
        "mean_ms": round(float(lat_ms.mean()), 3),
        "GBps_at_p50": round(payload / 1e9 / (p50 / 1e3), 3),
        "iters": len(lat_s),
    }


def interleaved(calls: dict, iters: int, payload: int, block: int = 10, warmup: int = 5) -> dict:
    """Time each call `iters` times, alternating blocks of `block` calls between them, so that load from
    other processes on a shared machine falls on every path alike. Returns {name: summary}."""
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
    return {name: summarize(v, payload) for name, v in lat.items()}


def searcher(search, sid: str, record_bytes: int, seed: int):
    """A per-chunk retrieval call (1 query row, top-8) with a fresh random query each time; the records
    are touched (summed by pages) as a reader would."""
    rng = np.random.default_rng(seed)

    def call() -> None:
        q = rng.standard_normal((1, DIM)).astype(np.float32)
        res = search(sid, q, TOP_K)
        assert res.records.shape == (1, TOP_K, record_bytes)

    return call


# ------------------------------------------------------------------ the floors: raw-bytes transfers


def echo_server(uds_dir: str) -> int:
    """Raw-bytes RPCs with the services' server settings, on TCP and on a Unix socket: Unary replies
    the number of bytes asked for, Stream the same in pieces of the size asked; and a bare Unix socket
    that sends what is asked for. Prints ECHO_PORT=<port>."""
    from concurrent import futures

    import grpc

    from memlong.services.common.server import ServerOptions

    payload = np.random.default_rng(0).integers(0, 256, 64 << 20, np.uint8).tobytes()
    view = memoryview(payload)

    def unary(request, context):
        return payload[: int(request)]

    def stream(request, context):
        total, piece = (int(x) for x in request.split(b","))
        for lo in range(0, total, piece):
            yield payload[lo : min(lo + piece, total)]

    handler = grpc.method_handlers_generic_handler(
        ECHO,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
        },
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=16),
        options=ServerOptions(max_message_bytes=64 << 20).grpc_options(),
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.add_insecure_port(f"unix:{uds_dir}/echo.sock")
    server.start()

    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.bind(f"{uds_dir}/raw.sock")
    raw.listen(4)

    def serve_raw() -> None:
        while True:
            conn, _ = raw.accept()
            with conn:
                while head := conn.recv(8):
                    conn.sendall(view[: int.from_bytes(head, "little")])

    threading.Thread(target=serve_raw, daemon=True).start()
    sys.stdout.write(f"ECHO_PORT={port}\n")
    sys.stdout.flush()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.stop(0)
    return 0


class EchoProcess:
    def __init__(self) -> None:
        from memlong.rpc.channel import ChannelOptions, get_channel

        self.dir = tempfile.mkdtemp(prefix="retmem-echo-")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--echo-server", self.dir],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        port = int(self.proc.stdout.readline().strip().split("=")[1])
        options = ChannelOptions(max_message_bytes=64 << 20, telemetry=False)
        self.stubs = {}
        for name, target in (("tcp", f"127.0.0.1:{port}"), ("uds", f"unix:{self.dir}/echo.sock")):
            channel = get_channel(target, options)
            self.stubs[name] = (
                channel.unary_unary(f"/{ECHO}/Unary"),
                channel.unary_stream(f"/{ECHO}/Stream"),
            )
        self.raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.raw.connect(f"{self.dir}/raw.sock")
        self.buf = bytearray(64 << 20)

    def calls(self, nbytes: int, piece: int) -> dict:
        out = {}
        for name, (unary, stream) in self.stubs.items():
            ask, ask_stream = str(nbytes).encode(), f"{nbytes},{piece}".encode()
            out[f"echo_{name}_unary"] = lambda u=unary, a=ask: u(a, timeout=60, wait_for_ready=True)
            out[f"echo_{name}_stream"] = lambda s=stream, a=ask_stream: [
                *s(a, timeout=60, wait_for_ready=True)
            ]
        view = memoryview(self.buf)

        def raw() -> None:
            self.raw.sendall(nbytes.to_bytes(8, "little"))
            got = 0
            while got < nbytes:
                got += self.raw.recv_into(view[got:nbytes])

        out["uds_raw"] = raw
        return out

    def stop(self) -> None:
        self.raw.close()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


# ------------------------------------------------------------------------------------- retrieval


def retrieval(kind: str, label: str, n: int, work: Path, echo: EchoProcess | None, paths, iters: int) -> dict:
    spec = spec_of(kind, n)
    sid = f"ret-{kind}-{label}"
    root = work / f"{kind}-{label}"
    shard = Shard("shard0", root / "inproc")
    shard.open()
    fill_mbps = fill(shard, sid, spec, n, seed=n)
    shard.checkpoint()
    shard.close()
    link_copy(root / "inproc" / "shard0", root / "server" / "shard0")
    shard = Shard("shard0", root / "inproc")
    shard.open()
    server = Server(root / "server")
    try:
        return _timed(kind, label, n, spec, sid, shard, server, fill_mbps, echo, paths, iters)
    finally:
        server.stop()
        shard.close()
        shutil.rmtree(root, ignore_errors=True)


def _timed(kind, label, n, spec, sid, shard, server, fill_mbps, echo, paths, iters) -> dict:
    server.wait_serving()
    calls = {}
    if "in_process" in paths:
        calls["in_process"] = searcher(shard.search, sid, spec.record_bytes, 1)
    fast = client(server.port, shared=True)
    if "shm" in paths:
        calls["shm"] = searcher(fast.search, sid, spec.record_bytes, 1)
    if "grpc" in paths:
        calls["grpc"] = searcher(client(server.port, shared=False).search, sid, spec.record_bytes, 1)
        unary = client(server.port, shared=False)
        if hasattr(unary, "stream_above") and kind == "per_layer":  # the same, as one Retrieve message
            unary.stream_above = 1 << 62
            calls["grpc_unary"] = searcher(unary.search, sid, spec.record_bytes, 1)
    reply = TOP_K * spec.record_bytes
    if echo is not None:
        calls.update(echo.calls(reply, spec.record_bytes))
    r = interleaved(calls, iters, reply)
    out = {
        "records": kind,
        "record_bytes": spec.record_bytes,
        "reply_bytes": reply,
        "chunks": n,
        "tokens": n * 128,
        "fill_in_process_MBps": round(fill_mbps, 1),
        **r,
    }
    if "shm" in paths:
        out["shm_transport"] = fast.transport(sid)
        out["shm_over_in_process_p50"] = round(r["shm"]["p50_ms"] / r["in_process"]["p50_ms"], 3)
    if "grpc" in paths and "in_process" in paths:
        out["grpc_over_in_process_p50"] = round(r["grpc"]["p50_ms"] / r["in_process"]["p50_ms"], 3)
    return out


# --------------------------------------------------------------------------------------- appends


def disk_sync_bandwidth(directory: Path, piece: int, pieces_per_sync: int, total: int) -> dict:
    """Sequential appends of `piece` bytes with fdatasync after every `pieces_per_sync`, to a new file
    in `directory`: what the disk absorbs with syncs, as appends see it."""
    path = directory / "disk-probe"
    data = np.random.default_rng(1).integers(0, 256, piece, np.uint8).tobytes()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    written, t = 0, time.perf_counter()
    try:
        while written < total:
            for _ in range(pieces_per_sync):
                os.write(fd, data)
                written += piece
            os.fdatasync(fd)
    finally:
        os.close(fd)
        path.unlink()
    dt = time.perf_counter() - t
    return {
        "bytes": written,
        "piece_bytes": piece,
        "pieces_per_sync": pieces_per_sync,
        "MBps": round(written / 1e6 / dt, 1),
    }


def append_throughput(store, spec: SessionSpec, writers: int, per_call: int, chunks: int, tag: str) -> dict:
    """`writers` threads, each appending `chunks` chunks in calls of `per_call`; durable on return."""
    sids = [f"app-{tag}-{w}" for w in range(writers)]
    for s in sids:
        store.create_session(s, spec)
    batches = {s: make_batch(np.random.default_rng(i), spec, 0, chunks) for i, s in enumerate(sids)}

    def run(s: str) -> None:
        ids, emb, kv, lengths = batches[s]
        for i in range(0, chunks, per_call):
            part = slice(i, i + per_call)
            store.append(s, ids[part], emb[part], kv[part], lengths[part])

    t = time.perf_counter()
    threads = [threading.Thread(target=run, args=(s,)) for s in sids]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    dt = time.perf_counter() - t
    n = writers * chunks
    return {
        "writers": writers,
        "chunks_per_call": per_call,
        "chunks": n,
        "chunks_per_s": round(n / dt, 1),
        "MBps": round(n * spec.record_bytes / 1e6 / dt, 1),
        "ms_per_call": round(dt / (chunks / per_call) * 1e3, 3),
    }


def appends(kind: str, work: Path, paths, volume: int) -> dict:
    spec = spec_of(kind, 100_000)
    root = work / f"append-{kind}"
    root.mkdir(parents=True)
    chunks = max(8, min(volume // spec.record_bytes, 300))  # per configuration (single-layer: 300 x 96 KiB)
    volume = chunks * spec.record_bytes
    out: dict = {
        "disk": [
            disk_sync_bandwidth(root, spec.record_bytes, 1, volume),
            disk_sync_bandwidth(root, spec.record_bytes, 8, volume),
        ]
    }
    stores = {}
    if "in_process" in paths:
        shard = Shard("shard0", root / "inproc")
        shard.open()
        stores["in_process"] = shard
    server = Server(root / "server")
    try:
        _append_rows(out, kind, spec, stores, server, paths, chunks, root, volume)
    finally:
        server.stop(signal.SIGKILL)
        if "in_process" in stores:
            stores["in_process"].close()
        shutil.rmtree(root, ignore_errors=True)
    return out


def _append_rows(out, kind, spec, stores, server, paths, chunks, root, volume) -> None:
    server.wait_serving()
    if "shm" in paths:
        stores["shm"] = client(server.port, shared=True)
    if "grpc" in paths:
        stores["grpc"] = client(server.port, shared=False)
    for name, store in stores.items():
        for writers, per_call in ((1, 1), (4, 1), (1, 8)):
            per_writer = max(per_call, chunks // writers) // per_call * per_call
            row = append_throughput(
                store, spec, writers, per_call, per_writer, f"{name}-{writers}-{per_call}"
            )
            out[f"{name}_{writers}w_{per_call}c"] = {"path": name, **row}
            print(kind, name, json.dumps(row), flush=True)
    out["disk"].append(disk_sync_bandwidth(root, spec.record_bytes, 8, volume))  # again, after


def recovery(work: Path, n: int) -> dict:
    """A single-layer session of n chunks: kill -9 then restart (log replay), then a graceful restart
    (from the snapshot taken at stop)."""
    root = work / "recovery"
    server = Server(root)
    server.wait_serving()
    fill(client(server.port, shared=False), "rec", spec_of("single", n), n, seed=7)
    server.stop(signal.SIGKILL)
    wal_bytes = sum(p.stat().st_size for p in root.rglob("*.wal"))
    again = Server(root)
    t_wal = again.wait_serving()
    again.stop(signal.SIGTERM)  # graceful: snapshot at stop
    snap = Server(root)
    t_snap = snap.wait_serving()
    snap.stop(signal.SIGKILL)
    shutil.rmtree(root, ignore_errors=True)
    return {
        "chunks": n,
        "log_replay_s": round(t_wal, 2),
        "snapshot_s": round(t_snap, 2),
        "log_bytes": wal_bytes,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", default="single,per_layer")
    ap.add_argument("--sizes", default="32k,256k")
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--iters", type=int, default=200, help="calls per path, single-layer records")
    ap.add_argument("--iters-per-layer", type=int, default=60, help="calls per path, per-layer records")
    ap.add_argument("--append-mb", type=int, default=300, help="MB appended per append configuration")
    ap.add_argument("--no-recovery", action="store_true")
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--name", default="retmem", help="output file stem")
    ap.add_argument("--echo-server", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.echo_server:
        return echo_server(args.echo_server)
    kinds, sizes, paths = args.records.split(","), args.sizes.split(","), args.paths.split(",")
    from memlong.memory import set_faiss_threads

    set_faiss_threads(1)  # as ret-mem does (RetMemConfig.faiss_threads): OpenMP spinning on
    # a shared 2-core machine made in-process searches slow and bimodal
    work = Path(tempfile.mkdtemp(prefix="retmem-bench-", dir=os.environ.get("RETMEM_BENCH_DIR")))
    result: dict = {
        "machine": machine(),
        "settings": {
            "top_k": TOP_K,
            "dim": DIM,
            "query_rows": 1,
            "kv_shapes": {k: list(KINDS[k]) for k in kinds},
            "sizes": {s: SIZES[s] for s in sizes},
            "paths": paths,
            "iters": {"single": args.iters, "per_layer": args.iters_per_layer},
            "data_dir": str(work),
            "timing": "all paths of one size interleaved in blocks of 10 calls (shared machine)",
            "in_process": "Shard.search on a hard-linked copy of the server's files (same page cache)",
        },
        "retrieval": {},
        "append": {},
    }
    echo = EchoProcess()
    try:
        for kind in kinds:
            for label in sizes:
                iters = args.iters if kind == "single" else args.iters_per_layer
                row = retrieval(kind, label, SIZES[label], work, echo, paths, iters)
                result["retrieval"][f"{kind}/{label}"] = row
                print(kind, label, json.dumps(row), flush=True)
    finally:
        echo.stop()
    for kind in [] if args.no_append else kinds:
        result["append"][kind] = appends(kind, work, paths, args.append_mb * 10**6)
    if not args.no_recovery and "single" in kinds:
        result["recovery"] = recovery(work, SIZES[sizes[-1]])
    result["machine"]["loadavg_at_end"] = loadavg()
    result["settings"]["command"] = "python bench/retmem_bench.py " + " ".join(sys.argv[1:])
    write_results(args.out, args.name, result, markdown(result))
    shutil.rmtree(work, ignore_errors=True)
    print(markdown(result))
    return 0


def _cell(x: dict | None, key: str) -> str:
    return "-" if x is None else str(x[key])


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        "# ret-mem benchmark",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m.get('mem_gib', '?')} GiB RAM, shared with other "
        f"work: load average {m['loadavg_at_start']} at the start, {m.get('loadavg_at_end')} at the end. "
        f"Python {m['python']}. Per-chunk retrieval: 1 query row, top-8, bf16 K/V on disk (what the page "
        "cache holds stays there: 1M per-layer tokens are 22.5 GiB), 384-d embeddings. `in-proc`: Shard.search in the benchmark's process on the same files; "
        "`shm`: RetMemClient to a ret-mem process on loopback, K/V through shared memory; `grpc`: the same "
        "with K/V in the gRPC messages. Every path of one row timed in the same run, interleaved in "
        "blocks of 10 calls; GB/s = reply K/V bytes / p50.",
        "",
        f"Command: `{r['settings'].get('command', 'python bench/retmem_bench.py')}` (writes the .json beside this file).",
        "",
        "| records | session | reply MiB | in-proc p50 / p99 ms | shm p50 / p99 ms | grpc p50 / p99 ms | "
        "in-proc GB/s | shm GB/s | grpc GB/s | shm / in-proc | grpc / in-proc |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, x in r["retrieval"].items():
        kind, label = key.split("/")
        p, s, g = x.get("in_process"), x.get("shm"), x.get("grpc")
        lines.append(
            f"| {kind} | {label} tokens ({x['chunks']} chunks) | {x['reply_bytes'] / 2**20:.2f} | "
            f"{_cell(p, 'p50_ms')} / {_cell(p, 'p99_ms')} | {_cell(s, 'p50_ms')} / {_cell(s, 'p99_ms')} | "
            f"{_cell(g, 'p50_ms')} / {_cell(g, 'p99_ms')} | {_cell(p, 'GBps_at_p50')} | "
            f"{_cell(s, 'GBps_at_p50')} | {_cell(g, 'GBps_at_p50')} | "
            f"{x.get('shm_over_in_process_p50', '-')} | {x.get('grpc_over_in_process_p50', '-')} |"
        )
    lines += [
        "",
        "Transfer floors of the same reply size, timed in the same blocks (raw bytes, no protobuf, no "
        "checksum, no search): gRPC echo over loopback TCP and over a Unix domain socket, unary and "
        "streamed one record per message, and a bare Unix socket read into a reused buffer (p50 ms).",
        "",
        "| records | session | gRPC TCP unary | gRPC TCP streamed | gRPC UDS unary | gRPC UDS streamed | bare UDS | shm (service) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, x in r["retrieval"].items():
        if "echo_tcp_unary" not in x:
            continue
        kind, label = key.split("/")
        lines.append(
            f"| {kind} | {label} | {x['echo_tcp_unary']['p50_ms']} | {x['echo_tcp_stream']['p50_ms']} | "
            f"{x['echo_uds_unary']['p50_ms']} | {x['echo_uds_stream']['p50_ms']} | {x['uds_raw']['p50_ms']} | "
            f"{_cell(x.get('shm'), 'p50_ms')} |"
        )
    big = [(k, x) for k, x in r["retrieval"].items() if k.startswith("per_layer/") and "shm" in x]
    if big and "echo_tcp_unary" in big[-1][1]:
        key, x = big[-1]
        lines += [
            "",
            f"Reading ({key.replace('/', ', ')} tokens): the same-host path answers in {x['shm']['p50_ms']} ms "
            f"against {x['in_process']['p50_ms']} ms in process ({x['shm_over_in_process_p50']}x; target "
            f"<= 1.3x), K/V in the gRPC messages in {x['grpc']['p50_ms']} ms. Why shared memory: moving the "
            f"reply's bytes alone costs {x['uds_raw']['p50_ms']} ms over a bare Unix socket and "
            f"{x['echo_uds_unary']['p50_ms']} ms through gRPC on one ({x['echo_tcp_unary']['p50_ms']} ms on "
            "TCP), on top of reading them; through shared memory the server's read from its files is the "
            "transfer. Over gRPC, replies above 8 MiB are streamed in ~4 MiB pieces and joined on arrival "
            f"(one copy): {x['grpc']['p50_ms']} ms, against "
            f"{x.get('grpc_unary', {}).get('p50_ms', '-')} ms for the same reply as one Retrieve message.",
        ]
    lines += [
        "",
        "Durable appends (grouped fsync; acknowledged = on stable storage), against the disk's synced "
        "write bandwidth measured in the same run and directory (sequential appends of one record, or "
        "of eight, per fdatasync; before and after the appends).",
        "",
    ]
    for kind, a in r["append"].items():
        disk = a["disk"]
        best = max(d["MBps"] for d in disk)
        lines.append(
            f"{kind} ({disk[0]['piece_bytes'] / 2**20:.2f} MiB records): disk "
            + ", ".join(f"{d['MBps']} MB/s ({d['pieces_per_sync']} per sync)" for d in disk)
            + f"; the best, {best} MB/s, is the reference."
        )
        lines += [
            "",
            "| path | writers | chunks per call | chunks/s | MB/s | ms per call | of disk |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, x in a.items():
            if name == "disk":
                continue
            lines.append(
                f"| {x['path']} | {x['writers']} | {x['chunks_per_call']} | {x['chunks_per_s']} | {x['MBps']} | "
                f"{x['ms_per_call']} | {x['MBps'] / best:.0%} |"
            )
        lines.append("")
    lines += [
        "The same benchmark on the tree before the protobuf-free K/V path and the same-host transport "
        "(72ee1bd, in-process and gRPC only): retmem_before.md.",
        "",
    ]
    rec = r.get("recovery")
    if rec:
        lines += [
            f"Recovery of a single-layer session of {rec['chunks']} chunks (process start to SERVING, "
            f"{rec['log_bytes'] / 1e6:.0f} MB of log): log replay {rec['log_replay_s']} s, from snapshot "
            f"{rec['snapshot_s']} s.",
            "",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
