"""The frozen lower stack of stage-2 training, computed once per document and kept on disk.

Layers 0..mem_layer-1 never train, nor does what the memory layer stores (its input norm, k_proj and
v_proj): for a given document their output is fixed. Training reads it from here instead of running
those layers on every step, epoch and run:

- `hidden` (N, hidden) float32: the states entering the memory layer. Training starts there, not one layer
  higher: the memory layer is a retrieval layer whose q/o train by default, so its output is not frozen.
- `kv` (2, Hkv, N_pad, D) in the stored `kv_dtype`: the memory layer's K (before RoPE) and V of every
  token, padded to whole chunks. They are both the memory records (read back as the Reader reads them)
  and the memory layer's own local window.
- `emb` (n_chunks, dim) float32: the retrieval vector of every whole chunk (the retriever's embedding of
  its text, which is also the `prev_chunk` query of the chunk after it).

Everything is computed as `Reader.ingest` computes it in the paper layout: chunk-sized blocks through
layers 0..mem_layer-1 with true sinks and a warm window (those layers never see memory, so a lower-only
pass equals a full one there). A file is keyed by the tokens, the base weights and every setting the
lower stack depends on; a stale file is never read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from memlong.atomic import write_atomic
from memlong.dtypes import torch_dtype
from memlong.errors import InvalidArgument
from memlong.model import MemLongModel
from memlong.training.adapter import base_identity
from memlong.training.docpass import chunk_texts

Embed = Callable[[list[str]], np.ndarray]
FORMAT = 1


@dataclass
class FrozenDoc:
    """What the frozen lower stack produces for one document (see the module docstring for shapes)."""

    tokens: torch.Tensor  # (N,) int64
    hidden: torch.Tensor  # (N, hidden) float32, entering mem_layer
    kv: torch.Tensor  # (2, Hkv, N_pad, D) kv_dtype
    emb: torch.Tensor  # (n_chunks, dim) float32

    def truncated(self, n: int, chunk: int) -> FrozenDoc:
        """The first n tokens (a prefix reads exactly as the document's start: everything is causal)."""
        pad = -(-n // chunk) * chunk
        return FrozenDoc(self.tokens[:n], self.hidden[:n], self.kv[:, :, :pad], self.emb[: n // chunk])


def lower_settings(model: MemLongModel) -> dict:
    """Every setting the lower stack's output depends on (and the base weights it ran on)."""
    cfg = model.config
    return {
        "format": FORMAT,
        "mem_layer": cfg.mem_layer,
        "chunk": cfg.chunk,
        "local_window": cfg.local_window,
        "sink_tokens": cfg.sink_tokens,
        "kv_dtype": cfg.kv_dtype,
        "base": base_identity(model)["fingerprint"],
    }


@torch.no_grad()
def build_frozen(model: MemLongModel, tokens: Sequence[int], embed: Embed, tokenizer) -> FrozenDoc:
    """Run the frozen lower stack over a document (paper layout), as the Reader's ingest does."""
    cfg = model.config
    if cfg.layout != "paper":
        raise InvalidArgument("layout", "the frozen lower stack exists in the paper layout only")
    c, n = cfg.chunk, len(tokens)
    device = model.base.embed_tokens.weight.device
    ids = torch.tensor(list(tokens), dtype=torch.long)
    stream = model.new_stream()
    hidden = torch.zeros(n, model.hf.config.hidden_size)
    kv = torch.zeros(2, model.n_kv_heads, -(-n // c) * c, model.head_dim, dtype=torch_dtype(cfg.kv_dtype))
    seen: list[torch.Tensor] = []
    # lower_only stops before the memory layer's attention; its input norm sees the state entering it.
    hook = model.base.layers[cfg.mem_layer].input_layernorm.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0])
    )
    try:
        for p in range(0, n, c):  # chunk-sized blocks: positions as the Reader's (model.py)
            out = model.forward_block(ids[p : p + c][None].to(device), stream, lower_only=True)
            s = out.mem_k.shape[3]
            hidden[p : p + s] = seen.pop()[0].float().cpu()
            kv[0, :, p : p + s] = out.mem_k[0, 0].to(kv.dtype).cpu()
            kv[1, :, p : p + s] = out.mem_v[0, 0].to(kv.dtype).cpu()
    finally:
        hook.remove()
    texts = chunk_texts(tokenizer, tokens, c)
    emb = np.concatenate([embed(texts[i : i + 64]) for i in range(0, len(texts), 64)] or [np.zeros((0, 1))])
    return FrozenDoc(ids, hidden, kv, torch.from_numpy(np.asarray(emb, dtype=np.float32)))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write `tensors` (made contiguous) as one safetensors file, atomically, `meta` as its JSON metadata."""
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta)}))


def doc_path(directory: Path | None, settings: dict, tokens: Sequence[int], kind: str) -> Path | None:
    """The file of a document's cached `kind` under `directory` (None: not stored), keyed by its tokens
    and every setting it depends on."""
    if directory is None:
        return None
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    h.update(np.asarray(tokens, dtype=np.int64).tobytes())
    return directory / f"{h.hexdigest()[:24]}.{kind}.safetensors"


def save_frozen(path: Path, doc: FrozenDoc, meta: dict) -> None:
    save_tensors(path, {"tokens": doc.tokens, "hidden": doc.hidden, "kv": doc.kv, "emb": doc.emb}, meta)


def load_frozen(path: Path) -> FrozenDoc:
    t = load_file(str(path))
    return FrozenDoc(tokens=t["tokens"], hidden=t["hidden"], kv=t["kv"], emb=t["emb"])


class FrozenCache:
    """Frozen lower-stack outputs of documents, one safetensors file each under `directory` (None: kept
    in memory only), keyed by tokens, base weights and lower-stack settings."""

    def __init__(
        self, model: MemLongModel, embed: Embed, tokenizer, directory: Path | None, retriever: str
    ) -> None:
        self.model, self.embed, self.tokenizer = model, embed, tokenizer
        self.directory = None if directory is None else Path(directory)
        self.settings = {**lower_settings(model), "retriever": retriever}  # hashes the weights: once
        self.built = self.loaded = 0

    def path(self, tokens: Sequence[int]) -> Path | None:
        return doc_path(self.directory, self.settings, tokens, "lower")

    def get(self, tokens: Sequence[int]) -> FrozenDoc:
        """The document's frozen output: read from disk when there, else computed (and stored)."""
        path = self.path(tokens)
        if path is not None and path.is_file():
            doc = load_frozen(path)
            if torch.equal(doc.tokens, torch.tensor(list(tokens), dtype=torch.long)):
                self.loaded += 1
                return doc
        doc = build_frozen(self.model, tokens, self.embed, self.tokenizer)
        self.built += 1
        if path is not None:
            save_frozen(path, doc, {**self.settings, "tokens": len(tokens)})
        return doc
