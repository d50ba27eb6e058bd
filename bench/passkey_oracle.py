"""The model's own ceiling on a passkey trial at any length (issue 10): the needle's chunk placed as text
right before the prompt's last local window, read with plain full attention. No memory and no retrieval:
it says whether the model copies the key when the needle's chunk sits where memory puts it (about one
window before the question), with the same window text as `memlong eval passkey` reads at that length.

Per trial of `memlong eval passkey` (same seed, same layout), five contexts, each ending with the
question:
- `needle+window`: the needle's chunk (128 tokens), then the last local window;
- `sinks+needle+window`: the text's first 4 tokens (the sinks memory reading keeps), then the same;
- `needle+4k`: the needle's chunk, then the last 4096 tokens (it sits 4k back);
- `sinks+before+needle+window`: the sinks, the local window of text before the needle, the needle's
  chunk, then the last window: the needle in its own context, all of it read by the question;
- `retrieved`: the same tokens, but the last window, the question and the answer do not see the text
  before the needle (an attention mask): they read the sinks, the needle's chunk with the K/V it has in
  its own context (as memory stores it), and the window. What a reader that retrieves exactly the
  needle's chunk, and reads it as exact attention does, could reach.

    .venv/bin/python bench/passkey_oracle.py --lengths 8192,16384,32768,65536,131072 --trials 10 --threads 1

Writes bench/results/passkey_oracle.{json,md}; rows of an earlier run with the same settings at other
lengths are kept.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from passkey_study import study_setup

from memlong.data import PASSKEY_QUESTION
from memlong.eval.common import machine_info, markdown_table, stock_attention, write_json
from memlong.eval.passkey import _full_answer, _is_correct, passkey_layout

OUT = Path(__file__).parent / "results"


def contexts(
    seq: list[int], hay: list[int], depth: int, question: list[int], c: int, w: int, sinks: int
) -> dict[str, tuple[list[int], tuple[int, int, int] | None]]:
    """name -> (tokens, None or (lo, hi, after): tokens from `after` on do not see tokens lo..hi-1)."""
    needle, q = seq[:c], len(question)
    before = hay[:sinks] + hay[max(sinks, depth - w) : depth]
    return {
        "needle+window": (needle + seq[-(w + q) :], None),
        "sinks+needle+window": (hay[:sinks] + needle + seq[-(w + q) :], None),
        "needle+4k": (needle + seq[-(4096 + q) :], None),
        "sinks+before+needle+window": (before + needle + seq[-(w + q) :], None),
        "retrieved": (before + needle + seq[-(w + q) :], (sinks, len(before), len(before) + c)),
    }


@torch.no_grad()
def masked_answer(stack, seq: list[int], hidden: tuple[int, int, int], key: str) -> str:
    """The greedy answer's opening under full attention where tokens from `after` on (the answer's too)
    do not see tokens lo..hi-1, `hidden` = (lo, hi, after): one forward over the prompt and the key,
    the greedy tokens up to the first that is not the key's (greedy is exact that far; the answer is the
    key itself when none differs)."""
    lo, hi, after = hidden
    key_ids = stack.encode(" " + key)
    toks = list(seq) + key_ids
    seen = torch.ones(len(toks), len(toks), dtype=torch.bool).tril()
    seen[after:, lo:hi] = False
    mask = torch.where(seen, 0.0, float("-inf"))[None, None]
    with stock_attention(stack.model):
        logits = stack.model.hf(torch.tensor([toks]), attention_mask=mask).logits[0]
    greedy = logits[len(seq) - 1 : -1].argmax(-1).tolist()
    out = []
    for want, got in zip(key_ids, greedy, strict=True):
        out.append(got)
        if got != want:
            break
    return stack.tokenizer.decode(out)


def main() -> None:
    args, settings, stack = study_setup(__doc__.splitlines()[0], "16384,65536", OUT)
    cfg = stack.model.config
    book = stack.encode_book(args.book)
    question = stack.encode(PASSKEY_QUESTION)
    for length in settings.lengths:
        hay, n_hay, needles, depths = passkey_layout(stack, book, settings, length)
        correct: dict[str, int] = {}
        per_trial = []
        for (key, text), depth in zip(needles, depths, strict=True):
            seq = stack.encode(text) + hay[depth:n_hay] + question
            row = {"depth": depth, "key": key}
            for name, (toks, hidden) in contexts(
                seq, hay, depth, question, cfg.chunk, cfg.local_window, cfg.sink_tokens
            ).items():
                if hidden is None:
                    answer = _full_answer(stack, toks, settings.digits)
                else:
                    answer = masked_answer(stack, toks, hidden, key)
                row[name] = answer
                correct[name] = correct.get(name, 0) + _is_correct(answer, key)
            per_trial.append(row)
            print(length, row, flush=True)
        rows = [
            {"context_tokens": length, "context": name, "trials": args.trials, "correct": n}
            for name, n in correct.items()
        ]
        _save(args, cfg, length, rows, per_trial)  # each length as it ends


def _save(args, cfg, length: int, rows: list[dict], per_trial: list[dict]) -> None:
    """Write `length`'s rows and trials into the results, keeping other lengths of the same settings."""
    out = args.out
    settings_out = {"book": args.book, "trials": args.trials, "seed": args.seed, "chunk": cfg.chunk}
    settings_out |= {"local_window": cfg.local_window, "sink_tokens": cfg.sink_tokens}
    path = out / "passkey_oracle.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    trials = {str(length): per_trial}
    if old.get("settings") == settings_out:
        rows = [r for r in old["rows"] if r["context_tokens"] != length] + rows
        trials = {**{k: v for k, v in old["trials"].items() if k != str(length)}, **trials}
    rows.sort(key=lambda r: r["context_tokens"])
    write_json(
        path,
        {"settings": settings_out, "machine": machine_info(), "rows": rows, "trials": trials},
    )
    head = (
        "Passkey with the needle's chunk placed as text before the last window, read with plain full "
        "attention (no memory, no retrieval), the trials of `memlong eval passkey` (book "
        f"{args.book}, seed {args.seed}, chunk {cfg.chunk}, window {cfg.local_window}, "
        f"{cfg.sink_tokens} sinks). `retrieved`: the sinks, the needle's chunk computed in its own "
        "context and the last window, the text before the needle masked from the window and the question "
        "(what exact attention to exactly the needle's chunk reaches). The contexts are described in "
        "bench/passkey_oracle.py. `python bench/passkey_oracle.py --lengths LENGTHS`\n\n"
    )
    (out / "passkey_oracle.md").write_text(
        head + markdown_table(rows, ["context_tokens", "context", "trials", "correct"])
    )


if __name__ == "__main__":
    main()
