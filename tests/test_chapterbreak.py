"""The ChapterBreak-style task: cases built from the packaged books, scored the same for every method."""

from __future__ import annotations

from memlong.eval.chapterbreak import ChapterBreakSettings, build_cases, run_chapterbreak, works
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
    rows = run_chapterbreak(stack, settings)
    assert [r["method"] for r in rows] == ["full", "sliding", "per_layer"]
    assert {r["cases"] for r in rows} == {3} and all(0 <= r["correct"] <= 3 for r in rows)
