"""Which layers' attention keys find the passkey's chunk (issue 15): the rank of the needle's chunk
among every stored chunk, per layer, when chunks are represented by their mean keys and the query by the
mean attention query of the question (retrieval by keys), beside the text retriever's rank.

One reading per trial with per-layer memory and retrieval by keys over *all* layers (so one pass gives
every layer's vectors); each layer's score is its slice of the stored vectors and of the query. Layer
sets are scored as the sum of their slices (what `key_layers=(a, b, ...)` computes).

    .venv/bin/python bench/keys_study.py --length 8192 --trials 8 --threads 1 --dump /tmp/kdump
Writes bench/results/keys_study/{keys_study.json,keys_study.md}. With --dump, each trial's per-token keys
and question queries are saved, and

    .venv/bin/python bench/keys_study.py --analyze /tmp/kdump
ranks the needle's chunk under query variants from them (which layers; the mean of the last m query
tokens; less a fraction of the chunk's mean query) into query_variants.{json,md}.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np
import torch

from memlong.chunkloop import records_to_kv
from memlong.data import PASSKEY_QUESTION, passkey_needle
from memlong.eval.common import Stack, machine_info, markdown_table, write_json
from memlong.model import MemLongConfig

OUT = Path(__file__).parent / "results" / "keys_study"


class _Tap:
    """A memory that records the query vectors of its searches."""

    def __init__(self, memory) -> None:
        self.memory, self.queries = memory, []

    def append(self, *args) -> int:
        return self.memory.append(*args)

    def search(self, queries, top_k):
        self.queries.append(np.array(queries))
        return self.memory.search(queries, top_k)


def _rank(scores: np.ndarray, target: int) -> int:
    """1-based rank of `target` (ties count against it)."""
    return int((scores >= scores[target]).sum())


def analyze(dump: Path, out: Path = OUT) -> None:
    """Needle-chunk ranks under query variants, from the per-token keys and queries of --dump."""
    layer_sets = {
        "12": (12,),
        "13": (13,),
        "12,13": (12, 13),
        "11-13": (11, 12, 13),
        "10-16": tuple(range(10, 17)),
    }
    ranks: dict[tuple[str, int, float], list[int]] = {}
    files = sorted(dump.glob("trial*.npz"))
    for f in files:
        z = np.load(f)
        keys = torch.from_numpy(z["keys"].astype(np.float32))  # (n, L, Hkv, c, D)
        n, n_layers, hkv, c, d = keys.shape
        queries = torch.from_numpy(z["queries"].astype(np.float32)).view(
            -1, n_layers, hkv, d
        )  # (c, L, Hkv, D)
        valid = torch.arange(c)[None] < torch.from_numpy(z["lengths"])[:, None]
        valid[0, :4] = False  # the stream's sinks, as the reader leaves them out
        mean_k = (keys * valid[:, None, None, :, None]).sum(3) / valid.sum(1)[:, None, None, None]
        target = int(z["target"])
        for name, layers in layer_sets.items():
            for m in (1, 4, 16, 0):
                for center in (0.0, 0.5, 1.0):
                    recent = queries[-m:] if m else queries
                    q = recent.mean(0) - center * queries.mean(0)  # (L, Hkv, D)
                    scores = torch.einsum("nlhd,lhd->n", mean_k[:, list(layers)], q[list(layers)])
                    ranks.setdefault((name, m, center), []).append(_rank(scores.numpy(), target))
    table = []
    for (name, m, center), r in sorted(ranks.items(), key=lambda kv: (np.mean(kv[1]), kv[0][0])):
        row = _summary(f"layers {name}, last {m or 'all'} query tokens, less {center} x mean", np.array(r))
        table.append({**row, "ranks": " ".join(map(str, r))})
    cols = ["reading", "top1", "top8", "median_rank", "mean_rank", "ranks"]
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "query_variants.json", {"trials": len(files), "dump": str(dump), "rows": table})
    (out / "query_variants.md").write_text(
        f"Needle-chunk rank under query variants, from the {len(files)} trials of keys_study.md "
        "(chunks: mean pre-RoPE keys per KV head, the sinks left out; query: mean of the last m rotated "
        "query tokens, less a fraction of the mean over the chunk before the boundary).\n\n"
        + markdown_table(table, cols)
    )
    print(markdown_table(table[:15], cols))


def pooling(dump: Path, out: Path = OUT, layers: tuple[int, ...] = (12, 13), center: float = 0.5) -> None:
    """Needle-chunk rank when a chunk is represented by more than its mean key, from a --dump: the
    query is the served one (the question's last token at `layers`, less `center` x its chunk's mean);
    a chunk scores by its mean key (served), by its best token (max-sim: what several vectors per
    chunk in the index would give, with every token kept), by the mean of its best m tokens, or by its
    best of r representative tokens picked without the query (largest distance from the chunk's mean)."""
    ranks: dict[str, list[int]] = {}
    files = sorted(dump.glob("trial*.npz"))
    for f in files:
        z = np.load(f)
        keys = torch.from_numpy(z["keys"][:, list(layers)].astype(np.float32))  # (n, l, Hkv, c, D)
        n, nl, hkv, c, d = keys.shape
        q_all = torch.from_numpy(z["queries"].astype(np.float32)).view(c, -1, hkv, d)[:, list(layers)]
        q = q_all[-1] - center * q_all.mean(0)  # (l, Hkv, D)
        valid = torch.arange(c)[None] < torch.from_numpy(z["lengths"])[:, None]  # (n, c)
        valid[0, :4] = False  # the stream's sinks
        per_tok = torch.einsum("nlhcd,lhd->nc", keys, q)  # (n, c): the summed logit per token
        masked = per_tok.masked_fill(~valid, -torch.inf)
        target = int(z["target"])
        mean_k = (keys * valid[:, None, None, :, None]).sum(3) / valid.sum(1)[:, None, None, None]
        variants = {
            "mean key (served)": torch.einsum("nlhd,lhd->n", mean_k, q),
            "best token (max-sim)": masked.max(1).values,
        }
        for m in (4, 16):
            variants[f"mean of best {m} tokens"] = masked.topk(m, 1).values.mean(1)
        spread = ((keys - mean_k[:, :, :, None]) ** 2).sum((1, 2, 4)).masked_fill(~valid, -1)  # (n, c)
        for r in (2, 4, 8, 16):
            reps = spread.topk(r, 1).indices  # (n, r): the chunk's most distinctive tokens
            variants[f"best of {r} representative tokens"] = masked.gather(1, reps).max(1).values
        for name, scores in variants.items():
            ranks.setdefault(name, []).append(_rank(scores.numpy(), target))
    table = [
        {**_summary(name, np.array(r)), "ranks": " ".join(map(str, r))}
        for name, r in sorted(ranks.items(), key=lambda kv: np.mean(kv[1]))
    ]
    cols = ["reading", "top1", "top8", "median_rank", "mean_rank", "ranks"]
    out.mkdir(parents=True, exist_ok=True)
    stem = f"pooling_{dump.name}"
    write_json(out / f"{stem}.json", {"trials": len(files), "dump": str(dump), "rows": table})
    (out / f"{stem}.md").write_text(
        f"Needle-chunk rank by how a chunk is represented, from the {len(files)} trials dumped in "
        f"{dump} (keys at layers {list(layers)}; query: the question's last token, less {center} x "
        "the mean query of its chunk).\n\n" + markdown_table(table, cols)
    )
    print(markdown_table(table, cols))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--book", default="kjv")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dump", default="", help="save each trial's per-token keys and question queries here")
    ap.add_argument("--analyze", default="", help="rank query variants from a --dump directory, then exit")
    ap.add_argument("--out", default=str(OUT), help="folder the tables are written to")
    ap.add_argument(
        "--pooling", default="", help="rank chunk representations from a --dump directory, then exit"
    )
    args = ap.parse_args()
    out = Path(args.out)
    if args.analyze:
        analyze(Path(args.analyze), out)
        return
    if args.pooling:
        pooling(Path(args.pooling), out)
        return
    torch.set_num_threads(args.threads)

    n_layers = 30
    cfg = MemLongConfig(retrieval="keys", key_layers=tuple(range(n_layers)))
    stack = Stack.load(cfg)
    c, w = cfg.chunk, cfg.local_window
    hkv, d = stack.model.n_kv_heads, stack.model.head_dim
    book = stack.encode_book(args.book)
    question = stack.encode(PASSKEY_QUESTION)
    rng = random.Random(f"keys:{args.seed}:{args.length}")
    offset = rng.randrange(0, len(book) - args.length)
    hay = book[offset : offset + args.length]
    rows, per_layer = [], np.zeros((args.trials, n_layers), dtype=np.int64)
    per_layer_cos = np.zeros_like(per_layer)
    text_ranks = []
    t0 = time.time()
    if args.dump:
        Path(args.dump).mkdir(parents=True, exist_ok=True)
    for trial in range(args.trials):
        key, text = passkey_needle(rng)
        needle = stack.encode(text)
        n_hay = args.length - len(needle) - len(question)
        depth = rng.randrange(0, (n_hay - w - c) // c + 1) * c
        seq = hay[:depth] + needle + hay[depth:n_hay] + question
        memory = _Tap(stack.fresh_memory())
        reader = stack.reader(with_memory=False)
        reader.memory = memory
        split = (len(seq) - len(question) - w) // c * c
        reader.ingest(seq[:split])
        memory.queries.clear()
        reader.read_prompt(seq[split:])
        query = memory.queries[0][0].reshape(n_layers, hkv * d)  # the question's query (seeded first)
        state = memory.memory.export_state()
        emb = state["embeddings"].reshape(-1, n_layers, hkv * d)
        target = int(np.flatnonzero(state["ids"] == depth // c)[0])
        scores = np.einsum("nld,ld->ln", emb.astype(np.float64), query.astype(np.float64))
        per_layer[trial] = [_rank(scores[layer], target) for layer in range(n_layers)]
        unit = emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
        cosines = np.einsum("nld,ld->ln", unit.astype(np.float64), query.astype(np.float64))
        per_layer_cos[trial] = [_rank(cosines[layer], target) for layer in range(n_layers)]
        if args.dump:
            kv = records_to_kv(state["records"], stack.model.kv_record_shape, cfg.kv_dtype)
            np.savez(
                Path(args.dump) / f"trial{trial}.npz",
                keys=kv[:, :, 0].to(torch.float16).numpy(),  # (n, L, Hkv, c, D) pre-RoPE
                lengths=state["lengths"],
                ids=state["ids"],
                queries=reader._key_history.to(torch.float16).numpy(),  # (c, L*Hkv*D) question tokens
                target=target,
            )
        texts = [stack.tokenizer.decode(seq[i * c : (i + 1) * c]) for i in range(len(state["ids"]))]
        emb_text = stack.retriever.embed(texts)
        q_text = stack.retriever.embed([stack.tokenizer.decode(seq[-c:])])[0]
        text_ranks.append(_rank(emb_text @ q_text, target))
        for name, layers in _SETS.items():
            total = scores[list(layers)].sum(0)
            rows.append({"trial": trial, "set": name, "rank": _rank(total, target)})
            rows.append(
                {"trial": trial, "set": name + " cos", "rank": _rank(cosines[list(layers)].sum(0), target)}
            )
        print(
            f"trial {trial}: depth {depth}, chunks {len(state['ids'])}, text rank {text_ranks[-1]}, "
            f"best layers {np.argsort(per_layer[trial])[:5].tolist()}",
            flush=True,
        )
    n_chunks = len(state["ids"])
    table = []
    for layer in range(n_layers):
        r = per_layer[:, layer]
        table.append(_summary(f"layer {layer}", r))
        table.append(_summary(f"layer {layer} cos", per_layer_cos[:, layer]))
    for name in [n + suffix for n in _SETS for suffix in ("", " cos")]:
        r = np.array([row["rank"] for row in rows if row["set"] == name])
        table.append(_summary(f"layers {name}", r))
    table.append(_summary("text (MiniLM)", np.array(text_ranks)))
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "length": args.length,
        "trials": args.trials,
        "book": args.book,
        "chunks_stored": n_chunks,
        "settings": cfg.describe(),
        "machine": machine_info(),
        "seconds": round(time.time() - t0, 1),
    }
    write_json(out / "keys_study.json", {"meta": meta, "rows": table})
    cols = ["reading", "top1", "top8", "median_rank", "mean_rank"]
    (out / "keys_study.md").write_text(
        f"Needle-chunk rank among {n_chunks} stored chunks, {args.trials} passkey trials at "
        f"{args.length} tokens ({args.book}); {cfg.describe()}.\n\n" + markdown_table(table, cols)
    )
    print(markdown_table(table, cols))


_SETS = {
    "0-29": tuple(range(30)),
    "0-9": tuple(range(10)),
    "10-19": tuple(range(10, 20)),
    "20-29": tuple(range(20, 30)),
    "2,6,10,14": (2, 6, 10, 14),
}


def _summary(name: str, ranks: np.ndarray) -> dict:
    return {
        "reading": name,
        "top1": f"{int((ranks <= 1).sum())}/{len(ranks)}",
        "top8": f"{int((ranks <= 8).sum())}/{len(ranks)}",
        "median_rank": float(np.median(ranks)),
        "mean_rank": round(float(ranks.mean()), 1),
    }


if __name__ == "__main__":
    main()
