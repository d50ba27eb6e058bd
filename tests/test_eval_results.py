"""Result files of the evaluations: re-running one length keeps the other lengths of a compatible run."""

import json

from memlong.eval.passkey import PasskeySettings, write_passkey


def _row(method: str, length: int, correct: int) -> dict:
    return {"method": method, "context_tokens": length, "trials": 20, "correct": correct}


def test_rerunning_one_length_replaces_only_its_rows(tmp_path):
    first = PasskeySettings(lengths=(4096, 8192))
    write_passkey(tmp_path, first, [_row("sliding", 4096, 1), _row("sliding", 8192, 2)], {})
    again = PasskeySettings(lengths=(8192, 65536))
    write_passkey(tmp_path, again, [_row("memlong", 65536, 5), _row("sliding", 8192, 7)], {})
    rows = json.loads((tmp_path / "passkey.json").read_text())
    assert [(r["method"], r["context_tokens"], r["correct"]) for r in rows] == [
        ("sliding", 4096, 1),
        ("sliding", 8192, 7),
        ("memlong", 65536, 5),
    ]
    meta = json.loads((tmp_path / "passkey_meta.json").read_text())
    assert meta["settings"]["lengths"] == [4096, 8192, 65536]


def test_a_run_with_other_trials_does_not_mix_with_earlier_rows(tmp_path):
    write_passkey(tmp_path, PasskeySettings(trials=20), [_row("sliding", 4096, 1)], {})
    write_passkey(tmp_path, PasskeySettings(trials=5), [_row("sliding", 8192, 2)], {})
    rows = json.loads((tmp_path / "passkey.json").read_text())
    assert [(r["method"], r["context_tokens"]) for r in rows] == [("sliding", 8192)]


def test_a_window_can_end_where_a_longer_run_ended_so_one_length_scores_the_same_tokens():
    import pytest

    from memlong.eval.ppl import PPLSettings, window_ends

    long_run = PPLSettings(lengths=(8192, 131072), windows=1)
    short_run = PPLSettings(lengths=(8192,), windows=1, end=131072)
    assert window_ends(500_000, long_run) == window_ends(500_000, short_run) == [131072]
    assert window_ends(500_000, PPLSettings(lengths=(8192,), windows=1)) == [8192]
    with pytest.raises(ValueError, match="end"):
        window_ends(500_000, PPLSettings(lengths=(8192,), windows=2, end=131072))
    with pytest.raises(ValueError, match="end"):
        window_ends(500_000, PPLSettings(lengths=(8192,), windows=1, end=4096))
