"""A trained adapter reaches the served model: `memlong decoder serve --adapter DIR` (and `up`, `demo`,
`ray up`, `eval`) fold it into the weights, and refuse one trained for other MemLong settings."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import memlong.loading as common
from memlong.errors import InvalidArgument
from memlong.services.decoder.config import DecoderConfig
from memlong.services.decoder.server import DecoderServer
from memlong.train import Document, TrainConfig, Trainer, embed_documents, load_adapter
from memlong.weights import LoadedDecoder
from tests.factories import RecordingRetriever, TinyTokenizer, tiny_memlong


@pytest.fixture
def adapter_dir(tmp_path):
    model = tiny_memlong(layout="paper", chunk=4, window=8, top_k=2)
    toks = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    docs = [Document("doc", toks)]
    embed_documents(docs, RecordingRetriever().embed, TinyTokenizer(), 4, cache=None)
    cfg = TrainConfig(block_chunks=1, warmup_steps=1, eval_every=1000, save_every=1000, lr=1e-2)
    trainer = Trainer(model, cfg, docs, docs, tmp_path / "run")
    trainer.train_step()
    trainer.export(tmp_path / "adapter")
    return tmp_path / "adapter"


@pytest.fixture
def tiny_stack(monkeypatch):
    """load_model builds the tiny base model instead of the packaged one."""
    monkeypatch.setattr(
        common,
        "load_decoder",
        lambda path=None: LoadedDecoder(tiny_memlong(layout="paper").hf, TinyTokenizer(), "tiny"),
    )
    monkeypatch.setattr(common, "Retriever", RecordingRetriever)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.hf.state_dict().items()}


def test_the_decoder_serves_the_adapter_it_is_given(adapter_dir, tiny_stack):
    config = DecoderConfig(retmem={"shard0": "127.0.0.1:1"}, memlong=tiny_memlong(layout="paper").config)
    base = DecoderServer.load(config)
    served = DecoderServer.load(dataclasses.replace(config, adapter=str(adapter_dir)))
    want = tiny_memlong(layout="paper")
    load_adapter(want, adapter_dir)
    got, expected, plain = _weights(served.engine.model), _weights(want), _weights(base.engine.model)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert any(not torch.equal(got[k], plain[k]) for k in plain)  # the adapter changed the served weights
    assert "adapter" in served.engine.source
    served.engine.close()
    base.engine.close()


def test_an_adapter_for_other_retrieval_layers_is_refused(adapter_dir, tiny_stack):
    other = dataclasses.replace(tiny_memlong(layout="paper").config, ret_attn_layers=(1, 2))
    config = DecoderConfig(retmem={"shard0": "127.0.0.1:1"}, memlong=other, adapter=str(adapter_dir))
    with pytest.raises(InvalidArgument, match="ret_attn_layers"):
        DecoderServer.load(config)
