"""How the question reaches the text retriever at long lengths (issue 10, item 3): the rank of the passkey
needle's chunk among every stored chunk under query variants, without running the language model.

For each trial of `memlong eval passkey` (same seed and layout: `memlong.eval.passkey.passkey_layout`),
the memory holds the chunks that evaluation stores (hay[:depth], then the trial's own text up to its last
local window), each embedded by the retriever from its text, and the query is embedded from:
- prompt128: the prompt's last chunk (its last 128 tokens: the haystack's tail and the question), what
  the decoder retrieves with for a prompt today;
- prompt64, prompt32: the prompt's last 64 or 32 tokens;
- question: the question alone;
- prompt128+question: both rows in one search, each chunk scored by its better row.
Top-8 is what the evaluation retrieves. Writes bench/results/passkey_query_study.{json,md}.

    .venv/bin/python bench/passkey_query_study.py --lengths 16384,32768,65536,131072 --trials 10 --threads 1
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from passkey_study import study_setup

from memlong.data import PASSKEY_QUESTION
from memlong.eval.common import Stack, machine_info, markdown_table, write_json
from memlong.eval.passkey import PasskeySettings, passkey_layout

OUT = Path(__file__).parent / "results"
TOP_K = 8


def _chunks(tokens: list[int], c: int) -> list[list[int]]:
    return [tokens[i : i + c] for i in range(0, len(tokens) - len(tokens) % c, c)]


def study(stack: Stack, settings: PasskeySettings, length: int) -> dict:
    cfg = stack.model.config
    c, w = cfg.chunk, cfg.local_window
    tok = stack.tokenizer
    book = stack.encode_book(settings.book)
    question = stack.encode(PASSKEY_QUESTION)
    hay, n_hay, needles, depths = passkey_layout(stack, book, settings, length)

    @torch.no_grad()
    def embed(token_lists: list[list[int]]) -> np.ndarray:
        texts = [tok.decode(t) for t in token_lists]
        parts = [stack.retriever.embed(texts[i : i + 64]) for i in range(0, len(texts), 64)]
        return (
            np.concatenate(parts).astype(np.float32)
            if parts
            else np.zeros((0, stack.retriever.dim), np.float32)
        )

    before = embed(_chunks(hay[: depths[-1]], c))  # the chunks of hay[:depth] for every trial
    ranks: dict[str, list[int]] = {}
    n_chunks = []
    for (_, text), depth in zip(needles, depths, strict=True):
        seq = stack.encode(text) + hay[depth:n_hay] + question
        split = (len(seq) - len(question) - w) // c * c  # as run_passkey: the tail reads the prompt
        stored = np.concatenate([before[: depth // c], embed(_chunks(seq[:split], c))])  # (n, dim)
        needle = depth // c
        prompt = seq[split:]
        rows = {
            "prompt128": prompt[-c:],
            "prompt64": prompt[-64:],
            "prompt32": prompt[-32:],
            "question": question,
        }
        q = dict(zip(rows, embed(list(rows.values())), strict=True))  # name -> (dim,)
        scores = {name: stored @ v for name, v in q.items()}  # name -> (n,)
        scores["prompt128+question"] = np.maximum(scores["prompt128"], scores["question"])
        for name, s in scores.items():
            ranks.setdefault(name, []).append(int((s > s[needle]).sum()) + 1)
        n_chunks.append(len(stored))
    return {
        "length": length,
        "trials": len(depths),
        "stored_chunks_mean": float(np.mean(n_chunks)),
        "ranks": ranks,
    }


def main() -> None:
    args, settings, stack = study_setup(__doc__.split("\n\n")[0], "16384,32768,65536,131072", OUT)
    t0 = time.perf_counter()
    results = []
    for length in settings.lengths:
        results.append(study(stack, settings, length))
        print(f"{length}: {time.perf_counter() - t0:.0f} s", flush=True)
    rows = [
        {
            "context_tokens": r["length"],
            "stored_chunks": round(r["stored_chunks_mean"]),
            "query": name,
            "needle_top1": f"{sum(x == 1 for x in ranks)}/{r['trials']}",
            f"needle_top{TOP_K}": f"{sum(x <= TOP_K for x in ranks)}/{r['trials']}",
            "median_rank": float(np.median(ranks)),
            "ranks": " ".join(map(str, ranks)),
        }
        for r in results
        for name, ranks in r["ranks"].items()
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    command = (
        f"python bench/passkey_query_study.py --book {args.book} --lengths {args.lengths} "
        f"--trials {args.trials} --seed {args.seed} --threads {args.threads}"
    )
    write_json(
        args.out / "passkey_query_study.json",
        {
            "machine": machine_info(),
            "settings": vars(args) | {"out": str(args.out)},
            "command": command,
            "results": results,
        },
    )
    head = (
        f"Rank of the passkey needle's chunk among the stored chunks ({args.book}, seed {args.seed}, the "
        f"trials of `memlong eval passkey`), by the text retriever's score, for each query; top-{TOP_K} is "
        f"what the evaluation retrieves. Chunk {stack.model.config.chunk}, local window "
        f"{stack.model.config.local_window}; no language model runs.\n\nCommand: `{command}`\n\n"
    )
    (args.out / "passkey_query_study.md").write_text(head + markdown_table(rows, list(rows[0])) + "\n")
    print(head + markdown_table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
