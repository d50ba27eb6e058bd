"""Whether the key's chunk is stored worse because its ingest read memory (issue 10): a short replica of
each passkey trial of `memlong eval passkey`, ingested with and without memory reading in its parts, then
answered with one reading.

The replica reads the text before the needle in full (so the needle's chunk reads, while it is ingested,
what it reads in the real trial), the needle's chunk, the 2(w+c) tokens after it, then the w+c tokens
before the trial's last window (text that never saw the needle), then the trial's last window and the
question as a prompt. About 1 to 6 min a trial on one core, against about 9 min for a 64k trial in full.
Ingests (`ingest_memory`): `all read` (the served ingest), `needle alone` (only the needle's chunk reads
no memory), `all but needle` (everything else reads none), `none read`.

    .venv/bin/python bench/passkey_ingest_study.py --lengths 65536 --trials 10 --only 1:3 --reading "window q32 p1"

Writes bench/results/passkey_ingest_study.{json,md}; trials of earlier runs with the same settings are kept.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from passkey_read_study import READINGS, _answer, reading
from passkey_study import study_setup

from memlong.data import PASSKEY_QUESTION
from memlong.eval.common import machine_info, markdown_table, write_json
from memlong.eval.passkey import _copy_memory, _Recording, passkey_layout

OUT = Path(__file__).parent / "results"
# ingest -> whether each part (text before the needle, the needle's chunk, the rest) reads memory
INGESTS = {
    "all read": (True, True, True),
    "needle alone": (True, False, True),
    "all but needle": (False, True, False),
    "none read": (False, False, False),
}


def _add_args(ap) -> None:
    ap.add_argument("--only", default="", help="trial indices i:j (default: all)")
    ap.add_argument(
        "--reading", default="window q32 p1", help=f"how the prompt is read, one of {list(READINGS)}"
    )


def main() -> None:
    args, settings, stack = study_setup(__doc__.splitlines()[0], "65536", OUT, _add_args)
    if args.reading not in READINGS:
        raise SystemExit(f"unknown reading {args.reading!r}; known: {list(READINGS)}")
    cfg = stack.model.config
    c, w = cfg.chunk, cfg.local_window
    book = stack.encode_book(args.book)
    question = stack.encode(PASSKEY_QUESTION)
    lo, _, hi = args.only.partition(":")
    only = range(int(lo or 0), int(hi or args.trials))
    for length in settings.lengths:
        hay, n_hay, needles, depths = passkey_layout(stack, book, settings, length)
        for i, ((key, text), depth) in enumerate(zip(needles, depths, strict=True)):
            if i not in only:
                continue
            t0 = time.perf_counter()
            seq = stack.encode(text) + hay[depth:n_hay] + question
            split = (len(seq) - len(question) - w) // c * c  # as run_passkey
            parts = [hay[:depth], seq[:c], seq[c : c + 2 * (w + c)] + seq[split - w - c : split]]
            row = {"trial": i, "depth": depth, "key": key, "ingests": {}}
            for name, reads in INGESTS.items():
                reader = stack.reader(with_memory=True)
                for part, read in zip(parts, reads, strict=True):
                    with stack.model.configured(ingest_memory=read):
                        reader.ingest(part, more=True)
                reader.cancel_prefetch()  # the fork reads the boundary itself
                trial = reader.fork(_Recording(_copy_memory(reader.memory)), writable=True)
                with stack.model.configured(**reading(args.reading)):  # answered as the read study does
                    row["ingests"][name] = _answer(
                        stack, trial, seq[split:], key, settings.digits, depth // c
                    )
            print(
                f"{length} trial {i}: depth {depth} key {key} "
                + "; ".join(f"{n}: {r['answer']!r} lp {r['key_logp']:.2f}" for n, r in row["ingests"].items())
                + f" ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
            _keep(args, stack, length, row)


def _keep(args, stack, length: int, row: dict) -> None:
    """Merge one trial into the results (same settings: book, trials, seed, reading) and rewrite them."""
    path = args.out / "passkey_ingest_study.json"
    settings = {"book": args.book, "trials": args.trials, "seed": args.seed, "reading": args.reading}
    old = json.loads(path.read_text()) if path.is_file() else {}
    trials = old.get("trials", {}) if old.get("settings") == settings else {}
    kept = [t for t in trials.get(str(length), []) if t["trial"] != row["trial"]]
    trials[str(length)] = sorted(kept + [row], key=lambda t: t["trial"])
    rows = []
    for n, ts in sorted(trials.items(), key=lambda kv: int(kv[0])):
        for name in INGESTS:
            rs = [t["ingests"][name] for t in ts]
            rows.append(
                {
                    "context_tokens": int(n),
                    "ingest": name,
                    "trials": ",".join(str(t["trial"]) for t in ts),
                    "correct": sum(r["correct"] for r in rs),
                    "needle_retrieved": sum(r["needle_rank"] is not None for r in rs),
                    "mean_key_logp": statistics.fmean(r["key_logp"] for r in rs),
                }
            )
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(path, {"settings": settings, "machine": machine_info(), "rows": rows, "trials": trials})
    cfg = stack.model.config
    head = (
        "Passkey replica (bench/passkey_ingest_study.py): the key's chunk and the text around it ingested "
        "with or without memory reading, then the trial's last window and question read with "
        f"`{args.reading}` (book {args.book}, seed {args.seed}, chunk {cfg.chunk}, window {cfg.local_window}, "
        f"top-k {cfg.top_k}). `python bench/passkey_ingest_study.py --lengths LENGTHS --only I:J`\n\n"
    )
    cols = ["context_tokens", "ingest", "trials", "correct", "needle_retrieved", "mean_key_logp"]
    (args.out / "passkey_ingest_study.md").write_text(head + markdown_table(rows, cols))


if __name__ == "__main__":
    main()
