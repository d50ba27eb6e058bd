"""The passkey trials' layout (memlong.eval.passkey.passkey_layout), which the evaluation and the
retrieval-only study both read: every trial is `length` tokens at most (exactly for the longest needle),
each needle lies before the last local window on a chunk boundary, and a seed gives the same trials."""

from __future__ import annotations

from types import SimpleNamespace

from memlong.data import PASSKEY_QUESTION
from memlong.eval.passkey import PasskeySettings, passkey_layout

C, W = 8, 32


class _Stack:
    model = SimpleNamespace(config=SimpleNamespace(chunk=C, local_window=W))

    @staticmethod
    def encode(text: str) -> list[int]:
        return list(text.encode())


def test_trials_fit_the_length_and_put_the_needle_before_the_last_window():
    book = list(range(5000))
    settings = PasskeySettings(trials=12, seed=3)
    question = len(_Stack.encode(PASSKEY_QUESTION))
    for length in (600, 1024):
        hay, n_hay, needles, depths = passkey_layout(_Stack(), book, settings, length)
        assert len(hay) == length and hay == book[hay[0] : hay[0] + length]
        assert len(needles) == len(depths) == 12 and depths == sorted(depths)
        sizes = [len(_Stack.encode(text)) + n_hay + question for _, text in needles]
        assert max(sizes) == length and min(sizes) <= length
        for (key, text), depth in zip(needles, depths, strict=True):
            assert key in text and depth % C == 0
            assert depth + C + W <= n_hay  # the needle's chunk leaves the window before the question
    assert passkey_layout(_Stack(), book, settings, 600) == passkey_layout(_Stack(), book, settings, 600)
