"""Assemble bench/results/REPORT.md from the JSON results (run after the evaluations).

.venv/bin/python bench/report.py
"""

from __future__ import annotations

import json
from pathlib import Path

from memlong.eval.chapterbreak import CHAPTERBREAK_COLUMNS
from memlong.eval.common import markdown_table
from memlong.eval.passkey import PASSKEY_COLUMNS
from memlong.eval.ppl import PPL_COLUMNS

OUT = Path(__file__).resolve().parent / "results"


def _load(name: str):
    path = OUT / name
    return json.loads(path.read_text()) if path.is_file() else None


def ppl_section() -> str:
    books = sorted(p.stem[len("ppl_") :] for p in OUT.glob("ppl_*.json") if p.stem.count("_") == 1)
    if not books:
        return "## Perplexity\n\nNot run yet: `memlong eval ppl`.\n"
    parts = ["## Perplexity (same tokens for every method)\n"]
    for book in books:
        rows = _load(f"ppl_{book}.json")
        s = (_load(f"ppl_{book}_meta.json") or {}).get("settings", {})
        lengths = sorted({r["context_tokens"] for r in rows})
        for r in rows:  # one pivot row per method and memory position (both may be measured)
            r["reading"] = r["method"] + (
                f" [{r['mem_position']}]" if r.get("mem_position", "none") != "none" else ""
            )
        methods = sorted({r["reading"] for r in rows}, key=lambda m: (m != "full", m != "sliding", m))
        pivot = []
        for method in methods:
            row = {"method": method}
            for length in lengths:
                hit = [r["ppl"] for r in rows if r["reading"] == method and r["context_tokens"] == length]
                row[f"{length // 1024}k"] = f"{hit[0]:.2f}" if hit else "-"
            pivot.append(row)
        parts.append(
            f"### `{book}`\n\n{s.get('windows')} window(s) per length, all ending at the same token, so every "
            f"length scores the same last {s.get('score_tokens')} tokens with every method "
            f"({s.get('windows', 0) * s.get('score_tokens', 0)} tokens per cell); memory fresh per window; every "
            f"method reads the window from its first token. Full attention up to {s.get('full_max')} tokens.\n\n"
            + markdown_table(pivot, ["method"] + [f"{x // 1024}k" for x in lengths])
            + f"\n![ppl](ppl_{book}.png)\n\n<details><summary>settings of every cell</summary>\n\n"
            + markdown_table(rows, PPL_COLUMNS)
            + "\n</details>\n"
        )
    return "\n".join(parts)


def passkey_section() -> str:
    rows = _load("passkey.json")
    if not rows:
        return "## Passkey\n\nNot run yet: `memlong eval passkey`.\n"
    s = (_load("passkey_meta.json") or {}).get("settings", {})
    settings = (
        f"Haystack: book `{s.get('book')}`; a {s.get('digits')}-digit key at a random chunk-aligned depth before "
        f"the last local window, asked for at the end and answered greedily; {s.get('trials')} trials per length "
        f"(seed {s.get('seed')}), the same haystacks, keys and depths for every method. Full attention up to "
        f"{s.get('full_max')} tokens. `needle_retrieved`: share of trials whose answer was generated with the "
        "needle's chunk among the retrieved.\n\n"
    )
    served = (_load("noingest_study/passkey_read_study.json") or {}).get("rows", [])
    served = [r for r in served if r["reading"] in ("q32 p1", "window q32 p1", "sliding")]
    now = (
        "### Served defaults\n\nThe same trials, ingested without reading memory; the question's last 32 "
        "tokens retrieve the best chunk, which the question reads (`q32 p1`, served) or the whole last window "
        "and the question read (`window q32 p1`, served until the window was found to cost ICL and to change "
        'no passkey answer) (`python bench/passkey_read_study.py --no-ingest-memory --readings "q32 p1,window '
        "q32 p1\"`, `noingest_study/`). `needle_retrieved`: trials whose question retrieved the needle's chunk; "
        "the key's log-probability given the prompt, teacher forced.\n\n"
        + markdown_table(
            served, ["context_tokens", "reading", "trials", "correct", "needle_retrieved", "mean_key_logp"]
        )
        + "\n### `memlong eval passkey` (full attention; the previous default: ingest reading memory, the "
        "prompt's last chunk retrieving the top 8; variants)\n\n"
        if served
        else ""
    )
    return "## Passkey retrieval\n\n" + settings + now + markdown_table(rows, PASSKEY_COLUMNS)


def chapterbreak_section() -> str:
    files = sorted(OUT.glob("chapterbreak_*.json"))
    if not files:
        return "## ChapterBreak-style\n\nNot run yet: `memlong eval chapterbreak`.\n"
    rows, settings = [], []
    for path in files:
        data = json.loads(path.read_text())
        rows += data["rows"]
        st = data["meta"]["settings"]
        done = data["rows"][0]["cases"] if data["rows"] else 0
        stopped = (
            f" (stopped after {done}: the table is written after every case)" if done < st["cases"] else ""
        )
        settings.append(
            f"`{st['book']}` at {st['context']} tokens: {st['cases']} cases requested{stopped} (seed {st['seed']}), "
            f"{st['distractors']} distractors, {st['candidate_tokens']} candidate tokens"
        )
    return (
        "## ChapterBreak-style suffix identification\n\nAfter a long prefix ending at a section break, the true "
        "next section's opening is ranked against openings of other sections of the same work by "
        "log-likelihood (`memlong/eval/chapterbreak.py`). `calibrated`: each candidate's log-likelihood after "
        "the prefix less its log-likelihood after the prefix's last token alone (what the past adds); "
        "`correct`/`accuracy`: the raw log-likelihood; margins: the true opening's score less the best "
        "distractor's (nats). " + "; ".join(settings) + ".\n\n" + markdown_table(rows, CHAPTERBREAK_COLUMNS)
    )


def icl_section() -> str:
    path = OUT / "icl.md"
    if not path.is_file():
        return "## In-context learning\n\nNot run with per-layer memory yet: `memlong eval icl`. (The earlier table, 2026-11-22, read the paper layout on base weights in the broken sink regime and was removed.)\n"
    return "## In-context learning (demonstrations in memory vs none)\n\n" + path.read_text()


def speed_section() -> str:
    data = _load("speed.json")
    if not data:
        return "## Speed and memory\n\nNot run yet: `python bench/speed_bench.py`.\n"
    text = (OUT / "speed.md").read_text()
    rows = data["records"]
    full = {r["context_tokens"]: r["score_tok_s"] for r in rows if r["method"] == "full"}
    ratio = [
        {
            "context_tokens": r["context_tokens"],
            "full_forward_tok_s": f"{full[r['context_tokens']]:.0f}",
            "memlong_ingest_tok_s": f"{r['ingest_tok_s']:.0f}",
            "ingest / full": f"{r['ingest_tok_s'] / full[r['context_tokens']]:.2f}x",
        }
        for r in rows
        if r["method"] == "memlong" and r["context_tokens"] in full and r.get("ingest_tok_s")
    ]
    cols = ["context_tokens", "full_forward_tok_s", "memlong_ingest_tok_s", "ingest / full"]
    return (
        "## Speed and memory (decoder, CPU)\n\n"
        + text
        + "\nIngest (layers 0..mem_layer, with memory writes) against one full-attention forward of the same "
        "context:\n\n" + markdown_table(ratio, cols) + "\n![peak RSS](speed.png)\n"
    )


def main() -> None:
    parts = [
        "# MemLong on SmolLM2-135M-Instruct: measured results\n",
        "Generated by `bench/report.py` from the JSON files beside it. Commands: `memlong eval ppl`, "
        "`memlong eval passkey`, `memlong eval chapterbreak`, `memlong eval icl`, `python bench/speed_bench.py` (settings in each JSON's meta).\n",
        ppl_section(),
        passkey_section(),
        chapterbreak_section(),
        icl_section(),
        speed_section(),
    ]
    notes = OUT / "NOTES.md"
    if notes.is_file():
        parts.append(notes.read_text())
    (OUT / "REPORT.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main()
