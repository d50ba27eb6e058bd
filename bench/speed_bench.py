"""Decoder speed and memory: ingest and scoring tokens/s, peak RSS, per method and context length.

Each (method, length) runs in its own subprocess so that its peak RSS (ru_maxrss) is its own.

    .venv/bin/python bench/speed_bench.py [--lengths 2k,...,64k] [--threads 2]

Writes bench/results/speed.json, speed.md and speed.png.
- ingest:  the window's prefix (everything before the last local window) into memory, tokens/s (per-layer
           layout: every layer with retrieval; paper layout: layers 0..mem_layer after the first chunk)
- memlong: scoring the last local window + 512 tokens with memory (one retrieval per chunk), tokens/s
- sliding: the same tokens without memory
- full:    one full-attention forward over the whole window (up to --full-max), tokens/s
Memory is the in-process bank; its bytes are reported separately (in production it lives in ret-mem).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from runinfo import loadavg, peak_rss_bytes  # bench/ is on sys.path

OUT = Path(__file__).resolve().parent / "results"
SCORED = 512


def one(method: str, length: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from memlong.eval.common import Stack, full_attention_logprobs
    from memlong.model import MemLongConfig

    stack = Stack.load(MemLongConfig(memory_size=1 << 20))
    tokens = stack.encode_book("kjv")[100_000 : 100_000 + length]
    base_rss = peak_rss_bytes()
    w = stack.model.config.local_window
    row: dict = {"method": method, "context_tokens": length}
    if method == "full":
        t0 = time.perf_counter()
        full_attention_logprobs(stack.model, tokens, SCORED)
        row["score_tok_s"] = length / (time.perf_counter() - t0)
    else:
        prefix, tail = tokens[: length - w - SCORED], tokens[length - w - SCORED :]
        reader = stack.reader(with_memory=method == "memlong")
        t0 = time.perf_counter()
        reader.ingest(prefix)
        row["ingest_tok_s"] = len(prefix) / (time.perf_counter() - t0) if prefix else None
        t0 = time.perf_counter()
        reader.score(tail)
        row["score_tok_s"] = len(tail) / (time.perf_counter() - t0)
        row["retrieval_ms_per_chunk"] = 1e3 * reader.stats.retrieval_s / max(1, reader.stats.retrievals)
        row["memory_bank_mb"] = reader.memory.stats()["bytes"] / 2**20 if reader.memory is not None else 0.0
    row["peak_rss_mb"] = peak_rss_bytes() / 2**20
    row["model_rss_mb"] = base_rss / 2**20
    row["load_1m"] = loadavg()[0]  # other work on the machine while this cell ran
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="2k,4k,8k,16k,32k,64k")
    ap.add_argument("--full-max", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "LENGTH"))
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.threads)))
        return
    from memlong.cli import _ints
    from memlong.eval.common import machine_info, markdown_table, write_json

    rows = []
    for length in _ints(args.lengths):
        for method in ("full", "sliding", "memlong"):
            if method == "full" and length > args.full_max:
                continue
            cmd = [sys.executable, __file__, "--one", method, str(length), "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    meta = {
        "machine": machine_info(),
        "threads": args.threads,
        "scored_tokens": SCORED,
        "load_average": loadavg(),
        "book": "kjv",
        "local_window": 1024,
    }
    write_json(OUT / "speed.json", {"meta": meta, "records": rows})
    cols = [
        "method",
        "context_tokens",
        "ingest_tok_s",
        "score_tok_s",
        "peak_rss_mb",
        "memory_bank_mb",
        "retrieval_ms_per_chunk",
    ]
    (OUT / "speed.md").write_text(
        f"Machine: {meta['machine']['cpu']}, {args.threads} threads, load average at end "
        f"{meta['load_average'][0]:.1f}\n\n" + markdown_table(rows, cols)
    )
    plot(rows)


def plot(rows: list[dict]) -> None:
    from memlong.eval.common import plot_lines

    plot_lines(
        OUT / "speed.png", rows, "context_tokens", "peak_rss_mb", "peak RSS of the decoder process (MiB)"
    )


if __name__ == "__main__":
    main()
