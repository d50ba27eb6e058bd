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

import fcntl
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from passkey_study import study_setup

from memlong.chunkloop import SamplingParams
from memlong.data import PASSKEY_QUESTION
from memlong.eval.common import Stack, machine_info, markdown_table, write_json
from memlong.eval.passkey import PasskeySettings, _copy_memory, _is_correct, _Recording, passkey_layout

OUT = Path(__file__).parent / "results"
# How a prompt reads, spelt out, so that a reading's name keeps its meaning when a default changes: the
# readings below are changes from this (the defaults before session 12's), "served" is the defaults.
PROMPT_BASE = {"prompt_query_tokens": 0, "prompt_top_k": 0, "prompt_window": False, "prompt_insert": False}
# name -> settings while reading the last window and the question (ingest used the defaults)
READINGS: dict[str, dict] = {
    "served": {},
    "q32": {"prompt_query_tokens": 32},
    "p2": {"prompt_top_k": 2},
    "q32 p4": {"prompt_query_tokens": 32, "prompt_top_k": 4},
    "q32 p2": {"prompt_query_tokens": 32, "prompt_top_k": 2},
    "q32 p1": {"prompt_query_tokens": 32, "prompt_top_k": 1},
    "window": {"prompt_window": True},
    "window q32": {"prompt_window": True, "prompt_query_tokens": 32},
    "q32 pfx": {"prompt_query_tokens": 32, "mem_position": "prefix"},
    "q32 p1 pfx": {"prompt_query_tokens": 32, "prompt_top_k": 1, "mem_position": "prefix"},
    "window q32 p1": {"prompt_window": True, "prompt_query_tokens": 32, "prompt_top_k": 1},
    "window q32 p1 pfx": {
        "prompt_window": True,
        "prompt_query_tokens": 32,
        "prompt_top_k": 1,
        "mem_position": "prefix",
    },
    "window q32 p1 ins": {
        "prompt_window": True,
        "prompt_query_tokens": 32,
        "prompt_top_k": 1,
        "prompt_insert": True,
    },
    "window q32 ins": {"prompt_window": True, "prompt_query_tokens": 32, "prompt_insert": True},
    # the side reader (config.reader): meant for an ingest without memory (--no-ingest-memory), which is
    # what a side reader's own ingest stores
    "side": {"reader": "side"},
    "side q32": {"reader": "side", "prompt_query_tokens": 32},
    "side q32 p1": {"reader": "side", "prompt_query_tokens": 32, "prompt_top_k": 1},
    "window ins": {"prompt_window": True, "prompt_insert": True},
}


def reading(name: str) -> dict:
    """The settings of reading `name`: the served defaults for "served", else PROMPT_BASE changed."""
    return {} if name == "served" else {**PROMPT_BASE, **READINGS[name]}


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


def study(
    stack: Stack,
    settings: PasskeySettings,
    length: int,
    readings: list[str],
    only: range,
    keep: Callable[[dict], None],
    ingest: dict | None = None,
) -> None:
    """Each trial in `only` at `length`, ingested under the settings `ingest` (default: the served ones)
    and answered under `readings`; `keep` gets each trial as it ends."""
    cfg = stack.model.config
    c, w = cfg.chunk, cfg.local_window
    book = stack.encode_book(settings.book)
    question = stack.encode(PASSKEY_QUESTION)
    hay, n_hay, needles, depths = passkey_layout(stack, book, settings, length)
    base = stack.reader(with_memory=True)
    done = 0
    for i, ((key, text), depth) in enumerate(zip(needles, depths, strict=True)):
        if i not in only:
            continue
        t0 = time.perf_counter()
        seq = stack.encode(text) + hay[depth:n_hay] + question
        with stack.model.configured(**(ingest or {})):
            base.ingest(hay[done:depth])
            done = depth
            trial = base.fork(_Recording(_copy_memory(base.memory)), writable=True)
            split = (len(seq) - len(question) - w) // c * c  # as run_passkey
            trial.ingest(seq[:split])
        tail = seq[split:]
        row = {"trial": i, "depth": depth, "key": key, "readings": {}}
        for name in readings:
            with stack.model.configured(**reading(name)):
                row["readings"][name] = _answer(stack, trial, tail, key, settings.digits, depth // c)
        no_memory = trial.fork(None)
        row["readings"]["sliding"] = _answer(stack, no_memory, tail, key, settings.digits, depth // c)
        keep(row)
        print(
            f"{length} trial {i}: depth {depth} key {key} "
            + "; ".join(
                f"{n}: {r['answer']!r} rank {r['needle_rank']} lp {r['key_logp']:.1f}"
                for n, r in row["readings"].items()
            )
            + f" ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )


def summarise(length: int, trials: list[dict]) -> list[dict]:
    rows = []
    names = list(READINGS) + ["sliding"]
    for name in [n for n in names if any(n in t["readings"] for t in trials)]:
        rs = [t["readings"][name] for t in trials if name in t["readings"]]
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


def _add_args(ap) -> None:
    ap.add_argument("--readings", default=",".join(READINGS), help=f"comma-separated, of {list(READINGS)}")
    ap.add_argument("--only", default="", help="trial indices i:j (default: all)")
    ap.add_argument(
        "--no-ingest-memory",
        dest="ingest_memory",
        action="store_false",
        help="ingest without reading memory (config.ingest_memory=False), as the side reader does",
    )


def _merge(old: list[dict], new: list[dict]) -> list[dict]:
    """Trials of one length: a new trial's readings join (or replace) those of the same trial."""
    by_trial = {(t["depth"], t["key"]): t for t in old}
    for t in new:
        kept = by_trial.get((t["depth"], t["key"]), {"readings": {}})
        by_trial[(t["depth"], t["key"])] = {**kept, **t, "readings": {**kept["readings"], **t["readings"]}}
    return sorted(by_trial.values(), key=lambda t: (t["depth"], t["key"]))


def main() -> None:
    args, settings, stack = study_setup(__doc__.splitlines()[0], "16384", OUT, _add_args)
    readings = [r for r in args.readings.split(",") if r]
    if unknown := set(readings) - set(READINGS):
        raise SystemExit(f"unknown readings {sorted(unknown)}; known: {list(READINGS)}")
    lo, _, hi = args.only.partition(":")
    only = range(int(lo or 0), int(hi or args.trials))
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    path = out / "passkey_read_study.json"
    for length in settings.lengths:
        # Several runs (other trials, other readings) may share the file: each trial merges under a lock
        # as it ends, so a run stopped early keeps the trials it finished.
        def keep(row: dict, length: int = length) -> None:
            with open(out / ".passkey_read_study.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                old = json.loads(path.read_text()) if path.is_file() else {}
                same = old.get("settings", {}) == _settings(args)
                by_length = {int(k): v for k, v in old.get("trials", {}).items()} if same else {}
                by_length[length] = _merge(by_length.get(length, []), [row])
                _write(out, args, stack, by_length)

        study(stack, settings, length, readings, only, keep, {"ingest_memory": args.ingest_memory})


def _settings(args) -> dict:
    """What must match for a run's trials to merge with those already in the results."""
    kept = {"book": args.book, "trials": args.trials, "seed": args.seed}
    return kept if args.ingest_memory else {**kept, "ingest_memory": False}


def _write(out: Path, args, stack: Stack, by_length: dict[int, list[dict]]) -> None:
    rows = [r for n in sorted(by_length) for r in summarise(n, by_length[n])]
    cfg = stack.model.config
    write_json(
        out / "passkey_read_study.json",
        {
            "settings": _settings(args),
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
        "served settings"
        + ("" if args.ingest_memory else ", except that the ingest reads no memory (`--no-ingest-memory`)")
        + f" ({cfg.layout}, chunk {cfg.chunk}, top-{cfg.top_k}, window {cfg.local_window}, "
        f"{cfg.sink_tokens} sinks, memory keys at '{cfg.mem_position}'); book {args.book}, seed "
        f"{args.seed}, the trials of `memlong eval passkey`. `q32`: the question's retrieval queries with "
        "the prompt's last 32 tokens (`prompt_query_tokens`); `pN`: it reads its best N chunks "
        "(`prompt_top_k`; the window before the question reads top-8 as served); `window`: the prompt's "
        "chunks in its last window retrieve with the question too (`prompt_window`); `pfx`: the retrieved chunks "
        "read as the text just before the window (`mem_position` 'prefix') while the tail is read; "
        "`side`: the side reader (`reader` 'side': a second pass reads memory, the text's pass does not). "
        "`needle_retrieved`: the "
        "needle's chunk among the question's chunks; log-probs of the key given the prompt (teacher "
        "forced). `python bench/passkey_read_study.py`\n\n"
    )
    (out / "passkey_read_study.md").write_text(head + markdown_table(rows, cols))


if __name__ == "__main__":
    main()
