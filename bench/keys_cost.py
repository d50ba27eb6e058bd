"""What one chunk boundary's retrieval vectors cost, by source (issue 15): the query vector and the
stored chunk's vector, in milliseconds and bytes, on the packaged model.

- text: decode the 128-token chunk, re-tokenise and embed it with MiniLM (once per boundary: the chunk
  stored later reuses the query's embedding), 384 float32.
- keys: average the previous chunk's recorded attention queries and the stored chunk's keys at the key
  layers (192 float32 per key layer), plus what recording the queries adds to reading the chunk.

    .venv/bin/python bench/keys_cost.py --threads 1 --repeats 20
Writes bench/results/keys_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from memlong.eval.common import Stack, machine_info, markdown_table, write_json
from memlong.model import MemLongConfig, _group_queries

OUT = Path(__file__).parent / "results"


def _ms(fn, repeats: int) -> float:
    """Median wall time of fn() in ms (one warm-up call first)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--key-layers", default="12")
    ap.add_argument("--book", default="kjv")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    key_layers = tuple(int(x) for x in args.key_layers.split(","))
    cfg = MemLongConfig(retrieval="keys", key_layers=key_layers)
    stack = Stack.load(cfg)
    model, c = stack.model, cfg.chunk
    tokens = stack.encode_book(args.book)[10_000 : 10_000 + c]

    def text_vector() -> None:
        stack.retriever.embed([stack.tokenizer.decode(tokens[:c])])

    # The previous chunk's recorded queries and the chunk's keys, as the reader holds them.
    out = model.forward_block(torch.tensor([tokens[:c]]), model.new_stream())
    rows = out.queries[0]  # (c, key_dim)
    k = out.mem_k  # (1, L, Hkv, c, D): one chunk
    lengths = torch.tensor([c])

    def key_vectors() -> None:
        rows.mean(0, keepdim=True).numpy()
        model.chunk_keys(k, lengths).numpy()

    # Recording the queries while a chunk is read: per key layer, the query heads of each KV group
    # averaged (what the attention kernel adds), then the rows joined (what forward_block adds).
    n_heads = model.hf.config.num_attention_heads
    query = torch.randn(1, n_heads, c, model.head_dim)

    def record() -> None:
        parts = [_group_queries(query, model.n_kv_heads) for _ in key_layers]
        torch.cat([p.permute(0, 2, 1, 3).flatten(2) for p in parts], -1)

    with torch.no_grad():
        text_ms = _ms(text_vector, args.repeats)
        keys_ms = _ms(key_vectors, args.repeats)
        record_ms = _ms(record, args.repeats)
    key_dim = model.key_dim
    rows_out = [
        {
            "source": "text (MiniLM)",
            "vectors_ms_per_boundary": round(text_ms, 3),
            "extra_read_ms_per_chunk": 0.0,
            "total_ms": round(text_ms, 3),
            "vector_bytes": stack.retriever.dim * 4,
        },
        {
            "source": f"keys (layers {list(key_layers)})",
            "vectors_ms_per_boundary": round(keys_ms, 3),
            "extra_read_ms_per_chunk": round(record_ms, 3),
            "total_ms": round(keys_ms + record_ms, 3),
            "vector_bytes": key_dim * 4,
        },
    ]
    ratio = rows_out[0]["total_ms"] / max(rows_out[1]["total_ms"], 1e-9)
    meta = {
        "chunk": c,
        "threads": args.threads,
        "repeats": args.repeats,
        "text_over_keys": round(ratio, 1),
        "machine": machine_info(),
    }
    write_json(OUT / "keys_cost.json", {"meta": meta, "rows": rows_out})
    cols = ["source", "vectors_ms_per_boundary", "extra_read_ms_per_chunk", "total_ms", "vector_bytes"]
    note = (
        f"Retrieval-vector cost per chunk boundary ({c}-token chunks, {args.threads} thread(s), median of "
        f"{args.repeats}); `extra_read_ms_per_chunk`: what recording the attention queries adds to reading "
        f"a chunk. Text costs {ratio:.0f}x keys.\n\n"
    )
    (OUT / "keys_cost.md").write_text(note + markdown_table(rows_out, cols))
    print(note + markdown_table(rows_out, cols))


if __name__ == "__main__":
    main()
