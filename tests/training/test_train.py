"""Stage-2 training on a tiny model: inference semantics, what trains, checkpoints, learning."""

from __future__ import annotations

import pytest
import torch

from memlong.chunkloop import Reader
from memlong.errors import InvalidArgument
from memlong.train import Document, TrainConfig, Trainer, embed_documents, load_adapter
from memlong.training.adapter import AdapterSpec
from memlong.training.docpass import DocumentPass, chunk_texts
from tests.factories import RecordingRetriever, TinyTokenizer, tiny_memlong, tiny_memory


def _tokens(n, seed=0):
    return torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _docs(model, *token_lists):
    docs = [Document(f"doc{i}", t) for i, t in enumerate(token_lists)]
    embed_documents(docs, RecordingRetriever().embed, TinyTokenizer(), model.config.chunk, cache=None)
    return docs


def _trainer(model, tmp_path, docs, eval_docs=None, **kw):
    cfg = TrainConfig(**{"block_chunks": 1, "warmup_steps": 1, "eval_every": 1000, "save_every": 1000, **kw})
    return Trainer(model, cfg, docs, eval_docs if eval_docs is not None else docs[:1], tmp_path)


@pytest.mark.parametrize("block_chunks,sinks", [(1, 2), (1, 0), (3, 0)])
def test_training_pass_reads_exactly_like_the_inference_reader(block_chunks, sinks):
    model = tiny_memlong(layout="paper", chunk=4, window=8, top_k=2, sink_tokens=sinks)
    toks = _tokens(70, seed=1)
    retriever = RecordingRetriever()
    want = Reader(model, retriever, TinyTokenizer(), tiny_memory(model, retriever)).score(toks)[1:]
    emb = retriever.embed(chunk_texts(TinyTokenizer(), toks, 4))
    dp = DocumentPass(model, toks, emb, block_chunks)
    got, used_memory = [], False
    with torch.no_grad():
        for p, s in dp.blocks():
            used_memory |= dp.memory(p, s) is not None
            hidden, targets = dp.forward(p, s)
            logp = torch.log_softmax(model.logits(hidden).float(), -1)
            got.append(logp.gather(1, targets[:, None])[:, 0])
    assert used_memory
    torch.testing.assert_close(torch.cat(got), want, atol=1e-5, rtol=0)


def test_memory_free_pass_equals_sliding_reader():
    model = tiny_memlong(layout="paper", chunk=4, window=8)
    toks = _tokens(50, seed=2)
    want = Reader(model, RecordingRetriever(), TinyTokenizer(), None).score(toks)[1:]
    with pytest.raises(InvalidArgument, match="sinks"):
        DocumentPass(model, toks, None, 3)
    dp = DocumentPass(model, toks, None, 1)
    with torch.no_grad():
        got = [
            torch.log_softmax(model.logits(h), -1).gather(1, t[:, None])[:, 0]
            for h, t in (dp.forward(p, s) for p, s in dp.blocks())
        ]
    torch.testing.assert_close(torch.cat(got), want, atol=1e-5, rtol=0)


def test_one_step_trains_only_the_adapter(tmp_path):
    model = tiny_memlong(layout="paper", chunk=4, window=8, top_k=2)
    trainer = _trainer(model, tmp_path, _docs(model, _tokens(64)))
    intended = {n for n, _ in trainer.params}
    by_id = {id(p): n for n, p in trainer.params}
    before = {n: p.detach().clone() for n, p in model.hf.named_parameters()}
    for _ in range(4):  # past the first window, so memory is in use
        trainer.train_step()
    for name, p in model.hf.named_parameters():
        lower = any(name.startswith(f"model.layers.{i}.") for i in range(model.config.mem_layer))
        stored_kv = any(
            name.startswith(f"model.layers.{model.config.mem_layer}.{m}")
            for m in ("self_attn.k_proj", "self_attn.v_proj", "input_layernorm")
        )
        if lower or stored_kv or id(p) not in by_id:
            assert p.grad is None, name
            assert torch.equal(p, before[name]), f"{name} changed"
    changed = {n for n, p in model.hf.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= {n for n, _ in model.hf.named_parameters() if id(_) in by_id}
    assert {by_id[id(p)] for n, p in model.hf.named_parameters() if n in changed} <= intended
    # The memory layer (a retrieval layer) trains its q/o only; the layers above train q, k, v, o.
    assert "model.layers.1.self_attn.q_proj.lora_B" in intended
    assert "model.layers.1.self_attn.k_proj.lora_B" not in intended
    assert "model.layers.2.self_attn.k_proj.lora_B" in intended and "model.norm.weight" in intended


def test_checkpoint_resume_and_reload_give_identical_weights(tmp_path):
    docs_a = _docs(tiny_memlong(layout="paper"), _tokens(40, 3), _tokens(36, 4))
    straight = _trainer(tiny_memlong(layout="paper", chunk=4, window=8, top_k=2), tmp_path / "a", docs_a)
    for _ in range(7):
        straight.train_step()

    first = _trainer(tiny_memlong(layout="paper", chunk=4, window=8, top_k=2), tmp_path / "b", docs_a)
    for _ in range(3):  # stops mid-document: the stream and memory must be checkpointed too
        first.train_step()
    first.save_checkpoint()
    resumed = _trainer(tiny_memlong(layout="paper", chunk=4, window=8, top_k=2), tmp_path / "b", docs_a)
    assert resumed.resume() and resumed.step == 3
    for _ in range(4):
        resumed.train_step()
    for (name, a), (_, b) in zip(straight.params, resumed.params, strict=True):
        assert torch.equal(a, b), name

    # The exported adapter, folded into a fresh model, computes what the LoRA-wrapped model computes.
    straight.export(tmp_path / "adapter")
    fresh = tiny_memlong(layout="paper", chunk=4, window=8, top_k=2)
    meta = load_adapter(fresh, tmp_path / "adapter")
    assert meta["method"] == "memlong_trained" and meta["training"]["steps"] == 7
    ids = torch.tensor([_tokens(20, 9)])
    straight.model.eval()
    with torch.no_grad():
        want = straight.model.logits(straight.model.forward_block(ids, straight.model.new_stream()).hidden)
        got = fresh.logits(fresh.forward_block(ids, fresh.new_stream()).hidden)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_loss_decreases_on_repeated_text(tmp_path):
    model = tiny_memlong(layout="paper", chunk=4, window=8, top_k=2)
    pattern = _tokens(12, 5)
    docs = _docs(model, pattern * 20, pattern * 20)
    # 100 steps: the LoRA initialisation is seeded (TrainConfig.seed); 50 steps gained 0.14-0.25 over
    # seeds 0-3, 100 steps 0.32 at seed 0.
    trainer = _trainer(model, tmp_path, docs, lr=5e-2, max_steps=100, eval_tokens=96)
    before = trainer.evaluate()["eval_loss"]
    after = trainer.run(progress=False)["eval_loss"]
    assert after < before - 0.25, (before, after)  # frozen tiny random embeddings: slow but steady
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) >= 100 and (tmp_path / "LATEST").is_file()


def test_load_adapter_refuses_other_settings_and_other_base(tmp_path):
    model = tiny_memlong(layout="paper", chunk=4, window=8, top_k=2)
    trainer = _trainer(model, tmp_path, _docs(model, _tokens(40)))
    trainer.train_step()
    trainer.export(tmp_path / "adapter")
    with pytest.raises(InvalidArgument, match="base model"):
        load_adapter(tiny_memlong(layout="paper", seed=1), tmp_path / "adapter")
    other = tiny_memlong(layout="paper")
    object.__setattr__(other.config, "ret_attn_layers", (1, 2))
    with pytest.raises(InvalidArgument, match="ret_attn_layers"):
        load_adapter(other, tmp_path / "adapter")


def test_adapter_spec_freezes_the_memory_layer_kv_path():
    model = tiny_memlong(layout="paper")
    spec = AdapterSpec.for_model(model, mem_layer_qo=False)
    assert all(int(t.split(".")[2]) > model.config.mem_layer for t in spec.lora_targets)


def test_default_adapter_loads_when_present_and_matching(tmp_path, monkeypatch):
    import memlong.train as train

    model = tiny_memlong(layout="paper", chunk=4, window=8, top_k=2)
    trainer = _trainer(model, tmp_path, _docs(model, _tokens(40)))
    trainer.train_step()
    trainer.export(tmp_path / "adapter")
    monkeypatch.setattr(train, "DEFAULT_ADAPTER", tmp_path / "adapter")
    assert train.maybe_load_default_adapter(tiny_memlong(layout="paper"), enabled=False) is None
    assert train.maybe_load_default_adapter(tiny_memlong(layout="paper"))["method"] == "memlong_trained"
    assert (
        train.maybe_load_default_adapter(tiny_memlong(layout="paper", seed=1)) is None
    )  # another base: skipped
    # Missing from the installation: an error, not base weights in silence.
    monkeypatch.setattr(train, "DEFAULT_ADAPTER", tmp_path / "missing")
    with pytest.raises(InvalidArgument, match="shipped default adapter is missing"):
        train.maybe_load_default_adapter(tiny_memlong(layout="paper"))


def test_shipped_adapters_resolve_by_name_from_the_package(tmp_path):
    from memlong.packages import ADAPTERS_DIR, SHIPPED
    from memlong.train import DEFAULT_ADAPTER, resolve_adapter

    assert ADAPTERS_DIR.parent == SHIPPED and DEFAULT_ADAPTER.parent == ADAPTERS_DIR  # inside memlong/
    for name in ("smollm2-135m-memlong", "smollm2-135m-lora-no-memory"):
        path = resolve_adapter(name)
        assert path == ADAPTERS_DIR / name and (path / "adapter.safetensors").is_file()
    assert resolve_adapter(tmp_path) == tmp_path  # a directory is taken as is
    with pytest.raises(InvalidArgument, match="shipped adapters: .*smollm2-135m-memlong"):
        resolve_adapter("no-such-adapter")
    with pytest.raises(InvalidArgument, match="no adapter directory"):
        resolve_adapter(tmp_path / "smollm2-135m-memlong")  # a path is never swapped for a shipped one
