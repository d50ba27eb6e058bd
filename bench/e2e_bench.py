"""End-to-end benchmark of the serving path (real weights, CPU): gateway vs in-process decoder core,
and the OpenAI-compatible HTTP API vs gRPC at the gateway.

    python bench/e2e_bench.py [--context 4096] [--score 512] [--reps 2] [--out bench/results]
    python bench/e2e_bench.py --http-only [--context 1024 --score 256 --gen 8 --reps 5]

Measures, in one run and on the same loaded model:
- scoring throughput through gateway -> decoder -> ret-mem vs the in-process Reader over an
  in-process SessionMemory (same tokens, same memory contents), with and without retrieval prefetch,
  and against the same gateway call reading no memory (sliding window);
- generate tokens/s and time to first token with and without memory;
- per-chunk retrieval overhead as a share of the chunk's compute (waited, and total before overlap);
- the HTTP API against gRPC on the same session of the same gateway: scoring (/v1/completions with
  max_tokens=0 + echo vs Score) and time to the first token (streamed /v1/completions vs Generate),
  interleaved, median of --reps (target: HTTP / gRPC <= 1.1).
Writes bench/results/e2e.json and e2e.md, and e2e_http.json and e2e_http.md (--http-only: only those).
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from memlong.chunkloop import Reader  # noqa: E402
from memlong.client import Client  # noqa: E402
from memlong.data import book_text  # noqa: E402
from memlong.deploy.stack import EmbeddedStack  # noqa: E402
from memlong.eval.common import Stack, machine_info, markdown_table, write_json  # noqa: E402
from memlong.model import MemLongConfig  # noqa: E402


class HttpCaller:
    """A lean client of the HTTP API (one kept-alive connection, stdlib only), so that what is timed is
    the server's path and not a client library's parsing."""

    def __init__(self, url: str, key: str) -> None:
        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=3600)
        self.headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    def post(self, path: str, body: dict) -> http.client.HTTPResponse:
        try:
            self.conn.request("POST", path, json.dumps(body), self.headers)
            r = self.conn.getresponse()
        except (ConnectionError, http.client.HTTPException):  # the server closed an idle connection
            self.conn.close()
            self.conn.request("POST", path, json.dumps(body), self.headers)
            r = self.conn.getresponse()
        if r.status != 200:
            raise RuntimeError(f"{path}: {r.status} {r.read()[:300]!r}")
        return r

    def score(self, body: dict) -> dict:
        return json.loads(self.post("/v1/completions", body).read())

    def first_token_s(self, body: dict) -> float:
        """Seconds to the first event carrying text; the rest of the stream is read to its end."""
        t0, first = time.perf_counter(), None
        r = self.post("/v1/completions", {**body, "stream": True})
        while line := r.readline():
            if first is None and line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["text"]:
                first = time.perf_counter() - t0
        return first if first is not None else float("nan")


def http_vs_grpc(stack, client, model_id: str, sid: str, passage: str, prompt: str, args) -> dict:
    """Scoring and time to first token, gRPC vs HTTP at the same gateway, same session, interleaved."""
    caller = HttpCaller(stack.http.url(), stack.api_key)
    score_body = {"model": model_id, "prompt": passage, "max_tokens": 0, "echo": True, "session_id": sid}
    gen_body = {
        "model": model_id,
        "prompt": prompt,
        "max_tokens": args.gen,
        "temperature": 0,
        "session_id": sid,
    }
    # A few words, memory off: almost no model time, so the difference is the HTTP hop's own cost.
    short = " ".join(passage.split()[:6])
    short_body = {"model": model_id, "prompt": short, "max_tokens": 0, "echo": True, "session_id": sid}
    short_body["memory"] = "off"
    times: dict[str, list[float]] = {
        f"{what}_{path}": [] for what in ("score", "short", "ttft") for path in ("grpc", "http")
    }
    ppl = {}
    for _ in range(args.reps):
        t0 = time.perf_counter()
        client.score(sid, short, memory="off")
        times["short_grpc"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        caller.score(short_body)
        times["short_http"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ppl["grpc"] = client.score(sid, passage).perplexity
        times["score_grpc"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ppl["http"] = caller.score(score_body)["memlong"]["perplexity"]
        times["score_http"].append(time.perf_counter() - t0)
        a = client.ask(sid, prompt, max_new_tokens=args.gen, temperature=0.0)
        times["ttft_grpc"].append(a.ttft_s)
        times["ttft_http"].append(caller.first_token_s(gen_body))
    rows = []
    names = {
        "score": "score (whole call)",
        "short": "score, 6 words, memory off",
        "ttft": "time to first token",
    }
    for what, name in names.items():
        g, h = (statistics.median(times[f"{what}_{p}"]) for p in ("grpc", "http"))
        rows.append(
            {
                "measure": name,
                "grpc_s": g,
                "http_s": h,
                "ratio": h / g,
                "http_minus_grpc_ms": (h - g) * 1e3,
                "grpc_min_s": min(times[f"{what}_grpc"]),
                "http_min_s": min(times[f"{what}_http"]),
            }
        )
    return {"rows": rows, "times": times, "perplexity": ppl}


def write_http(out: Path, result: dict, meta: dict) -> str:
    write_json(out / "e2e_http.json", {**meta, **result})
    md = "\n".join(
        [
            f"# HTTP API vs gRPC at the gateway ({meta['machine']['cpu']}, {meta['machine']['torch_threads']} threads)\n",
            f"Model {meta['settings']['model']}; memory {meta['context_tokens']} tokens; {meta['score_tokens']} tokens "
            f"scored; {meta['settings']['gen']} generated; median of {meta['settings']['reps']} interleaved runs "
            "(shared machine). Same session, same gateway: HTTP = the OpenAI-compatible API "
            "(/v1/completions; scoring with max_tokens=0 + echo, first token from the stream), gRPC = "
            "memlong.Client (Score; Generate).\n",
            markdown_table(
                result["rows"],
                ["measure", "grpc_s", "http_s", "ratio", "http_minus_grpc_ms", "grpc_min_s", "http_min_s"],
            ),
            "\nratio: HTTP / gRPC (target <= 1.1). Perplexity: gRPC "
            f"{result['perplexity']['grpc']:.4f}, HTTP {result['perplexity']['http']:.4f}.\n",
        ]
    )
    (out / "e2e_http.md").write_text(md)
    return md


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=4096, help="tokens ingested into memory first")
    ap.add_argument("--score", type=int, default=512, help="tokens scored per measurement")
    ap.add_argument("--gen", type=int, default=32, help="tokens generated")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--http-only", action="store_true", help="only HTTP vs gRPC at the gateway (e2e_http.*)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from memlong.memory import set_faiss_threads

    set_faiss_threads(1)  # as ret-mem does, in every thread (prefetch too): OpenMP spinning slows the rest

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
    meta = {
        "settings": {**vars(args), "out": str(args.out), "memlong": cfg.__dict__, "model": s.source},
        "machine": machine_info(),
        "context_tokens": len(ctx_tokens),
        "score_tokens": len(passage_tokens),
    }
    if args.http_only:
        with tempfile.TemporaryDirectory() as tmp:
            stack = EmbeddedStack.start(Path(tmp), cfg, components=(s.model, tok, s.retriever), http_port=0)
            try:
                client = Client(stack.gateway_address, stack.api_key, timeout_s=3600)
                sid = client.create_session("bench").session_id
                client.append(sid, context_text)
                model_id = stack.http.config.model_id
                warm = argparse.Namespace(**{**vars(args), "reps": 1})  # first calls pay one-off costs
                http_vs_grpc(stack, client, model_id, sid, passage, passage[-400:], warm)
                result = http_vs_grpc(stack, client, model_id, sid, passage, passage[-400:], args)
            finally:
                stack.stop()
        args.out.mkdir(parents=True, exist_ok=True)
        print(write_http(args.out, result, meta))
        return 0

    # -- in-process core: Reader + SessionMemory -----------------------------------------------------
    memory = s.fresh_memory()
    t0 = time.perf_counter()
    first = Reader(s.model, s.retriever, tok, memory)
    first.ingest(ctx_tokens)
    first.flush(keep_window=True)  # as the decoder ends an append: the next read continues one pass
    inproc_ingest_s = time.perf_counter() - t0
    inproc = []

    # -- the same through the gateway ----------------------------------------------------------------
    rows, record = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        stack = EmbeddedStack.start(Path(tmp), cfg, components=(s.model, tok, s.retriever), http_port=0)
        try:
            client = Client(stack.gateway_address, stack.api_key, timeout_s=3600)
            sid = client.create_session("bench").session_id
            t0 = time.perf_counter()
            client.append(sid, context_text)
            gw_ingest_s = time.perf_counter() - t0
            engine = stack.decoder.engine
            served: dict[str, list] = {"prefetch": [], "no_prefetch": [], "sliding": []}
            for _ in range(args.reps):  # interleaved, so load from other processes hits every path alike
                r = first.fork(memory)  # what the decoder's Score does: continue from a copy of the window
                t0 = time.perf_counter()
                logp = r.score(passage_tokens)
                inproc.append((time.perf_counter() - t0, r.stats))
                for mode in ("prefetch", "no_prefetch"):
                    engine.set_prefetch(mode == "prefetch")
                    t0 = time.perf_counter()
                    rep = client.score(sid, passage)
                    served[mode].append((time.perf_counter() - t0, rep))
                engine.set_prefetch(True)
                t0 = time.perf_counter()  # the same call reading no memory: the local window and sinks only
                rep = client.score(sid, passage, memory="off")
                served["sliding"].append((time.perf_counter() - t0, rep))
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
            model_id = stack.http.config.model_id
            http_result = http_vs_grpc(stack, client, model_id, sid, passage, passage[-400:], args)
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
    t_sliding = min(x for x, _ in served["sliding"])
    for mode, runs in served.items():
        t = min(x for x, _ in runs)
        m = runs[0][1].memory
        rows.append(
            {
                "path": "gateway, memory off (sliding window)"
                if mode == "sliding"
                else f"gateway ({mode.replace('_', ' ')})",
                "score_s": t,
                "tokens_per_s": n / t,
                "ratio": t / t_in,
                "throughput_vs_sliding": t_sliding / t,
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
        "perplexity": {
            "in_process": inproc_ppl,
            "gateway": served["prefetch"][0][1].perplexity,
            "gateway_sliding": served["sliding"][0][1].perplexity,
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "e2e.json", record)
    md = [
        f"# End-to-end serving benchmark ({machine_info()['cpu']}, {machine_info()['torch_threads']} threads)\n",
        f"Load average at the start {meta['machine']['loadavg']}, at the end {machine_info()['loadavg']} "
        "(a shared 2-core machine: timings move with it; perplexities do not).\n",
        f"Model {s.source}; {cfg.describe()}. Context "
        f"{len(ctx_tokens)} tokens in memory; {n} tokens scored; best of {args.reps} interleaved runs (shared machine).\n",
        markdown_table(
            rows,
            [
                "path",
                "score_s",
                "tokens_per_s",
                "ratio",
                "throughput_vs_sliding",
                "retrieval_wait_share",
                "retrieval_total_share",
            ],
        ),
        "\nratio: gateway time / in-process time (target <= 1.15). throughput_vs_sliding: the same call's "
        "throughput against the gateway reading no memory (target >= 0.8 with per-layer memory). "
        "retrieval_*_share: retrieval time the model waited for (or spent in total, before overlap) / model "
        f"compute. Perplexity of the scored tokens: in-process {inproc_ppl:.4f}, gateway "
        f"{record['perplexity']['gateway']:.4f}, gateway without memory {record['perplexity']['gateway_sliding']:.4f}.\n",
        markdown_table(
            [{"memory": k, **v} for k, v in gen.items()],
            ["memory", "ttft_s", "tokens_per_s", "tokens", "retrievals", "memory_used"],
        ),
        f"\nIngest of {len(ctx_tokens)} tokens: in-process {inproc_ingest_s:.1f} s, gateway {gw_ingest_s:.1f} s.\n",
    ]
    (args.out / "e2e.md").write_text("\n".join(md))
    print("\n".join(md))
    print(write_http(args.out, http_result, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
