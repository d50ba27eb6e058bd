"""How much retrieval time prefetch hides on the serving path (real weights, per-layer records, CPU).

    python bench/prefetch_bench.py [--context 2048] [--score 1024] [--reps 2] [--threads 1]

One embedded stack (gateway -> decoder -> ret-mem on loopback; the decoder reaches ret-mem by its
automatic same-host transport). The context is appended twice, to two sessions, with prefetch on and
off (per-layer ingest reads every chunk with retrieval); then the same passage is scored on the first
session with prefetch on and off, interleaved, `--reps` times. Each Score reply's memory report gives
the retrieval time the model waited for (`retrieval_wait_s`), the time retrieval ran in the background
while the model computed (`retrieval_hidden_s`) and how many boundaries were served by a search started
a chunk ahead (`prefetched_retrievals`). The query of a prefetch is the chunk being computed, i.e. the
text before the boundary it serves (`prev_chunk`, causal).

Writes bench/results/prefetch.json and prefetch.md (machine and settings recorded).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from memlong.client import Client  # noqa: E402
from memlong.data import book_text  # noqa: E402
from memlong.deploy.stack import EmbeddedStack  # noqa: E402
from memlong.eval.common import Stack, machine_info, markdown_table, write_json  # noqa: E402
from memlong.model import MemLongConfig  # noqa: E402

MODES = ("prefetch", "no_prefetch")


def _row(mode: str, seconds: float, n_tokens: int, m) -> dict:
    total = m.retrieval_total_s
    return {
        "mode": mode,
        "seconds": seconds,
        "tokens_per_s": n_tokens / seconds,
        "retrievals": m.retrievals,
        "prefetched": m.prefetched_retrievals,
        "retrieval_total_s": total,
        "retrieval_wait_s": m.retrieval_wait_s,
        "retrieval_hidden_s": m.retrieval_hidden_s,
        "hidden_share": m.retrieval_hidden_s / total if total else 0.0,
        "compute_s": m.compute_s,
        "mib_per_retrieval": m.bytes_retrieved / max(m.retrievals, 1) / 2**20,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=2048, help="tokens appended to each session first")
    ap.add_argument("--score", type=int, default=1024, help="tokens scored per call")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = MemLongConfig()
    s = Stack.load(cfg)
    tok = s.tokenizer
    book = book_text("kjv")
    ids = tok.encode(book[: (args.context + args.score) * 6], add_special_tokens=False)
    context = tok.decode(ids[: args.context])
    passage = tok.decode(ids[args.context : args.context + args.score])
    n_score = len(tok.encode(passage, add_special_tokens=False))

    ingest, scores = {}, {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        stack = EmbeddedStack.start(Path(tmp), cfg, components=(s.model, tok, s.retriever))
        try:
            engine = stack.decoder.engine
            client = Client(stack.gateway_address, stack.api_key, timeout_s=3600)
            sessions = {}
            for mode in MODES:
                engine.set_prefetch(mode == "prefetch")
                sid = client.create_session(f"bench-{mode}").session_id
                t0 = time.perf_counter()
                client.append(sid, context)
                ingest[mode] = time.perf_counter() - t0
                sessions[mode] = sid
            sid = sessions["prefetch"]
            for _ in range(args.reps):  # interleaved: load from other processes hits both alike
                for mode in MODES:
                    engine.set_prefetch(mode == "prefetch")
                    t0 = time.perf_counter()
                    reply = client.score(sid, passage)
                    scores[mode].append((time.perf_counter() - t0, reply))
            engine.set_prefetch(True)
        finally:
            stack.stop()

    rows = []
    for mode, runs in scores.items():
        rows += [_row(mode, t, n_score, r.memory) for t, r in runs]
    ppl = {mode: [r.perplexity for _, r in runs] for mode, runs in scores.items()}
    summary = {
        mode: {
            "median_seconds": statistics.median(r["seconds"] for r in rows if r["mode"] == mode),
            "median_hidden_share": statistics.median(r["hidden_share"] for r in rows if r["mode"] == mode),
        }
        for mode in MODES
    }
    record = {
        "settings": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "memlong": cfg.__dict__,
            "model": s.source,
            "query": cfg.query,
            "decoder": {"prefetch_workers": engine.max_inflight},
        },
        "machine": machine_info(),
        "context_tokens": args.context,
        "score_tokens": n_score,
        "ingest_s": ingest,
        "score": rows,
        "summary": summary,
        "perplexity": ppl,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "prefetch.json", record)
    m = machine_info()
    md = [
        f"# Retrieval prefetch on the serving path ({m['cpu']}, {m['cores']} cores, "
        f"{m['torch_threads']} torch threads, {m['date']})\n",
        f"Model {s.source}; {cfg.describe()}. {args.context} tokens appended per session, then "
        f"{n_score} tokens scored per call, prefetch on/off interleaved {args.reps}x (shared, busy "
        "machine: compare rows of one run). Reported by each Score reply's memory report.\n",
        markdown_table(
            rows,
            [
                "mode",
                "seconds",
                "tokens_per_s",
                "retrievals",
                "prefetched",
                "retrieval_total_s",
                "retrieval_wait_s",
                "retrieval_hidden_s",
                "hidden_share",
                "mib_per_retrieval",
            ],
        ),
        "\nhidden_share = retrieval_hidden_s / retrieval_total_s: the part of retrieval (query embedding, "
        "ret-mem search and K/V transfer, merge of the call's own chunks, decode of the K/V for the model) "
        "the model did not wait for. The first boundary of a call has nothing computed before it to hide "
        "behind (prefetched = retrievals - 1).\n",
        f"Append of {args.context} tokens (per-layer ingest retrieves at every chunk once memory holds one; "
        "here only after the first window, so few boundaries): "
        + ", ".join(f"{k} {v:.1f} s" for k, v in ingest.items())
        + ".\n",
        "Perplexity (must not depend on prefetch): "
        + ", ".join(f"{k} {', '.join(f'{p:.4f}' for p in v)}" for k, v in ppl.items())
        + ".\n",
    ]
    (args.out / "prefetch.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
