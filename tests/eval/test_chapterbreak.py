"""The ChapterBreak-style task: cases built from the packaged books, scored the same for every method."""

from __future__ import annotations

import pytest

from memlong.eval import chapterbreak
from memlong.eval.chapterbreak import ChapterBreakSettings, Work, build_cases, run_chapterbreak, works
from memlong.eval.common import Stack
from tests.factories import RecordingRetriever, tiny_memlong


class CharTokenizer:
    """One token per character (mod the tiny vocabulary): fast enough to tokenise whole plays."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(ch) % 97 for ch in text]}

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)


def _stack(window: int = 16) -> Stack:
    return Stack(tiny_memlong(chunk=8, window=window), CharTokenizer(), RecordingRetriever(), "tiny")


def test_sections_drop_headings_and_start_where_each_body_begins():
    plays = works("shakespeare")
    assert len(plays) > 30
    play = plays[0]
    assert not any(line.startswith("### SCENE") for line in play.text.splitlines())
    assert len(play.starts) > 5 and play.starts == sorted(play.starts)
    books = works("kjv")
    genesis = next(b for b in books if b.name == "Genesis")
    assert len(genesis.starts) == 50 and genesis.text[genesis.starts[1] :].startswith("1 Thus the heavens")


def test_a_heading_goes_with_its_blank_lines():
    # The text before a heading ends with a blank line: the prefix runs straight into the next body, and an
    # ACT heading directly followed by a SCENE heading is one start, not an empty section whose opening is
    # the scene's own opening again, one "\n\n" token earlier (two candidates, one text).
    for play in works("shakespeare"):
        for lo, hi in zip(play.starts, [*play.starts[1:], len(play.text)], strict=True):
            assert play.text[lo:hi].strip() and not play.text[lo].isspace(), (play.name, lo)


def test_no_distractor_overlaps_the_true_opening(monkeypatch):
    # A section shorter than a candidate: the true opening runs on into the next section, whose opening
    # must not be a distractor (the answer would compete against itself, shifted). One letter per section.
    bodies = ["a" * 60, "b" * 5, *(ch * 20 for ch in "cdefg")]
    starts = [sum(len(x) for x in bodies[:i]) for i in range(len(bodies))]
    monkeypatch.setattr(chapterbreak, "works", lambda book: [Work("w", "".join(bodies), starts)])
    for seed in range(3):
        settings = ChapterBreakSettings(context=60, candidate_tokens=10, distractors=4, cases=10, seed=seed)
        cases = build_cases(_stack(), settings)
        assert cases
        for case in cases:
            assert not any(set(case.candidates[0]) & set(c) for c in case.candidates[1:])


def test_the_true_candidate_is_what_follows_the_prefix_and_distractors_are_other_sections():
    stack = _stack()
    settings = ChapterBreakSettings(context=400, candidate_tokens=24, distractors=3, cases=6)
    cases = build_cases(stack, settings)
    assert len(cases) == 6
    for case in cases:
        assert len(case.prefix) == 400 and all(len(c) == 24 for c in case.candidates)
        assert len({tuple(c) for c in case.candidates}) == 4  # four different openings
        # no distractor occurs in the prefix (a reader would copy it, not judge it)
        seen = {tuple(case.prefix[i : i + 24]) for i in range(len(case.prefix) - 23)}
        assert not any(tuple(c) in seen for c in case.candidates[1:])
    # Rebuilt from the same seed: the same cases (every method is scored on the same tokens).
    again = build_cases(stack, settings)
    assert [c.candidates for c in again] == [c.candidates for c in cases]


def test_every_method_ranks_the_same_cases():
    stack = _stack()
    settings = ChapterBreakSettings(context=160, candidate_tokens=8, distractors=2, cases=3)
    rows, per_case = run_chapterbreak(stack, settings)
    assert [r["method"] for r in rows] == ["full", "sliding", "per_layer"]
    assert {r["cases"] for r in rows} == {3} and all(0 <= r["correct"] <= 3 for r in rows)
    assert len(per_case) == 3 and all(len(r["reference"]) == 3 for r in per_case)
    for row in rows:  # the summary is what the per-case scores say, raw and calibrated
        m = row["method"]
        raw = [r["scores"][m] for r in per_case]
        cal = [
            [a - b for a, b in zip(s, r["reference"], strict=True)]
            for s, r in zip(raw, per_case, strict=True)
        ]
        assert row["correct"] == sum(s[0] > max(s[1:]) for s in raw)
        assert row["calibrated_correct"] == sum(s[0] > max(s[1:]) for s in cal)


def test_the_reference_score_is_the_candidate_after_the_last_prefix_token():
    # Checked against the full-attention scorer given a one-token prefix (another code path: a cached
    # prefix, then each candidate): the calibration subtracts exactly that.
    stack = _stack()
    case = build_cases(stack, ChapterBreakSettings(context=160, candidate_tokens=8, distractors=2, cases=1))[
        0
    ]
    ref = chapterbreak._reference_scores(stack, case)
    one = chapterbreak.Case(case.work, case.prefix[-1:], case.candidates)
    assert ref == pytest.approx(chapterbreak._full_scores(stack, one), abs=1e-4)
    assert len(set(ref)) == 3  # different openings, different worth
