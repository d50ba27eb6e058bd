"""The model's own ceiling on a passkey trial at any length (issue 10): the needle's chunk placed as text
right before the prompt's last local window, read with plain full attention. No memory and no retrieval:
it says whether the model copies the key when the needle's chunk sits where memory puts it (about one
window before the question), with the same window text as `memlong eval passkey` reads at that length.

Per trial of `memlong eval passkey` (same seed, same layout), three contexts, each ending with the
question:
- `needle+window`: the needle's chunk (128 tokens), then the last local window;
- `sinks+needle+window`: the text's first 4 tokens (the sinks memory reading keeps), then the same;
- `needle+4k`: the needle's chunk, then the last 4096 tokens (it sits 4k back).

    .venv/bin/python bench/passkey_oracle.py --lengths 16384,65536 --trials 10 --threads 1

Writes bench/results/passkey_oracle.{json,md}; rows of an earlier run with the same settings at other
lengths are kept.
"""

from __future__ import annotations

import json
from pathlib import Path

from passkey_study import study_setup

from memlong.data import PASSKEY_QUESTION
from memlong.eval.common import machine_info, markdown_table, write_json
from memlong.eval.passkey import _full_answer, _is_correct, passkey_layout

OUT = Path(__file__).parent / "results"


def contexts(seq: list[int], hay: list[int], question: list[int], c: int, w: int, sinks: int) -> dict:
    needle, q = seq[:c], len(question)
    return {
        "needle+window": needle + seq[-(w + q) :],
        "sinks+needle+window": hay[:sinks] + needle + seq[-(w + q) :],
        "needle+4k": needle + seq[-(4096 + q) :],
    }


def main() -> None:
    args, settings, stack = study_setup(__doc__.splitlines()[0], "16384,65536", OUT)
    cfg = stack.model.config
    book = stack.encode_book(args.book)
    question = stack.encode(PASSKEY_QUESTION)
    rows, trials = [], {}
    for length in settings.lengths:
        hay, n_hay, needles, depths = passkey_layout(stack, book, settings, length)
        correct: dict[str, int] = {}
        per_trial = []
        for (key, text), depth in zip(needles, depths, strict=True):
            seq = stack.encode(text) + hay[depth:n_hay] + question
            row = {"depth": depth, "key": key}
            for name, toks in contexts(
                seq, hay, question, cfg.chunk, cfg.local_window, cfg.sink_tokens
            ).items():
                answer = _full_answer(stack, toks, settings.digits)
                row[name] = answer
                correct[name] = correct.get(name, 0) + _is_correct(answer, key)
            per_trial.append(row)
            print(length, row, flush=True)
        trials[str(length)] = per_trial
        rows += [
            {"context_tokens": length, "context": name, "trials": args.trials, "correct": n}
            for name, n in correct.items()
        ]
    out = args.out
    settings_out = {"book": args.book, "trials": args.trials, "seed": args.seed, "chunk": cfg.chunk}
    settings_out |= {"local_window": cfg.local_window, "sink_tokens": cfg.sink_tokens}
    path = out / "passkey_oracle.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    if old.get("settings") == settings_out:
        rows = [r for r in old["rows"] if str(r["context_tokens"]) not in trials] + rows
        trials = {**{k: v for k, v in old["trials"].items() if k not in trials}, **trials}
        rows.sort(key=lambda r: r["context_tokens"])
    write_json(
        path,
        {"settings": settings_out, "machine": machine_info(), "rows": rows, "trials": trials},
    )
    head = (
        "Passkey with the needle's chunk as text before the last window, plain full attention, the trials of "
        f"`memlong eval passkey` (book {args.book}, seed {args.seed}, chunk {cfg.chunk}, window "
        f"{cfg.local_window}). `python bench/passkey_oracle.py --lengths LENGTHS`\n\n"
    )
    (out / "passkey_oracle.md").write_text(
        head + markdown_table(rows, ["context_tokens", "context", "trials", "correct"])
    )


if __name__ == "__main__":
    main()
