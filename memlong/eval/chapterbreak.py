"""ChapterBreak-style suffix identification on the packaged books (LongMem's long-range task).

After a long prefix that ends at a section break, rank the true next section's opening against the
openings of other sections of the same work, by the log-likelihood each gets after the prefix. Only text
far back tells them apart: who is on stage, which story is being told, so a reader that keeps the
distant past (memory) should rank the true opening first more often than one with a local window only.

- Sections: the scenes of each Shakespeare play (`### SCENE` headings), the chapters of each book of the
  King James Bible. Headings are left out of both prefix and candidates (a scene number would give the
  answer away); every candidate is the first `candidate_tokens` tokens of its section's body.
- Cases: section breaks with at least `context` tokens of the same work before them, drawn with a seed;
  distractors are openings of other sections of the same work that do not occur in the prefix (after
  the true opening, or wholly before the prefix): an opening the reader has seen would be copied, not
  judged.
- Every method reads the same prefix tokens and scores the same candidate tokens: `full` (one forward up
  to `full_max`), `sliding` (local window and sinks only), `per_layer` (per-layer memory).
- Scores: a candidate's summed log-probability after the prefix (all candidates have the same token
  count), and the same less its summed log-probability after the prefix's last token alone (the
  "calibrated" score, a pointwise mutual information between prefix and candidate). The raw score is
  dominated by how predictable an opening is on its own (a short stage direction beats a speech after
  any prefix: full attention ranks the true opening first in none of the first cases measured), which
  no reading of the past can change; the calibrated score keeps only what the prefix adds. The
  reference term does not depend on the method, so every method is ranked against the same numbers.
- Accuracy: the true opening ranked first, by either score. Chance is 1 / (1 + distractors).
"""

from __future__ import annotations

import copy
import inspect
import random
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from memlong.data import kjv_text, shakespeare_plays
from memlong.eval.common import Stack, machine_info, markdown_table, stock_attention, write_json

# A heading line goes with its line break and the blank lines after it: the text before a heading already
# ends with a blank line, so the prefix runs straight into the next body ("_Exeunt_\n\n_Enter ..."), and an
# ACT heading directly followed by a SCENE heading leaves two starts at one place (merged by _dedupe).
_SCENE = re.compile(r"^#{2,3} (?:ACT|SCENE|PROLOGUE|EPILOGUE|INDUCTION).*\n*", re.M)


# The summary table's columns (here and in bench/report.py)
CHAPTERBREAK_COLUMNS = [
    "book",
    "method",
    "context_tokens",
    "cases",
    "candidates",
    "calibrated_correct",
    "calibrated_accuracy",
    "median_calibrated_margin",
    "correct",
    "accuracy",
    "median_margin",
    "chance",
]


@dataclass(frozen=True)
class ChapterBreakSettings:
    book: str = "shakespeare"  # "shakespeare" (scenes of each play) or "kjv" (chapters of each book)
    context: int = 4096  # prefix tokens before the break
    candidate_tokens: int = 64
    distractors: int = 5
    cases: int = 40
    seed: int = 0
    methods: tuple[str, ...] = ("full", "sliding", "per_layer")
    full_max: int = 8192


@dataclass
class Work:
    """One play or one biblical book: its text without headings, and where each section's body starts."""

    name: str
    text: str
    starts: list[int]  # character offsets of section bodies in `text`


def _split(text: str, heading: re.Pattern) -> tuple[str, list[int]]:
    """Drop heading lines; (text, offsets where the text after each heading begins)."""
    out, starts, pos = [], [], 0
    for m in heading.finditer(text):
        out.append(text[pos : m.start()])
        starts.append(sum(len(x) for x in out))
        pos = m.end()
    out.append(text[pos:])
    return "".join(out), starts


def works(book: str) -> list[Work]:
    if book == "shakespeare":
        result = []
        for name, play in shakespeare_plays().items():
            text, starts = _split(play, _SCENE)
            result.append(Work(name, text, _dedupe(starts)))
        return result
    if book == "kjv":
        by_book: dict[str, list[str]] = {}
        # kjv_text() puts "\n\n<Book> <chapter>\n\n" before every chapter's verses
        pieces = re.split(r"\n\n([^\n]+?) (\d+)\n\n", "\n\n" + kjv_text().lstrip("\n"))
        for i in range(1, len(pieces) - 2, 3):  # ["", book, chapter, body, book, chapter, body, ...]
            by_book.setdefault(pieces[i], []).append(pieces[i + 2])
        result = []
        for name, chapters in by_book.items():
            starts, offset = [], 0
            for body in chapters:
                starts.append(offset)
                offset += len(body) + 2
            result.append(Work(name, "\n\n".join(chapters), starts))
        return result
    raise ValueError(f"unknown book {book!r}: use shakespeare or kjv")


def _dedupe(starts: list[int]) -> list[int]:
    """An ACT heading directly followed by a SCENE heading gives two starts at one place: keep one."""
    return sorted(set(starts))


@dataclass
class Case:
    work: str
    prefix: list[int]
    candidates: list[list[int]]  # index 0 is the true continuation


def build_cases(stack: Stack, settings: ChapterBreakSettings) -> list[Case]:
    """Seeded cases; every candidate exactly `candidate_tokens` tokens, every prefix `context` tokens."""
    rng = random.Random(f"chapterbreak:{settings.book}:{settings.seed}")
    pool: list[tuple[Work, list[int], list[int]]] = []  # (work, its tokens, token offsets of section starts)
    for work in works(settings.book):
        if len(work.starts) < settings.distractors + 2:
            continue
        ids, offsets = _tokens_at(stack, work.text, work.starts)
        pool.append((work, ids, offsets))
    breaks = [
        (wi, si)
        for wi, (_, ids, offs) in enumerate(pool)
        for si, o in enumerate(offs)
        if o >= settings.context and o + settings.candidate_tokens <= len(ids)
    ]
    rng.shuffle(breaks)
    cases = []
    for wi, si in breaks[: settings.cases]:
        work, ids, offs = pool[wi]
        start = offs[si]
        # Distractors never occur in the prefix: an opening the reader has seen would be recognised
        # (copied), not judged as a continuation. Nor do they overlap the true opening (a section shorter
        # than a candidate would make the answer its own distractor, shifted). So: openings after the true
        # candidate, or wholly before the prefix.
        others = sorted(
            {
                o
                for o in offs
                if o + settings.candidate_tokens <= len(ids)
                and (
                    o >= start + settings.candidate_tokens
                    or o + settings.candidate_tokens <= start - settings.context
                )
            }
        )
        if len(others) < settings.distractors:
            continue
        picks = rng.sample(others, settings.distractors)
        cands = [ids[o : o + settings.candidate_tokens] for o in [start, *picks]]
        cases.append(Case(work.name, ids[start - settings.context : start], cands))
    return cases


def _tokens_at(stack: Stack, text: str, starts: list[int]) -> tuple[list[int], list[int]]:
    """Token ids of `text` and the token index where each character offset in `starts` begins
    (sections are tokenised separately, so every candidate starts on a token boundary)."""
    ids: list[int] = []
    offsets: list[int] = []
    bounds = [0, *starts, len(text)]
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        if lo in starts and (not offsets or offsets[-1] != len(ids)):  # a start at 0 counts once
            offsets.append(len(ids))
        ids.extend(stack.encode(text[lo:hi]))
    return ids, offsets


@torch.no_grad()
def _full_scores(stack: Stack, case: Case) -> list[float]:
    model = stack.model
    with stock_attention(model):
        # transformers renamed past_key_values to cache in 5.x; the project admits the whole series
        name = "cache" if "cache" in inspect.signature(model.hf.forward).parameters else "past_key_values"
        out = model.hf(torch.tensor([case.prefix]), use_cache=True)
        last = torch.log_softmax(out.logits[0, -1].float(), -1)
        scores = []
        for cand in case.candidates:
            cache = copy.deepcopy(out[name])
            logits = model.hf(torch.tensor([cand]), use_cache=True, **{name: cache}).logits[0]
            logp = torch.log_softmax(logits[:-1].float(), -1).gather(1, torch.tensor(cand[1:])[:, None])
            scores.append(float(last[cand[0]] + logp.sum()))
    return scores


@torch.no_grad()
def _reference_scores(stack: Stack, case: Case) -> list[float]:
    """Each candidate's summed log-probability after the prefix's last token only (every token of it
    scored, as in the methods' scores): what an opening is worth without the past."""
    model = stack.model
    with stock_attention(model):
        ids = torch.tensor([[case.prefix[-1], *cand] for cand in case.candidates])
        logp = torch.log_softmax(model.hf(ids).logits[:, :-1].float(), -1)
        return logp.gather(2, ids[:, 1:, None])[..., 0].sum(1).tolist()


@torch.no_grad()
def _reader_scores(stack: Stack, case: Case, memory: bool) -> list[float]:
    cfg = stack.model.config
    reader = stack.reader(with_memory=memory)
    split = (len(case.prefix) - 1) // cfg.chunk * cfg.chunk
    reader.ingest(case.prefix[:split])
    reader.score(case.prefix[split:])  # the LM head ran on the prefix's last token
    scores = []
    for cand in case.candidates:
        fork = reader.fork(reader.memory)  # reads memory, never writes it
        logp = fork.score(cand)
        scores.append(float(reader.next_logprobs()[cand[0]] + logp[1:].sum()))
    return scores


def run_chapterbreak(
    stack: Stack,
    settings: ChapterBreakSettings,
    on_progress: Callable[[list[dict], list[dict]], None] | None = None,
) -> tuple[list[dict], list[dict]]:
    """(one summary row per method, one record per case with every candidate's scores)."""
    cases = build_cases(stack, settings)
    if not cases:
        raise ValueError("no section break has enough context before it; lower --context")
    methods = [m for m in settings.methods if m != "full" or settings.context <= settings.full_max]
    per_case: list[dict] = []
    rows: list[dict] = []
    for case in tqdm(cases, desc=f"chapterbreak {settings.book} {settings.context}", unit="case"):
        record = {"work": case.work, "reference": _reference_scores(stack, case), "scores": {}}
        for method in methods:
            if method == "full":
                scores = _full_scores(stack, case)
            else:
                with stack.model.configured(layout="per_layer"):
                    scores = _reader_scores(stack, case, memory=method != "sliding")
            record["scores"][method] = scores
        per_case.append(record)
        rows = _rows(stack, settings, methods, per_case)
        if on_progress is not None:  # after every case: a long run that is stopped keeps what it measured
            on_progress(rows, per_case)
    return rows, per_case


def _margin(scores: list[float]) -> float:
    """The true opening's score less the best distractor's: > 0 when ranked first."""
    return scores[0] - max(scores[1:])


def _rows(
    stack: Stack, settings: ChapterBreakSettings, methods: list[str], per_case: list[dict]
) -> list[dict]:
    cfg = stack.model.config
    rows = []
    for m in methods:
        raw = [_margin(r["scores"][m]) for r in per_case]
        cal = [
            _margin([a - b for a, b in zip(r["scores"][m], r["reference"], strict=True)]) for r in per_case
        ]
        rows.append(
            {
                "book": settings.book,
                "method": m,
                "context_tokens": settings.context,
                "cases": len(per_case),
                "candidates": settings.distractors + 1,
                "correct": sum(x > 0 for x in raw),
                "accuracy": sum(x > 0 for x in raw) / len(per_case),
                "calibrated_correct": sum(x > 0 for x in cal),
                "calibrated_accuracy": sum(x > 0 for x in cal) / len(per_case),
                "chance": 1 / (settings.distractors + 1),
                "median_margin": statistics.median(raw),
                "median_calibrated_margin": statistics.median(cal),
                "local_window": settings.context if m == "full" else cfg.local_window,
                "top_k": cfg.top_k if m == "per_layer" else 0,
                "chunk": cfg.chunk,
            }
        )
    return rows


def write_chapterbreak(
    out_dir: Path,
    settings: ChapterBreakSettings,
    rows: list[dict],
    extra: dict,
    per_case: list[dict] | None = None,
) -> None:
    stem = f"chapterbreak_{settings.book}_{settings.context}"
    meta = {
        "settings": asdict(settings),
        "machine": machine_info(),
        "written": time.strftime("%F %T"),
        **extra,
    }
    write_json(out_dir / f"{stem}.json", {"meta": meta, "rows": rows, "cases": per_case or []})
    note = (
        "\n\ncalibrated: each candidate's log-likelihood after the prefix less its log-likelihood after the"
        " prefix's last token alone; correct/accuracy: the raw log-likelihood. Margins in nats (true opening"
        " less the best distractor).\n"
    )
    (out_dir / f"{stem}.md").write_text(markdown_table(rows, CHAPTERBREAK_COLUMNS) + note)
