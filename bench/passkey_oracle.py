"""The model's own ceiling on a passkey trial at any length (issue 10): the needle's chunk placed as text
right before the prompt's last local window, read with plain full attention. No memory and no retrieval:
it says whether the model copies the key when the needle's chunk sits where memory puts it (about one
window before the question), with the same window text as `memlong eval passkey` reads at that length.

Per trial of `memlong eval passkey` (same seed, same layout), these contexts, each ending with the
question:
- `needle+window`: the needle's chunk (128 tokens), then the last local window;
- `sinks+needle+window`: the text's first 4 tokens (the sinks memory reading keeps), then the same;
- `needle+4k`: the needle's chunk, then the last 4096 tokens (it sits 4k back);
- `sinks+before+needle+window`: the sinks, the local window of text before the needle, the needle's
  chunk, then the last window: the needle in its own context, all of it read by the question.
The rest are masked (the segment kinds above `contexts`): the needle's chunk has the K/V it has in its
own context (as memory stores it), and the text after it reads it, not the text before it:
- `retrieved`: the sinks, the needle's chunk, then the last window read cold (nothing before it). What a
  reader that retrieves exactly the needle's chunk, and reads it as exact attention does, could reach;
- `warm far`: the window of text before the last window (`pre`) is read too, as a sliding reader has
  it, but does not see the needle; the needle's chunk sits before `pre`;
- `warm near`: the same, with the needle's chunk between `pre` and the last window (`pre` moved back);
- `warm near ctx`: `warm near` with the needle's own context right before it in position (as memory
  computed it), not a window further back;
- `warm near overlap`: `warm near` with the needle at the last 128 positions of `pre` (`pre` and the
  window contiguous): memory that shares its positions with the local window.
Each masked context also records log p(key).

    .venv/bin/python bench/passkey_oracle.py --lengths 8192,16384,32768,65536,131072 --trials 10 --threads 1

Writes bench/results/passkey_oracle.{json,md}; rows of an earlier run with the same settings at other
lengths are kept.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch
from passkey_study import study_setup

from memlong.data import PASSKEY_QUESTION
from memlong.eval.common import machine_info, markdown_table, stock_attention, write_json
from memlong.eval.passkey import _full_answer, _is_correct, passkey_layout

OUT = Path(__file__).parent / "results"


# Segment kinds of a masked context: what each token may attend to (always causally, in sequence order).
#   sink: the text's first tokens; every token sees them.
#   before: the text before the needle; it and the needle see it.
#   needle: the needle's chunk; it sees the sinks, `before` and itself, as memory stores it.
#   local: one text read with a sliding window of w tokens (the last window, the question, the answer;
#          `pre` when warm): it sees the sinks, the local tokens at most w back, and the needle only from
#          the last window on (the text before the window does not see it).
SINK, BEFORE, NEEDLE, LOCAL = range(4)


def contexts(
    seq: list[int], hay: list[int], depth: int, question: list[int], c: int, w: int, sinks: int
) -> dict[str, tuple[list[int], list[tuple[int, list[int]]] | None, list[int] | None]]:
    """name -> (tokens, None | segments (kind, tokens) of a masked context, None | position ids)."""
    needle, q = seq[:c], len(question)
    before = hay[:sinks] + hay[max(sinks, depth - w) : depth]
    window = seq[-(w + q) :]  # the last window and the question
    pre = seq[-(2 * w + q) : -(w + q)]  # the window of text before it
    nb, ns = len(before) - sinks, sinks
    head = [(SINK, before[:sinks]), (BEFORE, before[sinks:])]
    near = head + [(LOCAL, pre), (NEEDLE, needle), (LOCAL, window)]
    # 'near' with the needle's own context right before it in position (as memory computed it), and
    # with the needle at the last c positions of `pre` (pre and the window contiguous, as a reader whose
    # memory overlaps its window's positions)
    pos_ctx = list(range(ns)) + list(range(ns + w - nb, ns + w)) + list(range(ns, ns + w + c + len(window)))
    at = ns + nb + c
    pos_nogap = (
        list(range(ns))
        + list(range(at + w - c - nb, at + w - c))
        + list(range(at, at + w))
        + list(range(at + w - c, at + w))
        + list(range(at + w, at + w + len(window)))
    )
    return {
        "needle+window": (needle + window, None, None),
        "sinks+needle+window": (hay[:sinks] + needle + window, None, None),
        "needle+4k": (needle + seq[-(4096 + q) :], None, None),
        "sinks+before+needle+window": (before + needle + window, None, None),
        "retrieved": ([], head + [(NEEDLE, needle), (LOCAL, window)], None),
        "warm far": ([], head + [(NEEDLE, needle), (LOCAL, pre), (LOCAL, window)], None),
        "warm near": ([], near, None),
        "warm near ctx": ([], near, pos_ctx),
        "warm near overlap": ([], near, pos_nogap),
    }


@torch.no_grad()
def masked_answer(
    stack, segments: list[tuple[int, list[int]]], positions: list[int] | None, key: str, w: int
) -> tuple[str, float]:
    """The greedy answer's opening and log p(key) under full attention over `segments` (see the kinds
    above), at `positions` (default 0, 1, ...): one forward over the context and the key (as more local
    tokens), the greedy tokens up to the first that is not the key's (greedy is exact that far; the
    answer is the key itself when none differs)."""
    key_ids = stack.encode(" " + key)
    segments = segments + [(LOCAL, key_ids)]
    kind = torch.tensor([k for k, toks in segments for _ in toks])
    toks = [t for _, seg in segments for t in seg]
    local = torch.cumsum(kind == LOCAL, 0) - 1  # index in the local text
    n = len(toks)
    window_from = int(local[-1]) + 1 - len(key_ids) - len(segments[-2][1])  # the last local segment's start
    a, b = kind[:, None], kind[None, :]
    seen = (
        (b == SINK)
        | ((a == BEFORE) | (a == NEEDLE)) & (b == BEFORE)
        | (a == NEEDLE) & (b == NEEDLE)
        | (a == LOCAL) & (b == LOCAL) & (local[None, :] >= local[:, None] - w)
        | (a == LOCAL) & (b == NEEDLE) & (local[:, None] >= window_from)
    ) & torch.ones(n, n, dtype=torch.bool).tril()
    mask = torch.where(seen, 0.0, float("-inf"))[None, None]
    if positions is not None:
        if len(positions) != n - len(key_ids):
            raise ValueError(f"{len(positions)} positions for {n - len(key_ids)} tokens")
        positions = positions + list(range(positions[-1] + 1, positions[-1] + 1 + len(key_ids)))
    extra = {} if positions is None else {"position_ids": torch.tensor([positions])}
    with stock_attention(stack.model):
        logits = stack.model.hf(torch.tensor([toks]), attention_mask=mask, **extra).logits[0].float()
    first = n - len(key_ids)
    logp = torch.log_softmax(logits[first - 1 : -1], -1)
    key_logp = float(logp.gather(1, torch.tensor(key_ids)[:, None]).sum())
    out = []
    for want, got in zip(key_ids, logp.argmax(-1).tolist(), strict=True):
        out.append(got)
        if got != want:
            break
    return stack.tokenizer.decode(out), key_logp


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
            for name, (toks, segments, positions) in contexts(
                seq, hay, depth, question, cfg.chunk, cfg.local_window, cfg.sink_tokens
            ).items():
                if segments is None:
                    answer = _full_answer(stack, toks, settings.digits)
                else:
                    answer, row[f"{name} logp"] = masked_answer(
                        stack, segments, positions, key, cfg.local_window
                    )
                row[name] = answer
                correct[name] = correct.get(name, 0) + _is_correct(answer, key)
            per_trial.append(row)
            print(length, row, flush=True)
        rows = []
        for name, n in correct.items():
            rows.append({"context_tokens": length, "context": name, "trials": args.trials, "correct": n})
            if f"{name} logp" in per_trial[0]:
                rows[-1]["mean_key_logp"] = statistics.fmean(t[f"{name} logp"] for t in per_trial)
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
        head + markdown_table(rows, ["context_tokens", "context", "trials", "correct", "mean_key_logp"])
    )


if __name__ == "__main__":
    main()
