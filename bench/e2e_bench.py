"""End-to-end benchmark of the serving path (real weights, CPU): gateway vs in-process decoder core.

    python bench/e2e_bench.py [--context 4096] [--score 512] [--reps 2] [--out bench/results]

Measures, in one run and on the same loaded model:
- scoring throughput through gateway -> decoder -> ret-mem vs the in-process Reader over an
  in-process SessionMemory (same tokens, same memory contents), with and without retrieval prefetch;
- generate tokens/s and time to first token with and without memory;
- per-chunk retrieval overhead as a share of the chunk's compute (waited, and total before overlap).
Writes bench/results/e2e.json and e2e.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from memlong.chunkloop import Reader  # noqa: E402
from memlong.client import Client  # noqa: E402
from memlong.data import book_text  # noqa: E402
from memlong.eval.common import Stack, machine_info, markdown_table, write_json  # noqa: E402
from memlong.model import MemLongConfig  # noqa: E402
from services.gateway.embedded import EmbeddedStack  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=4096, help="tokens ingested into memory first")
    ap.add_argument("--score", type=int, default=512, help="tokens scored per measurement")
    ap.add_argument("--gen", type=int, default=32, help="tokens generated")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(1)  # as ret-mem does: FAISS's OpenMP spinning would slow the in-process path

    cfg = MemLongConfig()
    s = Stack.load(cfg)
    tok = s.tokenizer
    book = book_text("kjv")
    ids = tok.encode(book[: args.context * 6], add_special_tokens=False)
    context_text = tok.decode(ids[: args.context])
    passage_ids = tok.encode(
        book[args.context * 6 : args.context * 6 + args.score * 6], add_special_tokens=False
    )
    passage = tok.decode(passage_ids[: args.score])
    ctx_tokens = tok.encode(context_text, add_special_tokens=False)
    passage_tokens = tok.encode(passage, add_special_tokens=False)

    # -- in-process core: Reader + SessionMemory -----------------------------------------------------
    memory = s.fresh_memory()
    t0 = time.perf_counter()
    first = Reader(s.model, s.retriever, tok, memory)
    first.ingest(ctx_tokens)
    first.flush()
    inproc_ingest_s = time.perf_counter() - t0
    inproc = []

    # -- the same through the gateway ----------------------------------------------------------------
    rows, record = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        stack = EmbeddedStack.start(Path(tmp), cfg, components=(s.model, tok, s.retriever))
        try:
            client = Client(stack.gateway_address, stack.api_key, timeout_s=3600)
            sid = client.create_session("bench").session_id
            t0 = time.perf_counter()
            client.append(sid, context_text)
            gw_ingest_s = time.perf_counter() - t0
            engine = stack.decoder.engine
            served: dict[str, list] = {"prefetch": [], "no_prefetch": []}
            pool = engine._prefetch_pool
            for _ in range(args.reps):  # interleaved, so load from other processes hits every path alike
                r = Reader(s.model, s.retriever, tok, memory, next_chunk_id=first.next_chunk_id)
                t0 = time.perf_counter()
                logp = r.score(passage_tokens)
                inproc.append((time.perf_counter() - t0, r.stats))
                for mode in ("prefetch", "no_prefetch"):
                    engine._prefetch_pool = pool if mode == "prefetch" else None
                    t0 = time.perf_counter()
                    rep = client.score(sid, passage)
                    served[mode].append((time.perf_counter() - t0, rep))
            engine._prefetch_pool = pool
            inproc_ppl = float(torch.exp(-torch.nanmean(logp)))
            gen = {}
            for mode in ("required", "off"):
                a = client.ask(sid, passage[-400:], max_new_tokens=args.gen, memory=mode, stop_token_ids=[])
                gen[mode] = {
                    "ttft_s": a.ttft_s,
                    "tokens": len(a.token_ids),
                    "tokens_per_s": (len(a.token_ids) - 1) / max(a.total_s - a.ttft_s, 1e-9),
                    "retrievals": a.memory.retrievals,
                    "memory_used": a.memory.memory_used,
                }
        finally:
            stack.stop()

    n = len(passage_tokens)
    t_in = min(t for t, _ in inproc)  # min: the least disturbed run
    st = inproc[0][1]
    rows.append(
        {
            "path": "in-process Reader",
            "score_s": t_in,
            "tokens_per_s": n / t_in,
            "ratio": 1.0,
            "retrieval_wait_share": st.retrieval_s / max(st.compute_s - st.retrieval_s, 1e-9),
            "retrieval_total_share": st.retrieval_s / max(st.compute_s - st.retrieval_s, 1e-9),
        }
    )
    for mode, runs in served.items():
        t = min(x for x, _ in runs)
        m = runs[0][1].memory
        rows.append(
            {
                "path": f"gateway ({mode.replace('_', ' ')})",
                "score_s": t,
                "tokens_per_s": n / t,
                "ratio": t / t_in,
                "retrieval_wait_share": m.retrieval_wait_s / max(m.compute_s, 1e-9),
                "retrieval_total_share": m.retrieval_total_s / max(m.compute_s, 1e-9),
            }
        )
    record = {
        "settings": {
            **vars(args),
            "out": str(args.out),
            "memlong": cfg.__dict__,
            "model": s.source,
            "query": cfg.query,
        },
        "machine": machine_info(),
        "ingest": {"tokens": len(ctx_tokens), "in_process_s": inproc_ingest_s, "gateway_s": gw_ingest_s},
        "score": rows,
        "generate": gen,
        "retrievals_per_score": st.retrievals,
        "perplexity": {"in_process": inproc_ppl, "gateway": served["prefetch"][0][1].perplexity},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "e2e.json", record)
    md = [
        f"# End-to-end serving benchmark ({machine_info()['cpu']}, {machine_info()['torch_threads']} threads)\n",
        f"Model {s.source}; {cfg.describe()}. Context "
        f"{len(ctx_tokens)} tokens in memory; {n} tokens scored; best of {args.reps} interleaved runs (shared machine).\n",
        markdown_table(
            rows,
            ["path", "score_s", "tokens_per_s", "ratio", "retrieval_wait_share", "retrieval_total_share"],
        ),
        "\nratio: gateway time / in-process time (target <= 1.15). retrieval_*_share: retrieval time "
        "the model waited for (or spent in total, before overlap) / model compute.\n",
        markdown_table(
            [{"memory": k, **v} for k, v in gen.items()],
            ["memory", "ttft_s", "tokens_per_s", "tokens", "retrievals", "memory_used"],
        ),
        f"\nIngest of {len(ctx_tokens)} tokens: in-process {inproc_ingest_s:.1f} s, gateway {gw_ingest_s:.1f} s.\n",
    ]
    (args.out / "e2e.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
