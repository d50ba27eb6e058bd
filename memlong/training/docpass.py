"""One document read for training with exactly the chunk loop's semantics (memlong.chunkloop.Reader).

The Reader scores with memory one chunk per block; training reads `block_chunks` chunks per block for
bigger matrix products, and gives every query chunk its own retrieval through a (1, S, M) memory mask:
- chunk k (tokens [k*c, (k+1)*c)) is in memory for the query chunk starting at token p iff
  (k+1)*c <= p - local_window: it has left the local window, as the Reader stores it;
- the retrieval query for the chunk at p is the retriever embedding of the text tokens[p-c:p] (the
  Reader's `prev_chunk` history), which is also the stored embedding of chunk p/c-1: one embedding per
  chunk serves both roles;
- top-k by inner product over the stored chunks, ties to the older chunk, chronological order (the
  memory bank's exact search); memory K/V are stored in `kv_dtype` and read back as float32;
- memory is empty at the start of every document, never evicted within one (documents must fit in
  `memory_size`), and detached: memory-layer K/V come from frozen layers and carry no gradient.
Block sizes up to local_window + chunk keep this exact: every chunk a query in the block may retrieve
left the window before the block began. Blocks of more than one chunk need `sink_tokens=0` (sinks sit at
fixed positions, so a query deeper into a longer block would see them further away than the Reader does). With memory at position 0 (`mem_position="zero"`) the
query-memory distance is the query's local position; `memory()` shifts each query chunk's memory keys so
that distance equals the Reader's (tests/training/test_train.py checks log-probs against the Reader).
Local caches are detached after every block (truncated backpropagation through the window).

With `frozen` (memlong.training.cache) the frozen lower stack is not run: each block starts at the memory
layer from the cached states entering it, and memory K/V are the cached ones, the values a pass of the
lower layers would produce (tests/training/test_train_cache.py checks log-probs against the Reader).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from memlong.dtypes import torch_dtype
from memlong.errors import InvalidArgument
from memlong.model import LayerCache, MemLongModel, Memory

if TYPE_CHECKING:
    from memlong.training.cache import FrozenDoc


def chunk_texts(tokenizer, tokens: list[int], chunk: int) -> list[str]:
    """Texts of the whole chunks of a document, decoded as the Reader decodes them."""
    return [tokenizer.decode(tokens[i : i + chunk]) for i in range(0, len(tokens) - chunk + 1, chunk)]


class DocumentPass:
    """Reads one document block by block; call `blocks()` and `forward(p, s)` in order."""

    def __init__(
        self,
        model: MemLongModel,
        tokens: list[int],
        chunk_emb: np.ndarray | None,
        block_chunks: int,
        frozen: FrozenDoc | None = None,
    ) -> None:
        cfg = model.config
        c, w = cfg.chunk, cfg.local_window
        self.model, self.cfg = model, cfg
        self.block = block_chunks * c
        if block_chunks < 1 or self.block > w + c:
            raise InvalidArgument("block_chunks", f"a block must be 1..{(w + c) // c} chunks")
        if block_chunks > 1 and cfg.sink_tokens:
            # Sinks sit at fixed positions before the window: a query j chunks into a longer block would
            # see them j*chunk further away than the Reader's (chunk-sized blocks) does.
            raise InvalidArgument("block_chunks", "attention sinks need one chunk per block")
        if chunk_emb is not None:
            if cfg.mem_position != "zero" and block_chunks > 1:
                raise InvalidArgument("block_chunks", "mem_position='prefix' needs one chunk per block")
            if len(tokens) // c > cfg.memory_chunks:
                raise InvalidArgument("memory_size", "a training document must fit in memory (no eviction)")
            if chunk_emb.shape[0] != len(tokens) // c:
                raise InvalidArgument("chunk_emb", "one embedding per whole chunk of the document")
        self.device = model.base.embed_tokens.weight.device
        self.tokens = torch.tensor(tokens, dtype=torch.long, device=self.device)  # (N,)
        self.emb = None if chunk_emb is None else torch.from_numpy(np.asarray(chunk_emb, dtype=np.float32))
        self.stream = model.new_stream()
        self.position = 0
        self.frozen = frozen
        if frozen is not None and not torch.equal(frozen.tokens[: len(tokens)].cpu(), self.tokens.cpu()):
            raise InvalidArgument("frozen", "the cached lower stack belongs to other tokens")
        n_pad = -(-len(tokens) // c) * c
        self.kv = (
            None
            if chunk_emb is None
            else torch.zeros(
                2,
                model.n_kv_heads,
                n_pad,
                model.head_dim,
                dtype=torch_dtype(cfg.kv_dtype),
                device=self.device,
            )
        )  # (2, Hkv, N, D): memory-layer K (before RoPE) and V of every token read
        if self.kv is not None and frozen is not None:
            self.kv.copy_(frozen.kv[:, :, :n_pad])  # only chunks that left the window are ever read

    @property
    def n_inputs(self) -> int:
        """Tokens read as inputs: all but the last, which is only ever a target."""
        return len(self.tokens) - 1

    def blocks(self) -> Iterator[tuple[int, int]]:
        """(start, length) of the remaining blocks, from the current position."""
        for p in range(self.position, self.n_inputs, self.block):
            yield p, min(self.block, self.n_inputs - p)

    def retrieved(self, p: int) -> list[int]:
        """Chunk ids retrieved for the query chunk starting at token p (chronological)."""
        cfg = self.cfg
        n_stored = max(0, (p - cfg.local_window) // cfg.chunk)
        if self.emb is None or n_stored == 0:
            return []
        with torch.autocast("cpu", enabled=False):  # float32 as memory searches, under a bf16 forward too
            scores = (self.emb[:n_stored] @ self.emb[p // cfg.chunk - 1]).numpy()  # (n_stored,)
        order = np.lexsort((np.arange(n_stored), -scores))  # best first, older first on ties
        return sorted(order[: cfg.top_k].tolist())

    def memory(self, p: int, s: int) -> Memory | None:
        """Memory for the block [p, p+s): each query chunk's own retrieval, masked to that chunk.

        Memory keys are unrotated (position 0), so a query's distance to memory is its position in the
        block's frame (model.py), which grows with the chunks of the block before it. The Reader reads one
        chunk per block; to give sub-chunk j exactly the Reader's distance, its memory keys are rotated to
        position j*chunk, the amount by which sub-chunk j sits further right than in the Reader's frame.
        """
        if self.kv is None:
            return None
        c = self.cfg.chunk
        hkv, d = self.kv.shape[1], self.kv.shape[3]
        chunks = self.kv.view(2, hkv, -1, c, d)
        keys, values, spans = [], [], []
        for j, q in enumerate(range(p, p + s, c)):
            row = self.retrieved(q)
            if not row:
                continue
            kv = chunks[:, :, row].reshape(2, hkv, len(row) * c, d).float()  # (2, Hkv, m, D)
            k = kv[0][None]  # (1, Hkv, m, D)
            off = j * c
            if off:
                pos = torch.full((1, k.shape[2]), off, dtype=torch.long, device=self.device)
                cos, sin = self.model.base.rotary_emb(k, pos)
                _, k = apply_rotary_pos_emb(k, k, cos, sin)
            keys.append(k)
            values.append(kv[1][None])
            spans.append((j * c, min(s, (j + 1) * c), k.shape[2]))
        if not keys:
            return None
        mask = torch.zeros(s, sum(m for _, _, m in spans), dtype=torch.bool, device=self.device)  # (S, M)
        col = 0
        for lo, hi, m in spans:
            mask[lo:hi, col : col + m] = True
            col += m
        # (1, L_mem=1, Hkv, M, D): the paper layout stores one layer
        return Memory(k=torch.cat(keys, dim=2)[:, None], v=torch.cat(values, dim=2)[:, None], mask=mask[None])

    def forward(self, p: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden (s, hidden), targets (s,)) for the block [p, p+s); advances the stream."""
        if p != self.position:
            raise RuntimeError(f"blocks must be read in order: at {self.position}, asked for {p}")
        memory = self.memory(p, s)
        ids = self.tokens[p : p + s][None]
        if self.frozen is None:
            out = self.model.forward_block(ids, self.stream, memory)
        else:  # start at the memory layer from the cached states entering it
            hidden = self.frozen.hidden[p : p + s][None].to(self.device)
            out = self.model.forward_block(
                ids, self.stream, memory, first_layer=self.cfg.mem_layer, hidden=hidden
            )
        if self.kv is not None:
            self.kv[0, :, p : p + s] = out.mem_k[0, 0].detach().to(self.kv.dtype)
            self.kv[1, :, p : p + s] = out.mem_v[0, 0].detach().to(self.kv.dtype)
        for cache in self.stream.caches:  # the next block sees these values, not their history
            if cache.k is None:  # a layer below the cached stack's output never runs
                continue
            cache.k, cache.v = cache.k.detach(), cache.v.detach()
            if cache.sink_k is not None:
                cache.sink_k, cache.sink_v = cache.sink_k.detach(), cache.sink_v.detach()
        self.position = p + s
        return out.hidden[0], self.tokens[p + 1 : p + s + 1]

    # -- checkpointing mid-document ---------------------------------------------------------------------

    def state(self) -> dict[str, torch.Tensor]:
        out = {"position": torch.tensor(self.position)}
        for i, cache in enumerate(self.stream.caches):
            out[f"cache.{i}.seen"] = torch.tensor(cache.seen)
            for name in ("k", "v", "sink_k", "sink_v"):
                t = getattr(cache, name)
                if t is not None:
                    out[f"cache.{i}.{name}"] = t.contiguous().cpu()
        if self.kv is not None:
            out["kv"] = self.kv[:, :, : self.position].contiguous().cpu()
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.position = int(state["position"])
        self.stream.tokens_seen = self.position
        for i in range(len(self.stream.caches)):
            parts = {n: state.get(f"cache.{i}.{n}") for n in ("k", "v", "sink_k", "sink_v")}
            parts = {n: None if t is None else t.to(self.device) for n, t in parts.items()}
            self.stream.caches[i] = LayerCache(**parts, seen=int(state.get(f"cache.{i}.seen", 0)))
        if self.kv is not None:
            self.kv[:, :, : self.position] = state["kv"]
