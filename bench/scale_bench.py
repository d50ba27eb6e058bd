"""Scale benchmark: what a ret-mem shard holds, retrieval p99 as shards are added, Ray's overhead.

    python bench/scale_bench.py [--seconds 5] [--out bench/results] [--no-ray]

1. Capacity (one shard process): sessions of SmolLM2 memory-layer K/V ((2, 3, 128, 64) bf16 = 96 KiB
   per 128-token chunk, 384-d embeddings) appended until `--capacity-chunks`; resident memory and
   disk per stored token, and what that means for a pod of the k8s manifests' 16 GiB limit.
2. Retrieval vs shards: 1, 2, 4 shard processes, each on its own network namespace (separate
   processes when namespaces are not available), 32 sessions spread by the ring; `--threads`
   clients issue the decoder's per-chunk call (1 query row, top-8) on random sessions for
   `--seconds`; p50/p99 and calls/s.
3. Ray Serve vs the embedded default (tiny decoder model, so the model's time does not hide the
   serving path): start-up time, end-to-end Score p50/p99 through the gateway, direct retrieval
   p50/p99 against the shard, and the resident memory of Ray's own processes.

Writes scale.json and scale.md. Every figure is from this machine (see `machine` in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from runinfo import machine, write_results  # noqa: E402  (bench/ is on sys.path)

from memlong.rpc.channel import close_channels  # noqa: E402
from memlong.services.retmem.client import RetMemClient  # noqa: E402
from memlong.services.retmem.store import SessionSpec  # noqa: E402
from tests.deploy.hosts import ShardCluster, netns_available  # noqa: E402
from tests.services.retmem.servers import wait_serving  # noqa: E402

SPEC = SessionSpec(
    dim=384, kv_shape=(2, 3, 128, 64), kv_dtype="bfloat16", memory_size=1024
)  # 128k tokens: no eviction here
TOP_K = 8
BATCH = 16
POD_MEMORY_LIMIT = 16 << 30  # k8s/base/retmem.yaml
GiB = 1 << 30


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def shard_pid(host) -> int:
    """The Python process serving a shard (under `ip netns exec`, the exec'd process keeps the pid)."""
    return host.proc.pid


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def fill(client: RetMemClient, sid: str, chunks: int, rng: np.random.Generator) -> None:
    client.create_session(sid, SPEC)
    for lo in range(0, chunks, BATCH):
        n = min(BATCH, chunks - lo)
        ids = np.arange(lo, lo + n, dtype=np.int64)
        emb = rng.standard_normal((n, SPEC.dim)).astype(np.float32)
        rec = rng.integers(0, 256, (n, SPEC.record_bytes), dtype=np.uint8)
        client.append(sid, ids, emb, rec, np.full(n, SPEC.chunk_tokens, np.int32))


def percentiles(lat: list[float]) -> dict[str, float]:
    a = np.asarray(lat) * 1e3
    return {"n": len(a), "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99))}


# ----------------------------------------------------------------------------------- 1. capacity


def capacity(root: Path, sessions: int, chunks_per_session: int) -> dict:
    cluster = ShardCluster(root / "capacity", 1)
    try:
        cluster.start()
        host = cluster.hosts[0]
        wait_serving(host.address)
        client = RetMemClient(cluster.shards, timeout_s=60)
        rng = np.random.default_rng(1)
        rss0 = rss_bytes(shard_pid(host))
        t0 = time.perf_counter()
        for i in range(sessions):
            fill(client, f"cap-{i}", chunks_per_session, rng)
        seconds = time.perf_counter() - t0
        rss1 = rss_bytes(shard_pid(host))
        tokens = sessions * chunks_per_session * SPEC.chunk_tokens
        payload = sessions * chunks_per_session * (SPEC.record_bytes + 4 * SPEC.dim + 4)
        per_token = (rss1 - rss0) / tokens
        disk = disk_bytes(host.data_dir)
        return {
            "sessions": sessions,
            "chunks": sessions * chunks_per_session,
            "tokens": tokens,
            "append_tokens_per_s": tokens / seconds,
            "rss_before_bytes": rss0,
            "rss_after_bytes": rss1,
            "resident_bytes_per_token": per_token,
            "payload_bytes_per_token": payload / tokens,
            "disk_bytes_per_token": disk / tokens,
            "tokens_per_16GiB_pod": int((POD_MEMORY_LIMIT - rss0) / per_token),
            "sessions_of_32k_tokens_per_16GiB_pod": int((POD_MEMORY_LIMIT - rss0) / per_token / 32768),
        }
    finally:
        close_channels(list(cluster.shards.values()))
        cluster.destroy()


# -------------------------------------------------------------------------- 2. retrieval vs shards


def load(client: RetMemClient, sessions: list[str], seconds: float, threads: int) -> dict:
    rng = np.random.default_rng(2)
    queries = rng.standard_normal((64, 1, SPEC.dim)).astype(np.float32)
    lat: list[list[float]] = [[] for _ in range(threads)]
    errors = [0] * threads
    stop = threading.Event()

    def run(t: int) -> None:
        r = np.random.default_rng(100 + t)
        while not stop.is_set():
            sid = sessions[int(r.integers(len(sessions)))]
            q = queries[int(r.integers(len(queries)))]
            t0 = time.perf_counter()
            try:
                client.search(sid, q, TOP_K)
            except Exception:  # noqa: BLE001 - counted, reported
                errors[t] += 1
                continue
            lat[t].append(time.perf_counter() - t0)

    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    stop.wait(seconds)
    stop.set()
    for w in workers:
        w.join()
    flat = [x for xs in lat for x in xs]
    return {**percentiles(flat), "calls_per_s": len(flat) / seconds, "errors": sum(errors)}


def retrieval_vs_shards(
    root: Path, counts: list[int], sessions: int, chunks: int, seconds: float, threads: int
) -> list[dict]:
    out = []
    for n in counts:
        cluster = ShardCluster(root / f"shards{n}", n)
        try:
            cluster.start()
            for h in cluster.hosts:
                wait_serving(h.address)
            client = RetMemClient(cluster.shards, timeout_s=60)
            rng = np.random.default_rng(3)
            names = [f"s{n}-{i}" for i in range(sessions)]
            for sid in names:
                fill(client, sid, chunks, rng)
            placed = {h.name: 0 for h in cluster.hosts}
            for sid in names:
                placed[client.ring.owner(sid)] += 1
            load(client, names, 1.0, threads)  # warm-up: channels, page cache
            result = load(client, names, seconds, threads)
            out.append({"shards": n, "sessions_per_shard": placed, "netns": cluster.use_netns, **result})
        finally:
            close_channels(list(cluster.shards.values()))
            cluster.destroy()
    return out


# ------------------------------------------------------------------------------- 3. Ray vs embedded


def descendants_rss(root_pid: int) -> int:
    parents: dict[int, int] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                parents[int(p.name)] = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = set(), {root_pid}
    while frontier:
        found |= frontier
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier and pid not in found}
    total = 0
    for pid in found - {root_pid}:
        try:
            total += rss_bytes(pid)
        except OSError:
            continue
    return total


def serving_path(client, shard_client: RetMemClient, session_text: str, calls: int) -> dict:
    session = client.create_session("bench")
    client.append(session.session_id, session_text)
    client.score(session.session_id, "alpha beta gamma delta")  # warm-up
    lat = []
    for _ in range(calls):
        t0 = time.perf_counter()
        client.score(session.session_id, "alpha beta gamma delta")
        lat.append(time.perf_counter() - t0)
    info = client.get_session(session.session_id)
    spec = shard_client.spec(session.session_id)
    q = np.random.default_rng(4).standard_normal((1, spec.dim)).astype(np.float32)
    rl = []
    for _ in range(calls * 5):
        t0 = time.perf_counter()
        shard_client.search(session.session_id, q, 2)
        rl.append(time.perf_counter() - t0)
    return {"chunks": info.chunks, "score": percentiles(lat), "retrieval": percentiles(rl)}


def ray_vs_embedded(root: Path, calls: int) -> dict:
    from memlong.client import Client
    from memlong.deploy.stack import EmbeddedStack
    from tests.deploy.ray_components import tiny
    from tests.deploy.test_ray import free_base_port

    text = " ".join(["alpha beta gamma delta epsilon"] * 6)  # ~47 chunks: under the tiny memory_size 64
    out: dict = {}

    t0 = time.perf_counter()
    stack = EmbeddedStack.start(root / "embedded", components=tiny())
    started = time.perf_counter() - t0
    try:
        client = Client(stack.gateway_address, stack.api_key, timeout_s=60)
        shard = RetMemClient({"shard0": stack.retmem.address()})
        out["embedded"] = {"startup_s": started, **serving_path(client, shard, text, calls)}
    finally:
        stack.stop()
        close_channels()

    import ray
    from ray import serve

    from memlong.deploy.ray_app.app import deploy
    from memlong.deploy.ray_app.config import RayAppConfig

    base = free_base_port(3)
    config = RayAppConfig(
        data_dir=root / "ray",
        gateway_port=base,
        decoder_port=base + 1,
        retmem_port=base + 2,
        shards=1,
        api_keys=(("bench-key", "bench"),),
        components="tests.deploy.ray_components:tiny",
    )
    t0 = time.perf_counter()
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}},
    )
    ray_started = time.perf_counter() - t0
    try:
        deploy(config)
        started = time.perf_counter() - t0
        client = Client(config.gateway_address, "bench-key", timeout_s=60)
        shard = RetMemClient(config.ring)
        result = serving_path(client, shard, text, calls)
        out["ray"] = {
            "startup_s": started,
            "ray_init_s": ray_started,
            "ray_processes_rss_bytes": descendants_rss(os.getpid()),
            **result,
        }
    finally:
        serve.shutdown()
        ray.shutdown()
        close_channels()
    e, r = out["embedded"], out["ray"]
    out["overhead"] = {
        "score_p50_ms": r["score"]["p50_ms"] - e["score"]["p50_ms"],
        "score_p99_ms": r["score"]["p99_ms"] - e["score"]["p99_ms"],
        "retrieval_p50_ms": r["retrieval"]["p50_ms"] - e["retrieval"]["p50_ms"],
        "startup_s": r["startup_s"] - e["startup_s"],
    }
    return out


# ----------------------------------------------------------------------------------------- report


def markdown(result: dict) -> str:
    m, c = result["machine"], result["capacity"]
    lines = [
        "# Scale benchmark",
        "",
        f"{m['cpu']}, {m['cores']} cores (shared), Python {m['python']}; shards on network namespaces: "
        f"{m['netns']}. Chunk = 128 tokens of SmolLM2 memory-layer K/V (96 KiB bf16) + 384-d embedding.",
        "Command: `python bench/scale_bench.py` (figures below from the run recorded in scale.json).",
        "",
        "## What one shard holds",
        "",
        "| sessions | tokens | resident B/token | payload B/token | disk B/token | append tokens/s |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {c['sessions']} | {c['tokens']:,} | {c['resident_bytes_per_token']:.0f} | "
        f"{c['payload_bytes_per_token']:.0f} | {c['disk_bytes_per_token']:.0f} | {c['append_tokens_per_s']:,.0f} |",
        "",
        f"A 16 GiB ret-mem pod (k8s/base/retmem.yaml) therefore holds about "
        f"{c['tokens_per_16GiB_pod'] / 1e6:.1f} M tokens, i.e. {c['sessions_of_32k_tokens_per_16GiB_pod']} "
        "sessions of 32k tokens (K/V is held in memory; the log and snapshots are on disk).",
        "",
        "## Retrieval (1 query row, top-8 = 768 KiB of K/V per call) as shards are added",
        "",
        "| shards | sessions per shard | calls | p50 ms | p99 ms | calls/s | errors |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["retrieval_vs_shards"]:
        lines.append(
            f"| {r['shards']} | {', '.join(str(v) for v in r['sessions_per_shard'].values())} | {r['n']} | "
            f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['calls_per_s']:.0f} | {r['errors']} |"
        )
    rows = result["retrieval_vs_shards"]
    gain = rows[-1]["calls_per_s"] / rows[0]["calls_per_s"]
    lines += [
        "",
        f"{result['settings']['threads']} client threads in one process; every shard on the same "
        f"{m['cores']} cores as the clients. From {rows[0]['shards']} to {rows[-1]['shards']} shards, "
        f"calls/s change {gain:.2f}x: on one machine more shard processes only split the sessions and "
        "compete for the same cores with the clients. On separate hosts each shard brings its own cores, "
        "so these figures are a floor for the multi-host speed-up, not an estimate of it.",
    ]
    if "ray_vs_embedded" in result:
        rv = result["ray_vs_embedded"]
        e, r, o = rv["embedded"], rv["ray"], rv["overhead"]
        lines += [
            "",
            "## Ray Serve vs the embedded default (tiny decoder model, 1 shard)",
            "",
            "| | start-up s | Score p50 ms | Score p99 ms | retrieval p50 ms | retrieval p99 ms |",
            "|---|---:|---:|---:|---:|---:|",
            f"| embedded | {e['startup_s']:.1f} | {e['score']['p50_ms']:.2f} | {e['score']['p99_ms']:.2f} | "
            f"{e['retrieval']['p50_ms']:.2f} | {e['retrieval']['p99_ms']:.2f} |",
            f"| Ray Serve | {r['startup_s']:.1f} | {r['score']['p50_ms']:.2f} | {r['score']['p99_ms']:.2f} | "
            f"{r['retrieval']['p50_ms']:.2f} | {r['retrieval']['p99_ms']:.2f} |",
            "",
            f"Overhead of Ray: start-up +{o['startup_s']:.1f} s (of which `ray.init` {r['ray_init_s']:.1f} s), "
            f"Score p50 {o['score_p50_ms']:+.2f} ms, retrieval p50 {o['retrieval_p50_ms']:+.2f} ms, and "
            f"{r['ray_processes_rss_bytes'] / GiB:.2f} GiB resident in Ray's processes (GCS, raylet, Serve "
            "controller, workers hosting the services). Requests do not pass through Ray: each replica "
            "serves its own gRPC port, so the per-call cost is the same code on different processes.",
        ]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=5.0, help="load duration per shard count")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--shards", default="1,2,4")
    p.add_argument("--sessions", type=int, default=32)
    p.add_argument("--chunks", type=int, default=64, help="chunks per session for the retrieval runs")
    p.add_argument("--capacity-sessions", type=int, default=16)
    p.add_argument("--capacity-chunks", type=int, default=128, help="chunks per session for capacity")
    p.add_argument("--calls", type=int, default=40, help="Score calls per deployment (Ray vs embedded)")
    p.add_argument("--no-ray", action="store_true")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result: dict = {
        "machine": machine(netns=netns_available()),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "spec": {"dim": SPEC.dim, "kv_shape": SPEC.kv_shape, "kv_dtype": SPEC.kv_dtype, "top_k": TOP_K},
    }
    with tempfile.TemporaryDirectory(prefix="scale-bench-") as tmp:
        root = Path(tmp)
        result["capacity"] = capacity(root, args.capacity_sessions, args.capacity_chunks)
        print(json.dumps(result["capacity"]), flush=True)
        counts = [int(x) for x in args.shards.split(",")]
        result["retrieval_vs_shards"] = retrieval_vs_shards(
            root, counts, args.sessions, args.chunks, args.seconds, args.threads
        )
        print(json.dumps(result["retrieval_vs_shards"]), flush=True)
        if not args.no_ray:
            result["ray_vs_embedded"] = ray_vs_embedded(root, args.calls)
            print(json.dumps(result["ray_vs_embedded"]), flush=True)
    write_results(args.out, "scale", result, markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
