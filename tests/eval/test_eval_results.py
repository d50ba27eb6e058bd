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


def test_runs_ending_at_the_same_token_keep_each_others_rows(tmp_path):
    from memlong.eval.ppl import PPLSettings, write_ppl

    def row(method, length, ppl):
        return {
            "book": "kjv",
            "method": method,
            "context_tokens": length,
            "layout": "per_layer",
            "mem_position": "zero",
            "top_k": 8,
            "memory_layers": "all",
            "ppl": ppl,
        }

    write_ppl(tmp_path, PPLSettings(lengths=(8192,), windows=1, end=131072), [row("keys", 8192, 3.2)], [], {})
    write_ppl(
        tmp_path, PPLSettings(lengths=(32768,), windows=1, end=131072), [row("keys", 32768, 3.3)], [], {}
    )
    rows = json.loads((tmp_path / "ppl_kjv.json").read_text())
    assert sorted((r["context_tokens"], r["ppl"]) for r in rows) == [(8192, 3.2), (32768, 3.3)]
    # a run whose window ends elsewhere scores other tokens: its rows replace, never mix
    write_ppl(tmp_path, PPLSettings(lengths=(8192,), windows=1), [row("keys", 8192, 9.9)], [], {})
    rows = json.loads((tmp_path / "ppl_kjv.json").read_text())
    assert [(r["context_tokens"], r["ppl"]) for r in rows] == [(8192, 9.9)]
