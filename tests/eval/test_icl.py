"""The ICL evaluation: a fixed, disjoint test split; both methods score the same prompts; memory holds
the demonstrations and is retrieved from."""

from __future__ import annotations

import dataclasses
import statistics

import pytest

from memlong.errors import InvalidArgument
from memlong.eval.common import Stack
from memlong.eval.icl import ICLSettings, load_task, run_icl, write_icl
from tests.factories import RecordingRetriever, TinyTokenizer, tiny_memlong

WORDS = ["good", "bad", "film", "plot", "dull", "fine", "great", "story", "acting", "long"]


class WordTokenizer(TinyTokenizer):
    """One id per word (stable hash into the tiny vocabulary); decode as TinyTokenizer."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [sum(w.encode()) % 97 for w in text.split()]}


def _write_task(root, task: str, n: int) -> None:
    folder = root / task
    folder.mkdir(parents=True)
    lines = [f"{i % 2},{WORDS[i % 10]} {WORDS[(i * 7) % 10]} number{i} ." for i in range(n)]
    (folder / "train.csv").write_text("\n".join(lines) + "\n")


def test_the_test_split_is_fixed_and_disjoint_from_the_demonstrations(tmp_path):
    _write_task(tmp_path, "mr", 100)
    settings = ICLSettings(data_dir=str(tmp_path), test_pool=20, test_examples=10)
    pool, test = load_task(tmp_path, "mr", settings)
    again_pool, again_test = load_task(tmp_path, "mr", settings)
    assert test == again_test and pool == again_pool and len(test) == 10 and len(pool) == 80
    assert not {s for s, _ in test} & {s for s, _ in pool}


def _tiny_run(tmp_path, seeds: tuple[int, ...]) -> tuple[Stack, ICLSettings]:
    """A tiny model and an MR-like task written under tmp_path: 1 local and 6 memory demonstrations."""
    _write_task(tmp_path, "mr", 60)
    stack = Stack(tiny_memlong(chunk=4, window=8, top_k=2), WordTokenizer(), RecordingRetriever(), "tiny")
    settings = ICLSettings(
        data_dir=str(tmp_path),
        tasks=("mr",),
        seeds=seeds,
        local_demos=1,
        memory_demos=6,
        test_examples=5,
        test_pool=10,
    )
    return stack, settings


def test_both_methods_score_the_same_prompts_and_memory_is_read(tmp_path):
    stack, settings = _tiny_run(tmp_path, (0, 1))
    rows = run_icl(stack, settings)
    per_seed = [r for r in rows if r["seed"] != "mean"]
    assert {(r["method"], r["seed"]) for r in per_seed} == {
        (m, s) for m in ("none", "memory") for s in (0, 1)
    }
    assert all(r["test_examples"] == 5 for r in rows)
    memory = [r for r in per_seed if r["method"] == "memory"]
    assert all(r["memory_chunks"] > 0 and r["retrievals_per_example"] > 0 for r in memory)
    assert all(r["retrievals_per_example"] == 0 for r in per_seed if r["method"] == "none")
    assert all(sum(r["predicted_raw"]) == sum(r["gold"]) == 5 for r in per_seed)
    for method in ("none", "memory"):
        mean = next(r for r in rows if r["seed"] == "mean" and r["method"] == method)
        for scoring in ("raw", "cf", "batch"):
            accs = [r[f"accuracy_{scoring}"] for r in per_seed if r["method"] == method]
            assert mean[f"accuracy_{scoring}"] == pytest.approx(statistics.mean(accs))
        assert mean["accuracy"] == mean["accuracy_batch"]
    write_icl(tmp_path, settings, rows, {})
    assert (
        "| task | method | local_demos | memory_demos | test_examples | raw | cf | batch | chance |"
        in (tmp_path / "icl.md").read_text()
    )


def test_one_method_alone_scores_as_it_does_beside_the_other_and_unknown_ones_are_refused(tmp_path):
    stack, both = _tiny_run(tmp_path, (0,))
    memory_only = dataclasses.replace(both, methods=("memory",))
    per_seed = [r for r in run_icl(stack, both) if r["method"] == "memory" and r["seed"] == 0]
    alone = [r for r in run_icl(stack, memory_only) if r["seed"] == 0]
    assert [r["method"] for r in alone] == ["memory"]
    assert alone[0]["accuracy_raw"] == per_seed[0]["accuracy_raw"]
    assert alone[0]["predicted_raw"] == per_seed[0]["predicted_raw"]
    with pytest.raises(InvalidArgument, match="methods"):
        run_icl(stack, dataclasses.replace(both, methods=("memroy",)))


def test_a_missing_task_folder_is_a_clear_error(tmp_path):
    from memlong.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="no ICL task folder"):
        load_task(tmp_path, "subj", ICLSettings(data_dir=str(tmp_path)))


def test_the_data_ships_in_the_package_compressed_and_reads_the_same(tmp_path):
    """The default data folder is inside the package; a .gz file gives the rows of the plain file."""
    import gzip
    from pathlib import Path

    from memlong.packages import ICL_DATA_DIR, SHIPPED

    settings = ICLSettings(test_pool=20, test_examples=10)
    assert Path(settings.data_dir) == ICL_DATA_DIR and ICL_DATA_DIR.is_relative_to(SHIPPED)
    _write_task(tmp_path / "plain", "mr", 100)
    packed = tmp_path / "packed" / "mr"
    packed.mkdir(parents=True)
    (packed / "train.csv.gz").write_bytes(gzip.compress((tmp_path / "plain/mr/train.csv").read_bytes()))
    assert load_task(tmp_path / "packed", "mr", settings) == load_task(tmp_path / "plain", "mr", settings)
    shared = Path(__file__).resolve().parents[3] / "shared/data/icl"  # the copy the results used, if here
    for task in ("sst-2", "mr", "sst-5", "subj"):
        pool, test = load_task(ICL_DATA_DIR, task, ICLSettings())
        assert len(test) == ICLSettings().test_examples
        if shared.is_dir():
            assert (pool, test) == load_task(shared, task, ICLSettings()), task


def test_calibration_takes_out_the_label_prior_the_same_way_for_every_scoring():
    """raw: log-probs renormalised over the labels; cf: less the content-free prompts' mean probability;
    batch: less the test prompts' own mean probability (no labels used)."""
    import torch

    from memlong.eval.icl import SCORINGS, calibrated

    # Every prompt leans to label 1 by the same 2 nats; the sentence moves label 0 by +-1.
    logp = torch.log_softmax(torch.tensor([[1.0, 2.0], [-1.0, 2.0], [1.0, 2.0], [-1.0, 2.0]]), -1) - 3.0
    content_free = torch.tensor([[0.0, 2.0], [0.0, 2.0]])
    scores = calibrated(logp, content_free)
    assert set(scores) == set(SCORINGS)
    assert torch.allclose(scores["raw"].exp().sum(1), torch.ones(4))
    assert scores["raw"].argmax(1).tolist() == [1, 1, 1, 1]  # the prior wins every prompt
    assert scores["cf"].argmax(1).tolist() == [0, 1, 0, 1]
    assert scores["batch"].argmax(1).tolist() == [0, 1, 0, 1]
    # A prior that is already flat changes nothing.
    flat = calibrated(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.zeros(1, 2))
    assert torch.equal(flat["cf"].argmax(1), flat["raw"].argmax(1))
    assert torch.equal(flat["batch"].argmax(1), flat["raw"].argmax(1))
