"""Tiny models and helpers shared by the tests (no real weights)."""

from __future__ import annotations

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from memlong.model import MemLongConfig, MemLongModel


def tiny_llama(n_heads: int = 4, n_kv_heads: int = 2, n_layers: int = 4, seed: int = 0) -> LlamaForCausalLM:
    """A random LLaMA small enough for exact CPU checks (hidden 32)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=512,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    return model


# The tiny model's reading: ingest reads memory and a prompt retrieves with its last chunk at top-k, so
# the chunk loop's retrieval runs at every boundary whatever the call; tests of the served defaults (an
# ingest that reads no memory, the prompt's last 32 tokens and best chunk) set them (`model.configured`).
TINY_READING = {"ingest_memory": True, "prompt_query_tokens": 0, "prompt_top_k": 0, "prompt_window": False}


def tiny_memlong(
    chunk: int = 4, window: int = 8, top_k: int = 2, sink_tokens: int = 2, layout: str = "per_layer", **kw
) -> MemLongModel:
    hf = tiny_llama(**{k: v for k, v in kw.items() if k in ("n_heads", "n_kv_heads", "n_layers", "seed")})
    reading = {**TINY_READING, **{k: v for k, v in kw.items() if k in TINY_READING}}
    cfg = MemLongConfig(
        layout=layout,
        mem_layer=1,
        ret_attn_layers=(1, 3),
        chunk=chunk,
        top_k=top_k,
        local_window=window,
        memory_size=chunk * 64,
        kv_dtype="float32",
        sink_tokens=sink_tokens,
        **reading,
    )
    return MemLongModel(hf, cfg)


class TinyTokenizer:
    """Token ids are their own text: decode joins them, so chunk texts are easy to check."""

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)


class RecordingRetriever:
    """Deterministic bag-of-tokens embeddings; records every text it embeds."""

    dim = 16

    def __init__(self) -> None:
        self.texts: list[str] = []

    def embed(self, texts: list[str]) -> np.ndarray:
        self.texts.extend(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for tok in text.split():
                out[row, int(tok) % self.dim] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-6)


def tiny_memory(model: MemLongModel, retriever, memory_chunks: int = 64):
    from memlong.memory import MemoryConfig, SessionMemory

    rec = int(np.prod(model.kv_record_shape)) * 4  # float32 records in tests
    return SessionMemory(
        MemoryConfig(dim=model.retrieval_dim(retriever.dim), record_bytes=rec, memory_size=memory_chunks)
    )


class SearchSpy:
    """A memory that records every search it answers: the query vectors and the top_k asked for."""

    def __init__(self, memory) -> None:
        self.memory, self.queries, self.searches = memory, [], []

    def append(self, *args):
        return self.memory.append(*args)

    def search(self, queries, top_k):
        self.queries.append(np.array(queries))
        self.searches.append(top_k)
        return self.memory.search(queries, top_k)
