"""Distillation targets: a teacher's next-token top-k on the training tokens, cached, and the KL to them.

Two teachers read long context well on the base weights, with no training:
- "per_layer": the chunk loop with per-layer memory (every layer stores and reads back its own K/V), read
  in one pass exactly as the decoder scores (true sinks, warm window, `prev_chunk` query, top-k chunks).
  It reads what the student can read (the same local window and the same retrieved chunks), so what it
  predicts is within the student's reach; it is the decoder's training-free layout.
- "full": plain causal attention over the whole document (keep documents within the native window).

A teacher is the model's base weights: compute targets before LoRA is attached (the CLI does).
`TopK.logp` holds the teacher's log-probs of its k most likely tokens, normalised over the whole
vocabulary; the rest of its mass is one more outcome in `topk_kl`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from memlong.errors import InvalidArgument
from memlong.model import MemLongModel
from memlong.training.cache import doc_path, save_tensors

TEACHERS = ("per_layer", "full")


@dataclass
class TopK:
    """Teacher targets of one document: row t is the distribution of token t+1 given tokens 0..t."""

    idx: torch.Tensor  # (N-1, k) int64 token ids, most likely first
    logp: torch.Tensor  # (N-1, k) float32 teacher log-probs of those tokens

    def __post_init__(self) -> None:
        if self.idx.shape != self.logp.shape or self.idx.dim() != 2:
            raise InvalidArgument("teacher", "idx and logp must be (N-1, k) each")


def topk_kl(logits: torch.Tensor, target: TopK) -> torch.Tensor:
    """Mean over rows of KL(teacher || student) on the teacher's top-k plus one outcome for the rest.

    logits (s, V) student; target rows (s, k). Exact KL of the two distributions coarsened to k+1
    outcomes (each top-k token, everything else), so it is >= 0 and 0 when the student matches."""
    logq = torch.log_softmax(logits.float(), dim=-1)
    q_top = logq.gather(1, target.idx)  # (s, k)
    p_top = target.logp.exp()
    p_rest = (1 - p_top.sum(1)).clamp(min=0)  # (s,)
    # log(1 - sum q_top), stable near 0 and 1
    q_rest = torch.log(-torch.expm1(torch.logsumexp(q_top, dim=1).clamp(max=-1e-7)))
    kl = (p_top * (target.logp - q_top)).sum(1) + torch.special.xlogy(p_rest, p_rest) - p_rest * q_rest
    return kl.mean()


class _TopKRecorder:
    """Hooks the LM head and keeps the top-k log-probs of every row it produces, in call order."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.idx: list[torch.Tensor] = []
        self.logp: list[torch.Tensor] = []

    def __call__(self, _module, _inputs, logits: torch.Tensor) -> None:
        top = torch.log_softmax(logits.float(), dim=-1).reshape(-1, logits.shape[-1]).topk(self.k, dim=-1)
        self.logp.append(top.values)
        self.idx.append(top.indices)

    def result(self, n: int) -> TopK:
        return TopK(torch.cat(self.idx)[:n].cpu(), torch.cat(self.logp)[:n].cpu())


@torch.no_grad()
def per_layer_teacher(model: MemLongModel, retriever, tokenizer, tokens: Sequence[int], k: int) -> TopK:
    """Top-k of the base model reading `tokens` with per-layer memory, as `Reader.score` does (the chunk
    loop runs on the CPU)."""
    from memlong.chunkloop import Reader
    from memlong.dtypes import record_bytes
    from memlong.memory import MemoryConfig, SessionMemory

    recorder = _TopKRecorder(k)
    with model.configured(layout="per_layer", mem_layers=()) as cfg:
        memory = SessionMemory(
            MemoryConfig(
                dim=model.retrieval_dim(retriever.dim),
                record_bytes=record_bytes(model.kv_record_shape, cfg.kv_dtype, cfg.kv_codec),
                memory_size=cfg.memory_chunks,
            )
        )
        hook = model.hf.lm_head.register_forward_hook(recorder)
        try:
            Reader(model, retriever, tokenizer, memory).score(list(tokens))
        finally:
            hook.remove()
    return recorder.result(len(tokens) - 1)


@torch.no_grad()
def full_teacher(model: MemLongModel, tokens: Sequence[int], k: int, piece: int = 512) -> TopK:
    """Top-k of the base model under plain causal attention over all of `tokens`."""
    from memlong.eval.common import stock_attention

    ids = torch.tensor([list(tokens)], device=model.base.embed_tokens.weight.device)
    with stock_attention(model):
        hidden = model.base(ids).last_hidden_state[0, :-1]  # (N-1, hidden)
    recorder = _TopKRecorder(k)
    for i in range(0, hidden.shape[0], piece):  # (N, V) logits at once would be GBs for long documents
        recorder(None, None, model.logits(hidden[i : i + piece]))
    return recorder.result(hidden.shape[0])


class TeacherCache:
    """Teacher targets of documents, one safetensors file each under `directory` (None: not stored)."""

    def __init__(
        self, model: MemLongModel, retriever, tokenizer, kind: str, k: int, directory: Path | None, base: str
    ) -> None:
        if kind not in TEACHERS:
            raise InvalidArgument("teacher", f"must be one of {TEACHERS}, got {kind!r}")
        self.model, self.retriever, self.tokenizer = model, retriever, tokenizer
        self.kind, self.k = kind, k
        self.directory = None if directory is None else Path(directory)
        cfg = model.config
        self.settings = {
            "teacher": kind,
            "k": k,
            "base": base,  # the base weights' fingerprint
            **(
                {"chunk": cfg.chunk, "local_window": cfg.local_window, "sink_tokens": cfg.sink_tokens}
                | {"top_k": cfg.top_k, "kv_dtype": cfg.kv_dtype, "retrieval": cfg.retrieval}
                if kind == "per_layer"
                else {}
            ),
        }

    def path(self, tokens: Sequence[int]) -> Path | None:
        return doc_path(self.directory, self.settings, tokens, "teacher")

    def get(self, tokens: Sequence[int]) -> TopK:
        path = self.path(tokens)
        if path is not None and path.is_file():
            t = load_file(str(path))
            return TopK(t["idx"].long(), t["logp"])
        if self.kind == "per_layer":
            out = per_layer_teacher(self.model, self.retriever, self.tokenizer, tokens, self.k)
        else:
            out = full_teacher(self.model, tokens, self.k)
        if path is not None:
            save_tensors(path, {"idx": out.idx.to(torch.int32), "logp": out.logp}, self.settings)
        return out
