"""How per-layer memory is read at answer time (issue 10, item 3): the passkey trials of `memlong eval
passkey`, each ingested once with the served settings, then answered under several readings of the
question (the prompt's query span, how many chunks its retrieval reads), each from its own copy of the
trial.

Per trial and reading: the greedy answer, whether the needle's chunk was retrieved for the question and at
which rank, and the key's log-probability given the prompt (its first digit and all of it, teacher
forced), which says how close a wrong answer came. `sliding` answers from the same local state with no
memory. Only the answer-time reading changes: what was stored, and how, is the same for every reading.

    .venv/bin/python bench/passkey_read_study.py --lengths 16384 --trials 10 --threads 1

Writes bench/results/passkey_read_study.{json,md} (rows of earlier runs at other lengths are kept).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from passkey_study import study_setup

from memlong.chunkloop import SamplingParams
from memlong.data import PASSKEY_QUESTION
from memlong.eval.common import Stack, machine_info, markdown_table, write_json
from memlong.eval.passkey import PasskeySettings, _copy_memory, _is_correct, _Recording, passkey_layout

OUT = Path(__file__).parent / "results"
# name -> settings while reading the last window and the question (ingest used the defaults)
READINGS: dict[str, dict] = {
    "served": {},
    "q32": {"prompt_query_tokens": 32},
    "p2": {"prompt_top_k": 2},
    "q32 p4": {"prompt_query_tokens": 32, "prompt_top_k": 4},
    "q32 p2": {"prompt_query_tokens": 32, "prompt_top_k": 2},
    "q32 p1": {"prompt_query_tokens": 32, "prompt_top_k": 1},
}


def _answer(stack: Stack, trial, tail: list[int], key: str, digits: int, needle: int) -> dict:
    memory = None if trial.memory is None else _Recording(_copy_memory(trial.memory.memory))
    reader = trial.fork(memory, writable=True)
    reader.read_prompt(tail)
    retrieved = list(memory.last) if memory is not None else []
    scorer = reader.fork(reader.memory)  # its own chunks stay with it
    key_ids = stack.encode(" " + key)
    logp = scorer.score(key_ids)
    answer = stack.tokenizer.decode(list(reader.generate([], SamplingParams(max_new_tokens=digits + 3))))
    return {
        "answer": answer,
        "correct": _is_correct(answer, key),
        "needle_rank": retrieved.index(needle) + 1 if needle in retrieved else None,
        "key_logp": float(logp.sum()),
        "first_digit_logp": float(logp[1] if stack.tokenizer.decode(key_ids[:1]).strip() == "" else logp[0]),
    }


def study(stack: Stack, settings: PasskeySettings, length: int) -> list[dict]:
    cfg = stack.model.config
    c, w = cfg.chunk, cfg.local_window
    book = stack.encode_book(settings.book)
    question = stack.encode(PASSKEY_QUESTION)
    hay, n_hay, needles, depths = passkey_layout(stack, book, settings, length)
    base = stack.reader(with_memory=True)
    done = 0
    trials: list[dict] = []
    for i, ((key, text), depth) in enumerate(zip(needles, depths, strict=True)):
        t0 = time.perf_counter()
        seq = stack.encode(text) + hay[depth:n_hay] + question
        base.ingest(hay[done:depth])
        done = depth
        trial = base.fork(_Recording(_copy_memory(base.memory)), writable=True)
        split = (len(seq) - len(question) - w) // c * c  # as run_passkey
        trial.ingest(seq[:split])
        tail = seq[split:]
        row = {"depth": depth, "key": key, "readings": {}}
        for name, overrides in READINGS.items():
            with stack.model.configured(**overrides):
                row["readings"][name] = _answer(stack, trial, tail, key, settings.digits, depth // c)
        no_memory = trial.fork(None)
        row["readings"]["sliding"] = _answer(stack, no_memory, tail, key, settings.digits, depth // c)
        trials.append(row)
        print(
            f"{length} trial {i}: depth {depth} key {key} "
            + "; ".join(
                f"{n}: {r['answer']!r} rank {r['needle_rank']} lp {r['key_logp']:.1f}"
                for n, r in row["readings"].items()
            )
            + f" ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    return trials


def summarise(length: int, trials: list[dict]) -> list[dict]:
    rows = []
    for name in trials[0]["readings"]:
        rs = [t["readings"][name] for t in trials]
        rows.append(
            {
                "context_tokens": length,
                "reading": name,
                "trials": len(rs),
                "correct": sum(r["correct"] for r in rs),
                "needle_retrieved": sum(r["needle_rank"] is not None for r in rs),
                "mean_key_logp": statistics.fmean(r["key_logp"] for r in rs),
                "mean_first_digit_logp": statistics.fmean(r["first_digit_logp"] for r in rs),
            }
        )
    return rows


def main() -> None:
    args, settings, stack = study_setup(__doc__.splitlines()[0], "16384", OUT)
    out = args.out
    path = out / "passkey_read_study.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    same = old.get("settings", {}) == {"book": args.book, "trials": args.trials, "seed": args.seed}
    by_length = {int(k): v for k, v in old.get("trials", {}).items()} if same else {}
    for length in settings.lengths:
        by_length[length] = study(stack, settings, length)
        rows = [r for n in sorted(by_length) for r in summarise(n, by_length[n])]
        cfg = stack.model.config
        write_json(
            path,
            {
                "settings": {"book": args.book, "trials": args.trials, "seed": args.seed},
                "served": {
                    k: getattr(cfg, k)
                    for k in ("layout", "chunk", "top_k", "local_window", "sink_tokens", "mem_position")
                },
                "machine": machine_info(),
                "rows": rows,
                "trials": {str(n): t for n, t in sorted(by_length.items())},
            },
        )
        cols = [
            "context_tokens",
            "reading",
            "trials",
            "correct",
            "needle_retrieved",
            "mean_key_logp",
            "mean_first_digit_logp",
        ]
        head = (
            "Passkey answered under several readings of the question, each trial ingested once with the "
            f"served settings ({cfg.layout}, chunk {cfg.chunk}, top-{cfg.top_k}, window {cfg.local_window}, "
            f"{cfg.sink_tokens} sinks, memory keys at '{cfg.mem_position}'); book {args.book}, seed "
            f"{args.seed}, the trials of `memlong eval passkey`. `q32`: the question's retrieval queries with "
            "the prompt's last 32 tokens (`prompt_query_tokens`); `pN`: it reads its best N chunks "
            "(`prompt_top_k`; the window before the question reads top-8 as served). `needle_retrieved`: the "
            "needle's chunk among the question's chunks; log-probs of the key given the prompt (teacher "
            "forced). `python bench/passkey_read_study.py`\n\n"
        )
        (out / "passkey_read_study.md").write_text(head + markdown_table(rows, cols))


if __name__ == "__main__":
    main()
