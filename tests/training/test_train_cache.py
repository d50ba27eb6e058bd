"""Stage-2 training in the served regime: the frozen lower stack read from a cache, distillation targets."""

from __future__ import annotations

import math

import pytest
import torch

from memlong.chunkloop import Reader
from memlong.train import Document, TrainConfig, Trainer
from memlong.training.cache import FrozenCache, build_frozen
from memlong.training.docpass import DocumentPass
from memlong.training.teacher import TeacherCache, TopK, full_teacher, per_layer_teacher, topk_kl
from tests.factories import RecordingRetriever, TinyTokenizer, tiny_memlong, tiny_memory

# The decoder's served reading settings (MemLongConfig defaults): what training must read like.
SERVED = {"chunk": 128, "window": 1024, "top_k": 8, "sink_tokens": 4}


def _tokens(n, seed=0):
    return torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _frozen(model, toks, tmp_path=None):
    return FrozenCache(model, RecordingRetriever().embed, TinyTokenizer(), tmp_path, "recording").get(toks)


def test_a_training_step_reads_exactly_what_the_decoder_scores():
    """Window 1024, 4 sinks, chunk 128, top-8: log-probs of the cached training pass equal Reader.score,
    and the forward of one training step (grads on) has the Reader's mean NLL as its loss."""
    model = tiny_memlong(layout="paper", **SERVED)
    toks = _tokens(2048 + 3 * 128, seed=1)  # the last chunks choose 8 of 10-11 stored chunks
    retriever = RecordingRetriever()
    reader = Reader(model, retriever, TinyTokenizer(), tiny_memory(model, retriever))
    want = reader.score(toks)[1:]
    assert reader.stats.blocks_with_memory >= 10

    frozen = _frozen(model, toks)
    for cached in (None, frozen):
        dp = DocumentPass(model, toks, frozen.emb.numpy(), 1, cached)
        got = []
        with torch.no_grad():
            for p, s in dp.blocks():
                hidden, targets = dp.forward(p, s)
                got.append(
                    torch.log_softmax(model.logits(hidden).float(), -1).gather(1, targets[:, None])[:, 0]
                )
        torch.testing.assert_close(torch.cat(got), want, atol=1e-5, rtol=0)

    n_blocks = -(-(len(toks) - 1) // 128)
    cfg = TrainConfig(accum_blocks=n_blocks, lr=1e-3, warmup_steps=1, eval_at_start=False)
    trainer = Trainer(model, cfg, [Document("doc", toks, frozen=frozen)], [], "/nonexistent")
    rec = trainer.train_step()  # one optimiser step over the whole document
    assert rec["tokens"] == len(toks) - 1
    assert rec["lm_loss"] == pytest.approx(-float(want.mean()), abs=1e-5)


def test_cached_lower_stack_trains_the_same_weights_as_running_it(tmp_path):
    toks = [_tokens(44, 3), _tokens(36, 4)]
    model = tiny_memlong(layout="paper", chunk=4, window=8, top_k=2)
    cached = [Document(f"d{i}", t, frozen=_frozen(model, t, tmp_path)) for i, t in enumerate(toks)]
    plain = [Document(d.name, d.tokens, chunk_emb=d.chunk_emb) for d in cached]
    cfg = TrainConfig(warmup_steps=1, lr=1e-2, accum_blocks=2)
    # Each model right before its trainer: both draw the same LoRA initialisation after the same seed.
    a = Trainer(
        tiny_memlong(layout="paper", chunk=4, window=8, top_k=2), cfg, cached, cached[:1], tmp_path / "a"
    )
    b = Trainer(
        tiny_memlong(layout="paper", chunk=4, window=8, top_k=2), cfg, plain, plain[:1], tmp_path / "b"
    )
    for _ in range(8):  # crosses into the second document
        ra, rb = a.train_step(), b.train_step()
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-5)
    for (name, pa), (_, pb) in zip(a.params, b.params, strict=True):
        torch.testing.assert_close(pa, pb, atol=1e-5, rtol=0, msg=name)
    assert a.evaluate()["eval_loss"] == pytest.approx(b.evaluate()["eval_loss"], abs=1e-5)


def test_frozen_cache_is_read_back_and_keyed_by_settings(tmp_path):
    model = tiny_memlong(layout="paper", chunk=4, window=8, top_k=2)
    toks = _tokens(30, 5)
    cache = FrozenCache(model, RecordingRetriever().embed, TinyTokenizer(), tmp_path, "recording")
    first = cache.get(toks)
    again = cache.get(toks)
    assert (cache.built, cache.loaded) == (1, 1)
    for name in ("tokens", "hidden", "kv", "emb"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
    assert first.hidden.shape == (30, 32) and first.kv.shape == (2, 2, 32, 8) and first.emb.shape == (7, 16)
    # A prefix of a document reads exactly as the document's start (everything is causal).
    short = build_frozen(model, toks[:13], RecordingRetriever().embed, TinyTokenizer())
    cut = first.truncated(13, 4)
    torch.testing.assert_close(cut.hidden, short.hidden, atol=1e-6, rtol=0)
    torch.testing.assert_close(cut.kv[:, :, :13], short.kv[:, :, :13], atol=1e-6, rtol=0)
    # Other lower-stack settings (here: sinks) never read this file.
    other = tiny_memlong(layout="paper", chunk=4, window=8, top_k=2, sink_tokens=0)
    assert FrozenCache(other, RecordingRetriever().embed, TinyTokenizer(), tmp_path, "recording").path(
        toks
    ) != cache.path(toks)


def test_topk_kl_is_the_kl_of_the_coarsened_distributions():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g)
    p, logq = torch.softmax(teacher, -1), torch.log_softmax(student, -1)
    full = (p * (p.log() - logq)).sum(1).mean()
    top = torch.log_softmax(teacher, -1).topk(11)
    assert float(topk_kl(student, TopK(top.indices, top.values))) == pytest.approx(float(full), abs=1e-5)
    top3 = torch.log_softmax(teacher, -1).topk(3)
    q = logq.exp()
    rest_p = 1 - p.gather(1, top3.indices).sum(1)
    rest_q = 1 - q.gather(1, top3.indices).sum(1)
    want = (p.gather(1, top3.indices) * (top3.values - logq.gather(1, top3.indices))).sum(1)
    want = (want + rest_p * (rest_p.log() - rest_q.log())).mean()
    got = topk_kl(student, TopK(top3.indices, top3.values))
    assert float(got) == pytest.approx(float(want), abs=1e-5) and float(got) > 0
    assert float(topk_kl(teacher, TopK(top3.indices, top3.values))) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kind", ["per_layer", "full"])
def test_teachers_give_the_reading_they_name(kind, tmp_path):
    model = tiny_memlong(layout="paper", chunk=4, window=8, top_k=2)
    toks = _tokens(40, 6)
    retriever = RecordingRetriever()
    if kind == "per_layer":
        got = per_layer_teacher(model, retriever, TinyTokenizer(), toks, k=97)
        with model.configured(layout="per_layer"):
            want = Reader(model, retriever, TinyTokenizer(), tiny_memory(model, retriever)).score(toks)[1:]
    else:
        got = full_teacher(model, toks, k=97, piece=16)
        with torch.no_grad():
            from memlong.eval.common import full_attention_logprobs

            want = full_attention_logprobs(model, toks, len(toks) - 1)
    assert model.config.layout == "paper"  # the teacher's reading did not change the student's settings
    at_target = (got.idx == torch.tensor(toks[1:])[:, None]).float()
    torch.testing.assert_close((got.logp * at_target).sum(1), want, atol=1e-5, rtol=0)
    cache = TeacherCache(model, retriever, TinyTokenizer(), kind, 5, tmp_path, base="tiny")
    first = cache.get(toks)
    assert first.idx.shape == (39, 5) and cache.path(toks).is_file()
    assert torch.equal(cache.get(toks).idx, first.idx)


def test_distillation_adds_the_kl_beside_the_lm_loss(tmp_path):
    model = tiny_memlong(layout="paper", chunk=4, window=8, top_k=2)
    toks = _tokens(48, 7)
    teacher = per_layer_teacher(model, RecordingRetriever(), TinyTokenizer(), toks, k=8)
    doc = Document("d", toks, frozen=_frozen(model, toks), teacher=teacher)
    cfg = TrainConfig(warmup_steps=1, lr=1e-2, kd_weight=0.5)
    trainer = Trainer(model, cfg, [doc], [doc], tmp_path)
    recs = [trainer.train_step() for _ in range(6)]
    # Before memory exists and before the first update, student and teacher read alike: KL 0.
    assert recs[0]["kd_kl"] == pytest.approx(0.0, abs=1e-6)
    assert all(rec["kd_kl"] > 1e-4 for rec in recs[3:])  # then the layouts and weights differ
    for rec in recs:
        assert math.isfinite(rec["kd_kl"])
        assert rec["loss"] == pytest.approx(rec["lm_loss"] + 0.5 * rec["kd_kl"], rel=1e-5)
    with pytest.raises(Exception, match="teacher"):
        Trainer(tiny_memlong(layout="paper"), cfg, [Document("d", toks, frozen=doc.frozen)], [], tmp_path)
