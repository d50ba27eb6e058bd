"""Real-weight quality under the served defaults, on the packaged SmolLM2-135M and MiniLM (minutes):
`python3 dev.py test -m slow_eval`. Greedy answers on fixed trials, so the outcome is deterministic."""

from __future__ import annotations

import pytest
import torch

from memlong.eval.common import Stack
from memlong.eval.passkey import PasskeySettings, run_passkey
from memlong.model import MemLongConfig

pytestmark = pytest.mark.slow_eval


def test_served_memory_answers_the_8k_passkey_that_the_window_alone_cannot() -> None:
    """The first three trials of `memlong eval passkey --lengths 8k` (the key before the last window):
    memory under the served defaults finds the key's chunk and answers every one (10/10 on ten,
    bench/results/noingest_study); the sliding window answers none."""
    torch.set_num_threads(1)
    stack = Stack.load(MemLongConfig())
    settings = PasskeySettings(lengths=(8192,), trials=3, methods=("sliding", "per_layer"))
    rows = {r["method"]: r for r in run_passkey(stack, settings)}
    assert rows["per_layer"]["needle_retrieved"] == 1.0
    assert rows["per_layer"]["correct"] == 3, rows["per_layer"]["per_trial"]
    assert rows["sliding"]["correct"] == 0, rows["sliding"]["per_trial"]
