"""`memlong train run` recipes: presets and flags, documents cached as they open, resume, the card."""

from __future__ import annotations

import json

import pytest
import torch

from memlong.train import Document, TrainConfig, Trainer
from memlong.training.cache import FrozenCache
from memlong.training.card import write_card
from tests.factories import RecordingRetriever, TinyTokenizer, tiny_memlong


def _tokens(n, seed=0):
    return torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_presets_fill_unset_flags_and_flags_win():
    from memlong.cli import build_parser
    from memlong.train_cli import BASE, resolve_settings

    parser = build_parser()
    cpu = resolve_settings(parser.parse_args(["train", "run", "--out", "r", "--preset", "cpu"]))
    assert cpu["threads"] == 1 and cpu["max_minutes"] == 130.0 and cpu["device"] == "cpu"
    gpu = resolve_settings(
        parser.parse_args(["train", "run", "--out", "r", "--preset", "gpu", "--lr", "3e-4"])
    )
    assert gpu["device"] == "cuda" and gpu["bf16"] is True and gpu["lr"] == 3e-4
    plain = resolve_settings(parser.parse_args(["train", "run", "--out", "r", "--teacher", "per_layer"]))
    assert {k: plain[k] for k in BASE if k not in ("teacher", "kd_weight")} == {
        k: v for k, v in BASE.items() if k not in ("teacher", "kd_weight")
    }
    assert plain["teacher"] == "per_layer" and plain["kd_weight"] == 1.0  # a teacher alone means weight 1
    # The training defaults read as the decoder serves: the model's window, sinks, chunk and top-k.
    args = parser.parse_args(["train", "run", "--out", "r"])
    assert (args.local_window, args.chunk, args.top_k, args.sink_tokens) == (1024, 128, 8, None)


def _run(tmp_path, name, stop_after=None, resume=False):
    model = tiny_memlong(layout="paper", chunk=4, window=8, top_k=2)
    lower = FrozenCache(model, RecordingRetriever().embed, TinyTokenizer(), tmp_path / "cache", "recording")
    opened = []

    def prepare(doc):
        opened.append(doc.name)
        if doc.frozen is None:
            doc.frozen = lower.get(doc.tokens)
            doc.chunk_emb = doc.frozen.emb.numpy()

    docs = [Document(f"d{i}", _tokens(40, i)) for i in range(2)] * 2  # two epochs
    docs = [Document(d.name, d.tokens) for d in docs]
    cfg = TrainConfig(warmup_steps=1, lr=1e-2, accum_blocks=2, max_steps=14, eval_every=5, save_every=2)
    trainer = Trainer(model, cfg, docs, [Document("held", _tokens(40, 9))], tmp_path / name, prepare=prepare)
    if resume:
        assert trainer.resume()
    if stop_after:
        for _ in range(stop_after):
            trainer.train_step()
        trainer.save_checkpoint()
        return trainer, lower, opened
    trainer.run(progress=False)
    return trainer, lower, opened


def test_documents_cached_as_they_open_resume_and_carry_a_card(tmp_path):
    straight, lower, opened = _run(tmp_path, "a")
    # Every training document's lower stack is built once and read back in the second epoch.
    assert lower.built == 3 and lower.loaded == 1  # d0 again
    assert opened.count("d0") >= 2 and all(d.frozen is None for d in straight.docs[:2])  # dropped when read

    _run(tmp_path, "b", stop_after=3)  # stops mid-document
    resumed, _, _ = _run(tmp_path, "b", resume=True)
    for (name, a), (_, b) in zip(straight.params, resumed.params, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)

    straight.export(tmp_path / "a" / "adapter")
    meta = json.loads((tmp_path / "a" / "adapter" / "adapter.json").read_text())
    write_card(tmp_path / "a" / "adapter", meta, tmp_path / "a" / "metrics.jsonl", "memlong train run ...")
    card = (tmp_path / "a" / "adapter" / "CARD.md").read_text()
    evals = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if "eval_loss" in e]
    assert len(evals) >= 3 and f"{evals[-1]['eval_loss']:.4f}" in card
    assert "no memory (sliding), base" in card and f"{straight.tokens_trained:,}" in card
    assert (tmp_path / "a" / "adapter" / "metrics.jsonl").is_file()


def test_bf16_autocast_trains_close_to_float32(tmp_path):
    """The gpu recipe's bf16 path, exercised on the CPU (the device itself is not available here)."""
    toks = _tokens(60, 11)
    losses = {}
    for bf16 in (False, True):
        model = tiny_memlong(layout="paper", chunk=4, window=8, top_k=2)
        frozen = FrozenCache(model, RecordingRetriever().embed, TinyTokenizer(), None, "recording").get(toks)
        cfg = TrainConfig(warmup_steps=1, lr=1e-2, accum_blocks=2, bf16=bf16)
        trainer = Trainer(model, cfg, [Document("d", toks, frozen=frozen)], [], tmp_path / str(bf16))
        losses[bf16] = [trainer.train_step()["loss"] for _ in range(6)]  # reads memory from step 3
        trainer.save_checkpoint()
    for a, b in zip(losses[False], losses[True], strict=True):
        assert abs(a - b) < 0.05, (losses[False], losses[True])


def test_train_eval_parts_of_the_same_settings_are_assembled(tmp_path):
    """Settings hold tuples (MemLongConfig's layer lists); a part file holds them as lists."""
    from memlong.eval.common import write_json
    from memlong.training.evaluate import assemble

    key = {"plays": ["hamlet"], "lengths": [4096], "windows": 1, "score_tokens": 256, "memlong": {"x": ()}}
    for variant, method, ppl in (("trained", "memlong_trained", 20.0), ("control", "lora_no_memory", 18.0)):
        rec = {"book": "hamlet", "method": method, "context_tokens": 4096, "scored_tokens": 256, "ppl": ppl}
        part = {
            "variant": variant,
            "settings": key,
            "adapter": None,
            "machine": {},
            "finished": "",
            "records": [rec],
        }
        write_json(tmp_path / "train_eval_parts" / f"{variant}.json", part)
    pooled = {r["method"]: r["ppl"] for r in assemble(tmp_path, key)}
    assert pooled == {"lora_no_memory": pytest.approx(18.0), "memlong_trained": pytest.approx(20.0)}
