"""Load what reading needs: the decoder wrapped for MemLong, its tokenizer and the retriever.

    loaded = load_model(MemLongConfig(), model_path=None, adapter="default")

The one loader of the evaluations, training and the decoder service.
"""

from __future__ import annotations

from dataclasses import dataclass

from memlong.model import MemLongConfig, MemLongModel
from memlong.retriever import Retriever
from memlong.weights import load_decoder


@dataclass
class LoadedModel:
    """Model, tokenizer and retriever, loaded once; `source` names the weights."""

    model: MemLongModel
    tokenizer: object
    retriever: Retriever
    source: str
    adapter: dict | None = None  # metadata of the MemLong adapter folded into the weights, if any


def load_model(
    config: MemLongConfig, model_path: str | None = None, adapter: str | None = None
) -> LoadedModel:
    """model_path: an HF LLaMA-family checkpoint dir (None: the packaged SmolLM2). adapter: None (base
    weights), "default" (the shipped adapter when present and trained for these settings, see
    memlong.train.maybe_load_default_adapter), a shipped adapter's name or an adapter directory."""
    dec = load_decoder(model_path)
    model = MemLongModel(dec.model, config)
    meta = None
    if adapter is not None:
        from memlong.train import load_adapter, maybe_load_default_adapter

        meta = maybe_load_default_adapter(model) if adapter == "default" else load_adapter(model, adapter)
    return LoadedModel(model, dec.tokenizer, Retriever(), dec.source, meta)
