"""Where ret-mem keeps K/V on disk: its append-only K/V files against LMDB, same records, same run.

    PYTHONPATH=/path/with/lmdb python bench/kv_store_choice.py [--records 160] [--reads 40]

Per-layer records of SmolLM2-135M (30 x 2 x 3 x 128 x 64 bf16 = 2.81 MiB). Durable append of one
record at a time (the shard's K/V files: write + fdatasync, as the log's flusher does for one
writer; LMDB: put + commit with sync), and top-8 reads of random records with the page cache warm
(K/V files: pread + CRC-32 check; LMDB: zero-copy get + one copy into the reply buffer, without and
with the same CRC). Writes kv_store_choice.json and .md. LMDB is not a dependency: without it only
the K/V files are measured.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from runinfo import machine, write_results  # noqa: E402  (bench/ is on sys.path)

from memlong.services.common.tensor import checksum  # noqa: E402
from memlong.services.retmem.kvfiles import KVFiles  # noqa: E402

RECORD = 30 * 2 * 3 * 128 * 64 * 2


def ms(xs: list[float]) -> dict:
    a = np.array(xs) * 1e3
    return {"p50_ms": round(float(np.percentile(a, 50)), 2), "p99_ms": round(float(np.percentile(a, 99)), 2)}


def bench_kvfiles(d: Path, recs: np.ndarray, picks: np.ndarray) -> dict:
    kv = KVFiles(d / "kv")
    kv.open()
    refs = []
    t0 = time.perf_counter()
    for r in recs:
        refs.append(kv.write(r[None]))
        kv.sync()
    dt = time.perf_counter() - t0
    refs = np.concatenate(refs)
    lat = []
    for p in picks:
        t = time.perf_counter()
        kv.read(refs[p], RECORD)
        lat.append(time.perf_counter() - t)
    kv.close()
    return {"append_MBps": round(recs.nbytes / 1e6 / dt, 1), "top8_read": ms(lat), "top8_read_no_crc": None}


def bench_lmdb(d: Path, recs: np.ndarray, picks: np.ndarray) -> dict:
    import lmdb

    env = lmdb.open(str(d / "lmdb"), map_size=4 * recs.nbytes, sync=True, metasync=True, readahead=False)
    t0 = time.perf_counter()
    for i, r in enumerate(recs):
        with env.begin(write=True) as txn:
            txn.put(i.to_bytes(8, "big"), memoryview(r))
    dt = time.perf_counter() - t0
    out = {"append_MBps": round(recs.nbytes / 1e6 / dt, 1)}
    for crc in (False, True):
        lat = []
        for p in picks:
            t = time.perf_counter()
            buf = np.empty((len(p), RECORD), np.uint8)
            with env.begin(buffers=True) as txn:
                for j, i in enumerate(p):
                    buf[j] = np.frombuffer(txn.get(int(i).to_bytes(8, "big")), np.uint8)
                    if crc:
                        checksum(buf[j])
            lat.append(time.perf_counter() - t)
        out["top8_read" if crc else "top8_read_no_crc"] = ms(lat)
    out["disk_bytes_mib"] = round(sum(p.stat().st_size for p in (d / "lmdb").iterdir()) / 2**20, 1)
    env.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=160)
    ap.add_argument("--reads", type=int, default=40)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    recs = rng.integers(0, 256, (args.records, RECORD), dtype=np.uint8)
    picks = rng.integers(0, args.records, (args.reads, 8))
    rows = {}
    with tempfile.TemporaryDirectory(prefix="kvchoice-", dir=os.environ.get("RETMEM_BENCH_DIR")) as d:
        rows["kv_files"] = bench_kvfiles(Path(d), recs, picks)
        try:
            rows["lmdb"] = bench_lmdb(Path(d), recs, picks)
        except ImportError:
            rows["lmdb"] = None
    import importlib.util

    lmdb_version = None
    if importlib.util.find_spec("lmdb"):
        import lmdb

        lmdb_version = f"py-lmdb {lmdb.__version__}, LMDB {'.'.join(map(str, lmdb.version()))}"
    result = {
        "command": "python bench/kv_store_choice.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "settings": {
            "record_bytes": RECORD,
            "records": args.records,
            "reads": args.reads,
            "lmdb": lmdb_version,
        },
        "rows": rows,
    }
    lines = [
        "# K/V store: ret-mem's K/V files vs LMDB",
        "",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores (shared), "
        f"Python {result['machine']['python']}; {args.records} records of {RECORD / 2**20:.2f} MiB, "
        f"{args.reads} top-8 reads (page cache warm); {lmdb_version or 'LMDB not installed'}.",
        "",
        f"Command: `{result['command']}`",
        "",
        "| store | durable append MB/s (1 record, synced) | top-8 read p50 ms | p99 ms | p50 without CRC ms |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        if r is None:
            continue
        no_crc = r["top8_read_no_crc"]["p50_ms"] if r["top8_read_no_crc"] else "-"
        lines.append(
            f"| {name} | {r['append_MBps']} | {r['top8_read']['p50_ms']} | {r['top8_read']['p99_ms']} | {no_crc} |"
        )
    write_results(args.out, "kv_store_choice", result, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
