"""ret-mem at per-layer scale: resident memory vs stored K/V, durable append rate, retrieval, recovery.

    python bench/retmem_disk_bench.py [--tokens 32k,128k] [--records per_layer|single] [--iters 60]
        [--label NAME] [--out bench/results]

One shard with a data directory (grouped fsync, one writer), one session of per-layer records
(SmolLM2-135M: 30 layers x (2, 3, 128, 64) bf16 = 2.81 MiB per 128-token chunk) or single-layer
records (`--records single`: (2, 3, 128, 64) = 96 KiB), filled with single-chunk appends. What stays
resident (index, ids, counters, references) grows with the number of chunks, not with their size: a
single-layer session shows the resident memory of a per-layer one with the same number of tokens, at
1/30 of the disk. Each size runs in a fresh child process so that its peak RSS is its own.
Reported per size: stored K/V bytes, RSS after filling and after recovery, peak RSS, append MB/s
against this disk's synced write bandwidth measured in the same run (8 MiB writes + fdatasync),
top-8 retrieval p50/p99 (1 query row, in-process, page cache warm), recovery time. Writes
retmem_disk[_LABEL].json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from retmem_bench import disk_sync_bandwidth  # noqa: E402  (bench/ is on sys.path)
from runinfo import machine, peak_rss_bytes, rss_mib, write_results  # noqa: E402

KINDS = {"per_layer": (30, 2, 3, 128, 64), "single": (2, 3, 128, 64)}  # SmolLM2-135M records
TOP_K = 8
DIM = 384


def child(tokens: int, iters: int, data_dir: Path, extra: dict, kv_shape: tuple[int, ...]) -> dict:
    """One size: fill, search, reopen; returns the figures (runs in its own process)."""
    from memlong.memory import set_faiss_threads
    from memlong.services.retmem.shard import Shard
    from memlong.services.retmem.store import SessionSpec

    set_faiss_threads(1)  # as ret-mem does (RetMemConfig.faiss_threads); OpenMP spins otherwise

    n_chunks = tokens // 128
    spec = SessionSpec(dim=DIM, kv_shape=kv_shape, kv_dtype="bfloat16", memory_size=n_chunks, **extra)
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 256, spec.record_bytes + 4096, dtype=np.uint8)
    emb = rng.standard_normal((n_chunks, DIM)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    out: dict = {"tokens": tokens, "chunks": n_chunks, "record_bytes": spec.record_bytes}
    out["rss_start_mib"] = round(rss_mib(), 1)
    disk = disk_sync_bandwidth(data_dir, 8 << 20, 1, 256 << 20)["MBps"]  # 8 MiB writes, each synced
    shard = Shard("s0", data_dir, fsync="grouped", checkpoint_bytes=1 << 40)
    shard.open()
    shard.create_session("a", spec)
    t0 = time.perf_counter()
    for i in range(n_chunks):
        rec = pool[i % 4096 : i % 4096 + spec.record_bytes].reshape(1, -1)
        shard.append("a", np.array([i], np.int64), emb[i : i + 1], rec, np.array([128], np.int32))
    dt = time.perf_counter() - t0
    stored = n_chunks * spec.record_bytes
    out.update(
        stored_kv_mib=round(stored / 2**20, 1),
        append_MBps=round(stored / 1e6 / dt, 1),
        append_chunks_per_s=round(n_chunks / dt, 1),
        disk_sync_MBps=round(disk, 1),
        rss_after_fill_mib=round(rss_mib(), 1),
    )
    queries = rng.standard_normal((iters + 5, DIM)).astype(np.float32)
    lat = []
    for j in range(iters + 5):
        t = time.perf_counter()
        res = shard.search("a", queries[j : j + 1], TOP_K)
        assert res.records.shape[-1] == spec.record_bytes
        lat.append(time.perf_counter() - t)
    lat_ms = np.array(lat[5:]) * 1e3
    p50 = float(np.percentile(lat_ms, 50))
    reply = TOP_K * spec.record_bytes
    out.update(
        search_p50_ms=round(p50, 2),
        search_p99_ms=round(float(np.percentile(lat_ms, 99)), 2),
        search_MBps_at_p50=round(reply / 1e6 / (p50 / 1e3), 1),
        rss_after_search_mib=round(rss_mib(), 1),
    )
    shard.close()
    del shard, res
    t = time.perf_counter()
    again = Shard("s0", data_dir, fsync="grouped", checkpoint_bytes=1 << 40)
    report = again.open()
    out["recovery_s"] = round(time.perf_counter() - t, 2)
    out["recovery_errors"] = len(report.errors)
    out["rss_after_recovery_mib"] = round(rss_mib(), 1)
    # Recovery from a snapshot: what a restart costs once a checkpoint has run (every
    # --checkpoint-mb of log and K/V, 1 GiB by default, so replay reads at most that much K/V back).
    again.checkpoint()
    again.close()
    del again
    t = time.perf_counter()
    third = Shard("s0", data_dir, fsync="grouped", checkpoint_bytes=1 << 40)
    report = third.open()
    out["recovery_from_snapshot_s"] = round(time.perf_counter() - t, 2)
    out["recovery_errors"] += len(report.errors)
    out["peak_rss_mib"] = round(peak_rss_bytes() / 2**20, 1)
    third.close()
    out["disk_bytes_mib"] = round(
        sum(p.stat().st_size for p in data_dir.rglob("*") if p.is_file()) / 2**20, 1
    )
    return out


def parse_tokens(text: str) -> list[int]:
    mult = {"k": 1024, "M": 1 << 20}
    return [int(t[:-1]) * mult[t[-1]] if t[-1] in mult else int(t) for t in text.split(",")]


def markdown(r: dict) -> str:
    m, s = r["machine"], r["settings"]
    lines = [
        f"# ret-mem {s['records'].replace('_', '-')} records on disk ({r['label']})",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores (shared; load at start {m['loadavg_at_start']}), "
        f"{m['mem_gib']} GiB RAM, Python {m['python']}. One shard, {s['fsync']} fsync, one writer, "
        f"single-chunk appends; records {s['kv_shape']} {s['kv_dtype']}; top-{s['top_k']} retrieval of "
        f"1 query row in-process, page cache warm, {s['iters']} calls. Code: {r['code']}.",
        "",
        f"Command: `{r['command']}`",
        "",
        "| tokens | chunks | stored K/V MiB | RSS after fill MiB | RSS after recovery MiB | peak RSS MiB "
        "| append MB/s | disk synced MB/s | append/disk | search p50 ms | p99 ms | MB/s at p50 | recovery from log s "
        "| recovery from snapshot s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['tokens']} | {row['chunks']} | {row['stored_kv_mib']} | {row['rss_after_fill_mib']} | "
            f"{row['rss_after_recovery_mib']} | {row['peak_rss_mib']} | {row['append_MBps']} | "
            f"{row['disk_sync_MBps']} | {row['append_MBps'] / row['disk_sync_MBps']:.2f} | "
            f"{row['search_p50_ms']} | {row['search_p99_ms']} | {row['search_MBps_at_p50']} | "
            f"{row['recovery_s']} | {row.get('recovery_from_snapshot_s', '')} |"
        )
    lines += [
        "",
        "Recovery from log: the whole session replayed from the write-ahead log (snapshots off), which reads "
        "every stored K/V record back to check its CRC-32, so it grows with the stored bytes; recovery from "
        "snapshot: the same after a checkpoint. A shard checkpoints every `--checkpoint-mb` (1 GiB) of log "
        "and K/V, so a restart replays at most that much.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="32k,128k")
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--records", choices=sorted(KINDS), default="per_layer")
    ap.add_argument("--label", default="")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--spec-json", default="{}", help="extra SessionSpec fields as JSON")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    extra = json.loads(args.spec_json)
    if args.child:
        print(json.dumps(child(args.child, args.iters, args.data_dir, extra, KINDS[args.records])))
        return 0
    rows = []
    for tokens in parse_tokens(args.tokens):
        with tempfile.TemporaryDirectory(prefix="retmem-disk-", dir=os.environ.get("RETMEM_BENCH_DIR")) as d:
            cmd = [sys.executable, __file__, "--child", str(tokens), "--iters", str(args.iters)]
            cmd += ["--data-dir", d, "--spec-json", args.spec_json, "--records", args.records]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    code = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    result = {
        "label": args.label or "current",
        "code": f"HEAD {code.stdout.strip()} + working tree",
        "command": "python bench/retmem_disk_bench.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "settings": {
            "records": args.records,
            "kv_shape": list(KINDS[args.records]),
            "kv_dtype": "bfloat16",
            "spec_extra": extra,
            "top_k": TOP_K,
            "dim": DIM,
            "iters": args.iters,
            "fsync": "grouped",
        },
        "rows": rows,
    }
    stem = "retmem_disk" + (f"_{args.label}" if args.label else "")
    write_results(args.out, stem, result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
