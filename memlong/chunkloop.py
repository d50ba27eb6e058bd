"""The chunk loop: read a text through MemLong (ingest, score, generate).

A `Reader` owns one text stream's local state (per-layer sliding caches, the tokens not yet in memory)
and talks to a memory through `MemoryPort`: the in-process `SessionMemory` or a ret-mem client.

- Tokens leave the local window in whole chunks; each such chunk's K/V at every memory layer (before
  RoPE; one layer in the paper layout) and a retriever embedding of its own text are appended to memory.
- Retrieval happens once per chunk boundary, never per token. The query is the text of the chunk just
  before the boundary (`query="prev_chunk"`): only text before the tokens being predicted.
- `ingest` reads like scoring without the LM head, so ingest-then-score equals one pass of scoring at
  every layer (per-layer layout). The paper layout ingests cheaply: the text's first chunk through every
  layer (so upper layers keep the true attention sinks), the rest through layers 0..mem_layer only; the
  upper layers' window then warms up on the next tokens read with every layer.
- Generation retrieves once with the prompt's own text before reading it (the prompt is given, so this
  is no look-ahead); scoring stays causal.
- Prefetch: when reading a known text (score, ingest) through a memory that offers `search_async` (the
  ret-mem port), the next boundary's query (the text of the chunk about to be computed) is known before
  that chunk is computed, so its retrieval runs in the background while the model works. The chunks that
  leave the window by that boundary are stored first (their K/V were read already), so the background
  search sees the memory a search at the boundary would see, in the same order of calls: the answer is
  the same. `ReaderStats.retrieval_hidden_s` says how much retrieval time the model did not wait for.
  A search started ahead that does not answer its boundary (the memory or query changed, the state was
  flushed) is cancelled, and so is one still open when the reader is given up (`cancel_prefetch`).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch

from memlong import kvcodec
from memlong.errors import InvalidArgument
from memlong.memory import PendingChunks, SearchResult
from memlong.model import BlockOutput, MemLongModel, Memory

# Temperatures below this decode greedily: sampling there is argmax in all but exact ties, and dividing
# log-probs by a near-zero temperature overflows every logit to -inf (1e-45 gives NaN probabilities).
GREEDY_BELOW = 1e-4


class SearchResultLike(Protocol):
    ids: np.ndarray  # (q, k) int64, -1 padding, chronological per row
    scores: np.ndarray  # (q, k) float32
    records: np.ndarray  # (q, k, record_bytes) uint8
    lengths: np.ndarray  # (q, k) int32


class MemoryPort(Protocol):
    """What the chunk loop needs from a memory: satisfied by SessionMemory and the ret-mem client.

    Optional, looked up with getattr: `search_async(make_queries, top_k, then)` starts embedding +
    search + `then(result)` (the decode of the K/V) at once and returns a `PendingSearch`. It must answer
    as `search(make_queries(), top_k)` made at the moment of the call; the Reader uses it only where
    nothing was appended since (the ret-mem port offers it; see "Prefetch" above)."""

    def append(
        self, ids: np.ndarray, embeddings: np.ndarray, records: np.ndarray, lengths: np.ndarray
    ) -> int: ...

    def search(self, queries: np.ndarray, top_k: int) -> SearchResultLike: ...


class PendingSearch(Protocol):
    """A search started ahead by `search_async`."""

    work_s: float  # seconds it took where it ran (embedding, search, `then`); set once result() returns

    def result(self) -> Any:
        """Wait for the search; `then` of its result."""
        ...

    def cancel(self) -> None:
        """Give the search up (its result is never read): stop its work where it can be stopped."""
        ...


class Embedder(Protocol):
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray: ...


@dataclass
class ReaderStats:
    """Counters of one reader, reported by benchmarks and services."""

    tokens_ingested: int = 0
    tokens_scored: int = 0
    retrievals: int = 0
    retrieval_s: float = 0.0
    chunks_stored: int = 0
    store_s: float = 0.0
    compute_s: float = 0.0
    bytes_retrieved: int = 0
    # Retrieval work done in the background while the model computed (embedding, search, merge), less
    # what the model still waited for: retrieval_s (waited) + retrieval_hidden_s is all retrieval time.
    retrieval_hidden_s: float = 0.0
    prefetched: int = 0  # retrievals answered by a search started ahead
    prefetch_unused: int = 0  # searches started ahead that did not answer their boundary (work lost)
    # Blocks read after a memory search for their chunk (this call's, or the one a fork carried over).
    blocks_searched: int = 0
    blocks_with_memory: int = 0  # blocks that attended to retrieved chunks
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings. temperature 0 (or below GREEDY_BELOW) means greedy."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InvalidArgument("max_new_tokens", "must be >= 1")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):  # NaN passes a `< 0` check
            raise InvalidArgument("temperature", f"must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:  # false for NaN too
            raise InvalidArgument("top_p", "must be in (0, 1]")
        if self.top_k < 0:
            raise InvalidArgument("top_k", "must be >= 0")


def kv_to_records(k: torch.Tensor, v: torch.Tensor, dtype: str, codec: str = "none") -> np.ndarray:
    """(n, L_mem, Hkv, c, D) K and V -> (n, record_bytes) uint8 records of the (L_mem, 2, Hkv, c, D)
    stack (for L_mem = 1 the same bytes as the paper's (2, Hkv, c, D)), compact with `codec`."""
    return kvcodec.encode(k, v, dtype, codec)


def records_to_kv(
    records: np.ndarray, shape: tuple[int, ...], dtype: str, codec: str = "none"
) -> torch.Tensor:
    """(..., record_bytes) uint8 -> (..., *shape) tensor: the stored dtype (no copy), or float32
    expanded from a compact `codec`."""
    return kvcodec.decode(records, shape, dtype, codec)


class ForkedMemory:
    """A read-only view of a shared memory for a forked reader: its own chunks stay with it.

    With per-layer memory the K/V a reader stores depend on what it retrieved, so two forks reading the
    same tokens store different records under the same chunk ids; each keeps its own (exactly merged
    into its searches, see `PendingChunks`) and the shared memory never changes.
    """

    def __init__(self, base: MemoryPort) -> None:
        self.base = base
        self._own = PendingChunks()

    def append(
        self, ids: np.ndarray, embeddings: np.ndarray, records: np.ndarray, lengths: np.ndarray
    ) -> int:
        self._own.add(ids, embeddings, records, lengths)
        return len(ids)

    def search(self, queries: np.ndarray, top_k: int) -> SearchResultLike:
        return self._own.merge(queries, self.base.search(queries, top_k), top_k)


class QueryEmbeddings:
    """Embeddings of recent retrieval queries, reused when the same text is stored as a chunk.

    The query at a chunk boundary is the text of the chunk just read; that chunk is stored, with an
    embedding of the same text, once it leaves the local window (window / chunk boundaries later).
    Remembering the last `size` queries saves the second embedding. Thread-safe: a prefetched query
    is embedded on a background thread.
    """

    def __init__(self, retriever: Embedder, size: int = 64) -> None:
        self.retriever = retriever
        self.size = size
        self._recent: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def embed(self, text: str) -> np.ndarray:
        """(1, dim) embedding of a query, remembered for a later store of the same text."""
        emb = self.retriever.embed([text])
        with self._lock:
            self._recent[text] = emb[0]
            while len(self._recent) > self.size:
                self._recent.popitem(last=False)
        return emb

    def embed_chunks(self, texts: list[str]) -> np.ndarray:
        """(n, dim) embeddings of chunk texts: remembered queries reused, the rest embedded in one batch."""
        with self._lock:
            known = [self._recent.get(t) for t in texts]
        missing = [i for i, e in enumerate(known) if e is None]
        if len(missing) == len(texts):
            return self.retriever.embed(texts)
        if missing:
            for i, e in zip(missing, self.retriever.embed([texts[i] for i in missing]), strict=True):
                known[i] = e
        return np.stack(known).astype(np.float32, copy=False)


class Reader:
    """Reads one text stream through a MemLong model and a memory (None: local window only)."""

    def __init__(
        self,
        model: MemLongModel,
        retriever: Embedder,
        tokenizer,
        memory: MemoryPort | None,
        *,
        next_chunk_id: int = 0,
    ) -> None:
        self.model = model
        self.retriever = retriever
        self.tokenizer = tokenizer
        self.memory = memory
        self.stats = ReaderStats()
        self.next_chunk_id = next_chunk_id
        self._queries = QueryEmbeddings(retriever)
        self._reset_local()

    @property
    def cfg(self):
        """The model's current MemLong settings (read each time: `model.configured` may swap them)."""
        return self.model.config

    def _reset_local(self) -> None:
        self.stream = self.model.new_stream()
        self.position = 0  # tokens read since the local state began
        self._pend_start = 0  # position of the first token not yet in memory
        self._early: dict[int, int] = {}  # chunk id stored by flush(keep_window) -> end of its span
        self._pend_tokens: list[int] = []
        self._pend_k: list[torch.Tensor] = []  # (L_mem, Hkv, s, D) parts, concatenated lazily
        self._pend_v: list[torch.Tensor] = []
        self._history: list[int] = []  # the last `chunk` tokens read: the retrieval query's text
        self._key_history: torch.Tensor | None = None  # (<= chunk, key_dim) their queries ("keys")
        # A given prompt's query (`seed_query`): (text, attention queries, first position it no longer
        # serves): every boundary before that position reads what it retrieves.
        self._seed: tuple[list[int], torch.Tensor | None, int] | None = None
        self._anchor: int | None = None  # where a given prompt's retrieval first read (prompt_insert)
        self._unread_chunk = False  # an ingest without memory ended inside the current chunk
        # The text (and attention queries) before the current chunk's boundary: what the chunk retrieves
        # with, should it start reading mid-chunk (after an ingest without memory).
        self._chunk_query: tuple[list[int], torch.Tensor | None] = ([], None)
        self._last_logp: torch.Tensor | None = None  # (V,) log-probs of the next token
        self._block_memory: Memory | None = None  # retrieved at the last chunk boundary
        self._block_searched = False  # a memory search ran for the current chunk
        # (position, query tokens, next chunk id and top-k at issue, search) of a retrieval started ahead
        self._prefetched: tuple[int, list[int], int, int, PendingSearch] | None = None

    def fork(self, memory: MemoryPort | None, writable: bool = False) -> Reader:
        """A reader with a copy of this one's local state, reading `memory` (None for sliding-only).

        It does not write to a shared `memory`: the fork's own chunks stay with it (`ForkedMemory`).
        writable=True: `memory` is the fork's own (e.g. a copy) and receives its chunks directly.
        """
        view = memory if memory is None or writable else ForkedMemory(memory)
        other = Reader(self.model, self.retriever, self.tokenizer, view, next_chunk_id=self.next_chunk_id)
        other.stream = self.stream.clone()
        other._queries = self._queries  # keyed by text: valid for every fork
        other.position, other._pend_start = self.position, self._pend_start
        other._early = dict(self._early)
        other._pend_tokens = list(self._pend_tokens)
        other._pend_k, other._pend_v = list(self._pend_k), list(self._pend_v)
        other._history = list(self._history)
        other._key_history = self._key_history
        other._last_logp = self._last_logp
        other._seed = self._seed
        other._anchor = self._anchor
        other._unread_chunk = self._unread_chunk
        other._chunk_query = self._chunk_query
        if memory is not None:  # mid-chunk, the rest of the chunk reads what its boundary retrieved
            other._block_memory, other._block_searched = self._block_memory, self._block_searched
        return other

    # -- memory traffic -------------------------------------------------------------------------------

    def _absorb(self, tokens: Sequence[int], out: BlockOutput) -> None:
        """Queue a block's memory K/V (B=1, L_mem, Hkv, s, D), then store every chunk that has left the
        local window."""
        self._pend_tokens.extend(tokens)
        self._pend_k.append(out.mem_k[0])
        self._pend_v.append(out.mem_v[0])
        self._history = (self._history + list(tokens))[-self.cfg.chunk :]
        if out.queries is not None:
            self._key_history = _last_rows(self._key_history, out.queries[0], self.cfg.chunk)
        c, w = self.cfg.chunk, self.cfg.local_window
        n_out = max(0, (self.position - w - self._pend_start) // c)  # whole chunks older than the window
        if n_out:
            self._store(n_out * c)

    def _store(self, n_tokens: int) -> None:
        """Move the oldest n_tokens pending tokens into memory as chunks (the last may be partial)."""
        c = self.cfg.chunk
        k = torch.cat(self._pend_k, dim=2) if len(self._pend_k) > 1 else self._pend_k[0]  # (L, Hkv, n, D)
        v = torch.cat(self._pend_v, dim=2) if len(self._pend_v) > 1 else self._pend_v[0]
        toks = self._pend_tokens[:n_tokens]
        self._pend_k, self._pend_v = [k[:, :, n_tokens:]], [v[:, :, n_tokens:]]
        self._pend_tokens = self._pend_tokens[n_tokens:]
        self._pend_start += n_tokens
        if self.memory is None:
            return
        n_chunks = -(-n_tokens // c)
        pad = n_chunks * c - n_tokens
        k, v = k[:, :, :n_tokens], v[:, :, :n_tokens]
        if pad:
            k = torch.nn.functional.pad(k, (0, 0, 0, pad))
            v = torch.nn.functional.pad(v, (0, 0, 0, pad))
        n_layers, hkv, _, d = k.shape
        k = k.reshape(n_layers, hkv, n_chunks, c, d).permute(2, 0, 1, 3, 4)  # (n, L_mem, Hkv, c, D)
        v = v.reshape(n_layers, hkv, n_chunks, c, d).permute(2, 0, 1, 3, 4)
        lengths = np.array([min(c, n_tokens - i * c) for i in range(n_chunks)], dtype=np.int32)
        ids = np.arange(self.next_chunk_id, self.next_chunk_id + n_chunks, dtype=np.int64)
        t0 = time.perf_counter()
        if self.cfg.retrieval == "keys":
            starts = self._pend_start - n_tokens + torch.arange(n_chunks) * c  # stream positions
            skip = (self.cfg.sink_tokens - starts).clamp(min=0, max=c)
            emb = self.model.chunk_keys(k, torch.from_numpy(lengths), skip).numpy()
        else:
            texts = [self.tokenizer.decode(toks[i * c : (i + 1) * c]) for i in range(n_chunks)]
            emb = self._queries.embed_chunks(texts)
        self.memory.append(ids, emb, kv_to_records(k, v, self.cfg.kv_dtype, self.cfg.kv_codec), lengths)
        self.stats.store_s += time.perf_counter() - t0
        self.stats.chunks_stored += n_chunks
        self.next_chunk_id += n_chunks

    def flush(self, keep_window: bool = False) -> None:
        """Store everything read so far (a last partial chunk too), so memory alone holds the text.

        keep_window=False clears the local state. keep_window=True keeps it, so the next read continues
        as one pass would (true sinks, warm window): the chunks stored early, still inside the window,
        are left out of retrieval until they leave it (`_early`). Chunk boundaries then follow the call
        boundaries where a call ended mid-chunk; the tokens in memory and in the window are the same.
        """
        if self._pend_tokens:
            start, first_id = self._pend_start, self.next_chunk_id
            self._store(len(self._pend_tokens))
            if keep_window:
                c = self.cfg.chunk
                for i in range(first_id, self.next_chunk_id):
                    self._early[i] = start + (i - first_id) * c + c  # where the chunk may leave the window
        if not keep_window:
            self.cancel_prefetch()
            self._reset_local()

    def cancel_prefetch(self) -> None:
        """Cancel the retrieval started ahead, if any: a reader that is put aside (kept for a later call,
        or dropped) would otherwise leave it running and hold its K/V."""
        pre, self._prefetched = self._prefetched, None
        if pre is not None:
            pre[4].cancel()

    def seed_query(self, tokens: Sequence[int], unread: int = 0) -> None:
        """Retrieve memory for the tokens about to be read with `tokens` (a given prompt) as the query.

        Used by `read_prompt`: the prompt is given and only what follows is predicted, so querying with
        it is no look-ahead. The text query is its last `prompt_query_tokens` (0: its last chunk).
        Scoring never seeds. Mid-chunk the retrieval runs now and serves the rest of the chunk; every
        boundary from here until the chunk before it holds none of the prompt (the prompt's last
        `unread` tokens, and what follows them for up to a chunk) retrieves with it too, so the answer
        reads what the question found even when the prompt ends on a boundary. Retrieval by keys runs
        the last chunk's worth of the unread tokens once ahead, on a copy of the local state, for their
        attention queries.
        """
        query = list(tokens)[-(self.cfg.prompt_query_tokens or self.cfg.chunk) :]
        keys = None
        if self.cfg.retrieval == "keys":
            ahead = list(tokens)[len(tokens) - min(unread, self.cfg.chunk) :] if unread else []
            keys = self._key_history
            if ahead:
                memory = self._block_memory if self.position % self.cfg.chunk else None
                out = self.model.forward_block(torch.tensor([ahead]), self.stream.clone(), memory=memory)
                keys = _last_rows(keys, out.queries[0], self.cfg.chunk)
        self._seed = (query, keys, self.position + unread + self.cfg.chunk)
        self._anchor = None  # this prompt's chunks are inserted where it first reads them
        if self.position % self.cfg.chunk:
            self._block_memory = self._retrieve(query, keys)
            self._unread_chunk = False  # (an ingest without memory may have left the chunk unread)

    def _seeded_at(self, position: int) -> bool:
        """Whether the boundary at `position` retrieves with a given prompt's query (`seed_query`)."""
        return self._seed is not None and position < self._seed[2]

    def _prefetch(self, position: int, query_tokens: list[int]) -> None:
        """Start the retrieval for the boundary at `position` in the background, before the block that
        ends there is computed. `query_tokens` is that block's own text: known (the text is given) and
        before the boundary, so the query stays causal."""
        self.cancel_prefetch()  # one for an earlier boundary was either read there or is stale
        search_async = getattr(self.memory, "search_async", None)
        if search_async is None or self.cfg.retrieval == "keys":  # the query comes out of this block
            return
        # The chunks that leave the window by `position` were read already: store them now, so the
        # search sees the memory (and ret-mem the order of calls) of a search made at the boundary.
        c = self.cfg.chunk
        leaving = max(0, (position - self.cfg.local_window - self._pend_start) // c)
        if leaving := min(leaving, len(self._pend_tokens) // c):
            self._store(leaving * c)
        if self._pend_start == 0 and self.next_chunk_id == 0:  # nothing in memory yet: no search
            return
        text = self.tokenizer.decode(query_tokens)
        in_window = self._in_window(position)
        top_k = self.cfg.top_k + len(in_window)
        search = search_async(lambda: self._queries.embed(text), top_k, self._memory_of(in_window))
        self._prefetched = (position, list(query_tokens), self.next_chunk_id, top_k, search)

    def _in_window(self, position: int) -> set[int]:
        """Chunks stored early (`flush(keep_window=True)`) that the window at `position` still holds."""
        edge = position - self.cfg.local_window
        for i in [i for i, end in self._early.items() if end <= edge]:
            del self._early[i]
        return set(self._early)

    def _retrieve(
        self, query_tokens: Sequence[int] | None = None, key_rows: torch.Tensor | None = None
    ) -> Memory | None:
        """Top-k chunks for the next chunk, queried with the text before it (or `query_tokens`, a given
        prompt, with `key_rows` their attention queries when retrieving by keys); None when nothing to
        use."""
        pre, self._prefetched = self._prefetched, None
        self._block_searched = False  # until a search below runs for this chunk
        if not self._seeded_at(self.position):
            self._seed = None  # the chunk before this boundary holds none of the prompt
        prompted = query_tokens is not None or self._seed is not None
        if query_tokens is None:
            query_tokens, key_rows = self._seed[:2] if self._seed else self._chunk_query
        query_tokens = list(query_tokens)
        if self.memory is None or not query_tokens or self._pend_start == 0 and self.next_chunk_id == 0:
            return None
        t0 = time.perf_counter()
        in_window = self._in_window(self.position)
        wanted = self.cfg.prompt_top_k if prompted and self.cfg.prompt_top_k else self.cfg.top_k
        top_k = wanted + len(in_window)
        # A prefetched result is used only if it answers this boundary's query against the same memory
        # (nothing stored since it was issued).
        used = pre is not None and pre[:4] == (self.position, query_tokens, self.next_chunk_id, top_k)
        self.stats.prefetch_unused += pre is not None and not used
        if pre is not None and not used:
            pre[4].cancel()
        if used:
            memory, n_bytes = pre[4].result()
            self.stats.prefetched += 1
            self.stats.retrieval_hidden_s += max(0.0, pre[4].work_s - (time.perf_counter() - t0))
        else:
            if self.cfg.retrieval == "keys":
                if key_rows is None:  # the text was read without queries (a paper-layout lower-only ingest)
                    raise InvalidArgument(
                        "retrieval", "no attention queries recorded for a retrieval by keys"
                    )
                res = self.memory.search(_key_query(key_rows, self.cfg), top_k)
            else:
                res = self.memory.search(self._queries.embed(self.tokenizer.decode(query_tokens)), top_k)
            memory, n_bytes = self._memory_of(in_window, wanted)(res)
        if not prompted:
            self._anchor = None
        elif self._anchor is None and memory is not None:
            self._anchor = self.position
        if memory is not None and prompted and self.cfg.prompt_insert:
            memory = replace(memory, anchor=self._anchor)
        self._block_searched = True
        self.stats.retrievals += 1
        self.stats.bytes_retrieved += n_bytes
        self.stats.retrieval_s += time.perf_counter() - t0
        return memory

    def _memory_of(
        self, in_window: set[int], top_k: int | None = None
    ) -> Callable[[SearchResultLike], tuple[Memory | None, int]]:
        """A function of a search result: (the Memory the model reads, None if no chunk; K/V bytes
        received), keeping its best `top_k` (default: the setting's) chunks that are not in the window.
        It reads no state of the reader, so a prefetch runs it in the background."""
        top_k, shape, dtype, codec = (
            top_k or self.cfg.top_k,
            self.model.kv_record_shape,
            self.cfg.kv_dtype,
            self.cfg.kv_codec,
        )

        def decode(res: SearchResultLike) -> tuple[Memory | None, int]:
            res = _leave_out(res, in_window, top_k)
            valid = res.ids[0] >= 0
            if not valid.any():
                return None, int(res.records.nbytes)
            records = res.records[0] if valid.all() else res.records[0][valid]  # (n, record_bytes)
            kv = records_to_kv(records, shape, dtype, codec)  # a view of them for plain records
            kv = kv.reshape(kv.shape[0], -1, *shape[-4:])  # (n, L_mem, 2, Hkv, c, D)
            n, n_layers, _, hkv, c, d = kv.shape
            # One pass from the records to what the model reads: float32, chronological chunk order,
            # (L_mem, Hkv, n, c, D) = (1, L_mem, Hkv, n*c, D) for K and for V (converting first and
            # reordering after wrote every value twice more).
            mem = torch.empty((2, 1, n_layers, hkv, n * c, d), dtype=torch.float32)
            for i in (0, 1):
                mem[i, 0].view(n_layers, hkv, n, c, d).copy_(kv[:, :, i].permute(1, 2, 0, 3, 4))
            mem_k, mem_v = mem[0], mem[1]
            slot = (
                torch.arange(c)[None, :] < torch.from_numpy(res.lengths[0][valid]).long()[:, None]
            )  # (k, c)
            return Memory(k=mem_k, v=mem_v, mask=slot.reshape(1, 1, n * c)), int(res.records.nbytes)

        return decode

    # -- reading ----------------------------------------------------------------------------------------

    def _blocks(self, n: int, size: int) -> Iterator[tuple[int, int]]:
        """Split the next n tokens into blocks that end on chunk boundaries, at most `size` tokens each.
        (The caller reads each block before the next is cut: positions count from where it started.)"""
        i, start = 0, self.position
        while i < n:
            boundary = (start + i) // self.cfg.chunk * self.cfg.chunk + size
            step = min(boundary - (start + i), n - i)
            yield i, step
            i += step

    @torch.no_grad()
    def ingest(self, tokens: Sequence[int], more: bool = False) -> None:
        """Encode tokens into memory without the LM head. Per-layer layout: every layer, reading only its
        local window (served, `ingest_memory=False`; the side reader too), or with retrieval exactly as
        scoring reads them (`ingest_memory=True`). Paper layout: layers 0..mem_layer only after the
        text's first chunk. more=True: the next call continues this text, so the retrieval after its end
        may start early."""
        t0 = time.perf_counter()
        paper = self.cfg.layout == "paper"
        for i, step in self._blocks(len(tokens), self.cfg.chunk):
            block = list(tokens[i : i + step])
            if paper and self.stream.tokens_seen >= self.cfg.chunk:
                out = self.model.forward_block(torch.tensor([block]), self.stream, lower_only=True)
                self.position += step
                self._absorb(block, out)
            else:  # the paper layout's next block reads no memory: nothing to fetch ahead for it
                read = self.cfg.ingest_reads_memory
                self._forward(block, ahead=(i + step < len(tokens) or more) and not paper and read, read=read)
        self._last_logp = None  # the LM head did not run: the next token cannot be scored
        self.stats.tokens_ingested += len(tokens)
        self.stats.compute_s += time.perf_counter() - t0

    def next_logprobs(self) -> torch.Tensor:
        """(V,) log-probs of the token after everything scored so far (after `score` or `generate`)."""
        if self._last_logp is None:
            raise InvalidArgument("tokens", "nothing scored yet: the next token's distribution is unknown")
        return self._last_logp

    @torch.no_grad()
    def score(self, tokens: Sequence[int]) -> torch.Tensor:
        """(n,) log p(token | everything read before it); NaN where nothing was read before."""
        t0 = time.perf_counter()
        out: list[torch.Tensor] = []
        block_size = self.cfg.chunk  # chunk-aligned blocks: positions are block-invariant (model.py)
        for i, step in self._blocks(len(tokens), block_size):
            block = list(tokens[i : i + step])
            # (step, V): log-probs of the token after each position
            logp = self._read_block(block, ahead=i + step < len(tokens))
            ids = torch.tensor(block)
            first = self._last_logp[ids[0]] if self._last_logp is not None else torch.tensor(float("nan"))
            rest = logp[:-1].gather(1, ids[1:, None])[:, 0]
            out.append(torch.cat([first.reshape(1), rest]))
            self._last_logp = logp[-1]
        self.stats.tokens_scored += len(tokens)
        self.stats.compute_s += time.perf_counter() - t0
        return torch.cat(out) if out else torch.zeros(0)

    def _forward(self, block: list[int], ahead: bool = False, read: bool = True) -> torch.Tensor:
        """Read a block with every layer (retrieving at a chunk boundary); (s, hidden) final states.
        ahead=True: more known text follows, so the retrieval for a boundary at the block's end starts
        now, in the background. read=False: the block reads no memory (nor does the rest of its chunk)."""
        c = self.cfg.chunk
        if self.position % c == 0:
            self._chunk_query = (list(self._history), self._key_history)
        if not read:
            self._block_memory, self._block_searched = None, False
            self._unread_chunk = (self.position + len(block)) % c != 0  # ends inside a chunk
        elif self.position % c == 0 or self._unread_chunk:  # (the rest of a chunk an ingest left unread)
            self._block_memory = self._retrieve()
            self._unread_chunk = False
        end = self.position + len(block)
        if ahead and self.memory is not None and end % c == 0 and not self._seeded_at(end):
            self._prefetch(end, (self._history + block)[-c:])
        self.stats.blocks_searched += self._block_searched
        self.stats.blocks_with_memory += self._block_memory is not None
        out = self.model.forward_block(torch.tensor([block]), self.stream, memory=self._block_memory)
        self.position += len(block)
        self._absorb(block, out)
        return out.hidden[0]

    def _read_block(self, block: list[int], ahead: bool = False) -> torch.Tensor:
        """(s, V) log-probs of the token after each position of the block."""
        return torch.log_softmax(self.model.logits(self._forward(block, ahead)).float(), dim=-1)

    @torch.no_grad()
    def read_prompt(self, prompt: Sequence[int]) -> torch.Tensor:
        """Score a prompt whose continuation is predicted next; (n,) log-probs as `score`.

        The prompt is read as text up to its last chunk boundary; the rest of it, and what follows,
        read memory retrieved with the prompt's own last `chunk` tokens (the question, say). With
        `prompt_window`, so do its chunks inside the last `local_window` tokens. The prompt is given,
        so querying with it is no look-ahead; only what follows it is predicted.
        """
        c, start = self.cfg.chunk, self.position
        cut = max(0, (start + len(prompt) - 1) // c * c - start)  # last boundary inside
        if self.cfg.prompt_window:  # the first boundary inside the window at the prompt's end, or 0
            edge = start + len(prompt) - self.cfg.local_window
            cut = min(cut, max(0, -(-edge // c) * c - start))
        head = self.score(prompt[:cut]) if cut else torch.zeros(0)
        self.seed_query(prompt, unread=len(prompt) - cut)
        return torch.cat([head, self.score(prompt[cut:])])

    @torch.no_grad()
    def generate(self, prompt: Sequence[int], params: SamplingParams) -> Iterator[int]:
        """Read the prompt (`read_prompt`), then yield new tokens one at a time."""
        if prompt:
            self.read_prompt(prompt)
        if self._last_logp is None:
            raise InvalidArgument("prompt", "generation needs at least one token of prompt after an ingest")
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        text = ""
        for _ in range(params.max_new_tokens):
            token = _sample(self._last_logp, params, gen)
            yield token
            if token in params.stop_token_ids:
                return
            if params.stop_strings:
                text += self.tokenizer.decode([token])
                if any(s in text for s in params.stop_strings):
                    return
            logp = self._read_block([token])
            self._last_logp = logp[-1]


def _key_query(rows: torch.Tensor, cfg) -> np.ndarray:
    """(1, key_dim) float32 query for retrieval by keys from the queries of the tokens before the
    boundary (rows, oldest first): the mean of the last `key_query_tokens`, less `key_query_center` x
    the mean of them all."""
    recent = rows[-cfg.key_query_tokens :] if cfg.key_query_tokens else rows
    query = recent.float().mean(0) - cfg.key_query_center * rows.float().mean(0)
    return query[None].numpy()


def _last_rows(rows: torch.Tensor | None, new: torch.Tensor, n: int) -> torch.Tensor:
    """The last n rows of `rows` followed by `new` (a rolling window of per-token vectors)."""
    both = new if rows is None else torch.cat([rows, new])
    return both[-n:]


def _leave_out(res: SearchResultLike, ids: set[int], top_k: int) -> SearchResultLike:
    """Row 0 of a search result without `ids`, its best `top_k` kept, in chronological order."""
    if not ids:
        return res
    keep = (res.ids[0] >= 0) & ~np.isin(res.ids[0], list(ids))
    rows = np.flatnonzero(keep)
    rows = rows[np.lexsort((res.ids[0][rows], -res.scores[0][rows]))][:top_k]
    rows = np.sort(rows)  # the search result is chronological already
    return SearchResult(
        ids=res.ids[:1, rows],
        scores=res.scores[:1, rows],
        records=res.records[:1, rows],
        lengths=res.lengths[:1, rows],
    )


def _sample(logp: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    if p.temperature < GREEDY_BELOW:
        return int(torch.argmax(logp))
    logits = logp / p.temperature
    if p.top_k:
        kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < p.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
