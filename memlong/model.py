"""MemLong retrieval causal attention on a Hugging Face LLaMA-family model.

This is the one file that owns the forward pass. It reuses transformers' modules (embeddings,
decoder layers, norms, rotary embedding) and swaps only the attention kernel through
`AttentionInterface`, so any LLaMA-family checkpoint works without a copy of its modeling file.

Per block of S new tokens, each layer attends to
    [ memory (M, retrieval layers only) ; sinks (<= sink_tokens) ; local cache (n) ; the block (S) ]
in ONE softmax. Local attention is a sliding window: a token sees itself and the `local_window` tokens
before it. A model trained with full attention also leans on the first tokens of its input (attention
sinks, StreamingLLM): dropping them once they leave the window wrecks perplexity (measured: KJV, 1k
window, 37.7 without sinks vs 21 for plain attention over 1k tokens), so every layer keeps attending to
the first `sink_tokens` tokens it read.

Positions. A token at stream index t sits at position sink_tokens + W + (t mod chunk) + 1; window keys
keep their true distance behind it; sinks sit at 1..sink_tokens, just before the oldest window position;
memory keys are stored before RoPE and used unrotated, i.e. at position 0 (mem_position="zero", the
paper's choice; "prefix" puts the retrieved chunks at 1-M..0 instead). Every distance then depends only
on t, never on how the text was cut into (chunk-aligned) blocks, and the query-memory distance stays
about one window however long the text is. Re-positioning retrieved chunks into the sequence was
reported to collapse the model (the MemLong paper).

Two memory layouts (config.layout). "per_layer" (the default, training-free): every memory layer stores
its own K/V and reads them back. "paper": every retrieval layer reuses the memory layer's K/V (KV-head
count, GQA) with its own Q and O projections (needs stage-2 training). Memory K/V travel as
(B, L_mem, Hkv, M, D), one slice per stored layer; `read_index` says which slice a layer reads.

Two memory readers (config.reader). "stream": the pass over the text reads memory, so its window K/V
and the chunks it stores carry what it read. "side" (LongMem's split of a memory encoder from a reader,
here on the same weights, training-free): the text's pass reads no memory, so its window K/V and the
stored chunks are a plain sliding-window model's; when a block has memory, a second pass from the same
block input gives the outputs, each layer's queries attending to memory and the first pass's keys and
values in one softmax (`_side_pass`). Memory then never feeds memory, and where a text is cut into calls
cannot change what is read.

Sinks. A layer that skipped tokens (the upper layers during a paper-layout lower-only ingest) drops its
now-stale window when it next runs, but keeps the sinks it recorded from the text's true first tokens;
that is why the Reader runs the text's first chunk through every layer (a layer that first ran
mid-text would take mid-text tokens as its sinks).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from memlong.config import MemLongConfig
from memlong.errors import InvalidArgument

ATTN_NAME = "memlong"


@dataclass
class Memory:
    """Retrieved memory for one block, shared by every reading layer.

    k, v: (B, L_mem, Hkv, M, D), keys before RoPE, one slice per stored layer. mask: (B, S or 1, M) bool, True where a query may attend
    (padding slots and chunks not retrieved for that query are False).
    """

    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor
    # Set for chunks a given prompt retrieved, read as text inserted right before stream index `anchor`
    # (config.prompt_insert): memory token j of M at stream index anchor-M+j, and every local key before
    # `anchor` (sinks too) moved back M positions to make room. None: memory at mem_position.
    anchor: int | None = None


@dataclass
class LayerCache:
    """One layer's local state: the last `local_window` tokens and the first `sink_tokens` tokens it
    read (attention sinks), keys before RoPE and values, (B, Hkv, n, D); `seen` counts tokens read."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    sink_k: torch.Tensor | None = None
    sink_v: torch.Tensor | None = None
    seen: int = 0
    # The cache keys after RoPE, as last attended, and the position k_rot[:, :, 0] was rotated to. Every
    # block of one chunk puts the cache at the same positions, so only the block's own keys need rotating
    # until the next chunk starts (inference only: None while gradients are recorded).
    k_rot: torch.Tensor | None = None
    k_rot_pos: int = 0

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    @property
    def sinks(self) -> int:
        return 0 if self.sink_k is None else self.sink_k.shape[2]


@dataclass
class Stream:
    """Local state of one text being read: per-layer sliding caches. Memory lives elsewhere."""

    caches: list[LayerCache]
    tokens_seen: int = 0

    def clone(self) -> Stream:
        return Stream([dataclasses.replace(c) for c in self.caches], self.tokens_seen)


@dataclass
class _Forward:
    """What the attention kernel needs during one block forward (set in a context variable)."""

    stream: Stream
    window: int
    n_sink: int
    read_index: dict[int, int]  # reading layer -> its slice of memory K/V
    store_index: dict[int, int]  # storing layer -> its slice of the block's K/V output
    memory: Memory | None
    mem_k: torch.Tensor | None  # (B, L_mem, Hkv, M, D) memory keys as attended (rotated only in "prefix")
    cos: torch.Tensor  # (B, P+S+1-lo, D): rotary table for positions lo..P+S
    sin: torch.Tensor
    frame: int  # P: the block's first token sits at position P+1
    lo: int = 0  # the table's first position (below 0 only while memory is inserted)
    insert: tuple[int, int] | None = None  # (anchor, M) of inserted memory (Memory.anchor)
    k_pre: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, S, Hkv*D) from k_proj
    mem_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # slice -> (k_pre, v)
    query_layers: tuple[int, ...] = ()  # layers whose queries retrieval by keys uses
    queries: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, Hkv, S, D)
    # config.reader == "side": the first pass records each layer's rotated keys, values and mask
    # (without memory); the side pass attends to them (and memory) instead of its own.
    record: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
    side: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None


_CURRENT: contextvars.ContextVar[_Forward | None] = contextvars.ContextVar("memlong_forward", default=None)


def _local_mask(n: int, s: int, window: int, device: torch.device) -> torch.Tensor:
    """(S, n+S) bool: query i (key index n+i) sees keys j with n+i-window <= j <= n+i."""
    q = torch.arange(n, n + s, device=device)[:, None]
    k = torch.arange(n + s, device=device)[None, :]
    return (k <= q) & (k >= q - window)


def _sink_mask(n_sinks: int, seen: int, s: int, window: int, device: torch.device) -> torch.Tensor:
    """(S, n_sinks) bool: sink j is attended as a sink once it has left query i's window (before that
    the query sees it as an ordinary local key, and counting it twice would bias the softmax)."""
    q = torch.arange(seen, seen + s, device=device)[:, None]
    j = torch.arange(n_sinks, device=device)[None, :]
    return j < q - window


def memlong_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Joint softmax over [memory ; local cache ; block]. query (B, H, S, D) is already rotated."""
    fwd = _CURRENT.get()
    if fwd is None:
        raise RuntimeError("memlong attention called outside MemLongModel.forward_block")
    layer = module.layer_idx
    b, n_heads, s, d = query.shape
    n_kv = value.shape[1]
    cache = fwd.stream.caches[layer]
    n = cache.length

    k_new = fwd.k_pre.pop(layer).view(b, s, n_kv, d).transpose(1, 2)  # (B, Hkv, S, D), before RoPE
    reads = fwd.memory is not None and layer in fwd.read_index
    if fwd.side is not None:  # the side pass: this layer's queries, the first pass's keys and values
        keys, values, mask = fwd.side[layer]
        return _attend(module, query, keys, values, mask, fwd, layer if reads else None, scaling, dropout)
    if layer in fwd.query_layers:  # as rotated when they attend memory, averaged over each KV group
        fwd.queries[layer] = _group_queries(query, n_kv)
    if layer in fwd.store_index:
        fwd.mem_kv[fwd.store_index[layer]] = (k_new, value)  # (B, Hkv, S, D) each
    k_loc = k_new if cache.k is None else torch.cat([cache.k, k_new], dim=2)  # (B, Hkv, n+S, D)
    v_loc = value if cache.v is None else torch.cat([cache.v, value], dim=2)
    # The window ends at the block: cache keys at P-n+1..P, the block at P+1..P+S.
    p = fwd.frame
    first = p - n + 1
    insert = fwd.insert if reads else None
    if insert is not None:  # keys before the anchor sit M positions further back
        anchor, m = insert
        pos = torch.arange(first, p + s + 1, device=query.device)
        pos = pos - m * (torch.arange(cache.seen - n, cache.seen + s, device=query.device) < anchor)
        k_rot = _rotate(k_loc, fwd, pos)
    elif cache.k_rot is not None and cache.k_rot_pos == first and cache.k_rot.shape[2] == n:
        k_blk = _rotate(k_new, fwd, range(p + 1, p + s + 1))
        k_rot = torch.cat([cache.k_rot, k_blk], dim=2)  # the same values as rotating k_loc whole
    else:
        k_rot = _rotate(k_loc, fwd, range(first, p + s + 1))

    mask = _local_mask(n, s, fwd.window, query.device)[None, None].expand(b, 1, s, n + s)  # (B, 1, S, n+S)
    keys, values = k_rot, v_loc
    if cache.seen < fwd.n_sink:  # the layer's first tokens become its sinks (they may leave the window
        take = fwd.n_sink - cache.seen  # within this very block, so record them before attending)
        new_k, new_v = k_new[:, :, :take], value[:, :, :take]
        cache.sink_k = new_k if cache.sink_k is None else torch.cat([cache.sink_k, new_k], dim=2)
        cache.sink_v = new_v if cache.sink_v is None else torch.cat([cache.sink_v, new_v], dim=2)
    if cache.sinks:
        # Sinks sit at positions 1..n_sink, right before the oldest possible window position.
        ns = cache.sinks
        at = range(1, ns + 1)
        if insert is not None:  # sinks read before the anchor move back with the local keys
            at = torch.arange(1, ns + 1, device=query.device)
            at = at - insert[1] * (torch.arange(ns, device=query.device) < insert[0])
        sink_rot = _rotate(cache.sink_k, fwd, at)
        keys = torch.cat([sink_rot, keys], dim=2)
        values = torch.cat([cache.sink_v, values], dim=2)
        sink_mask = _sink_mask(ns, cache.seen, s, fwd.window, query.device)[None, None].expand(b, 1, s, ns)
        mask = torch.cat([sink_mask, mask], dim=-1)
    if fwd.record is not None:  # the first pass of a side read: what the side pass attends besides memory
        fwd.record[layer] = (keys, values, mask)

    keep = fwd.window
    cache.k, cache.v = k_loc[:, :, -keep:], v_loc[:, :, -keep:]
    if torch.is_grad_enabled() or insert is not None:
        cache.k_rot = None
    else:
        cache.k_rot, cache.k_rot_pos = k_rot[:, :, -keep:], first + max(0, n + s - keep)
    cache.seen += s
    return _attend(module, query, keys, values, mask, fwd, layer if reads else None, scaling, dropout)


def _attend(
    module: torch.nn.Module,
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    fwd: _Forward,
    reading: int | None,
    scaling: float | None,
    dropout: float,
) -> tuple[torch.Tensor, None]:
    """One softmax over [memory (when `reading` is a reading layer) ; keys]. query (B, H, S, D), keys
    and values (B, Hkv, K, D) rotated, mask (B, 1, S, K); returns (B, S, H, D)."""
    b, n_heads, s, _ = query.shape
    if reading is not None:
        mem, i = fwd.memory, fwd.read_index[reading]
        # "zero": memory keys are not rotated (position 0, about one window before the local text).
        keys = torch.cat([fwd.mem_k[:, i].to(query.dtype), keys], dim=2)
        values = torch.cat([mem.v[:, i].to(query.dtype), values], dim=2)
        mem_mask = mem.mask[:, None].expand(b, 1, s, mem.k.shape[3])
        mask = torch.cat([mem_mask, mask], dim=-1)  # (B, 1, S, M+sinks+n+S)
    out = F.scaled_dot_product_attention(  # GQA: keys and values stay at the KV-head count
        query,
        keys,
        values,
        attn_mask=mask,
        dropout_p=dropout if module.training else 0.0,
        scale=scaling,
        enable_gqa=n_heads != values.shape[1],
    )  # (B, H, S, D)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_NAME, memlong_attention)


def _rotate(k: torch.Tensor, fwd: _Forward, positions: torch.Tensor | range) -> torch.Tensor:
    """Keys (B, H, n, D) before RoPE, rotated to `positions` (n of them) of the block's rotary table."""
    if isinstance(positions, range):  # a slice of the table: no gather
        at = slice(positions.start - fwd.lo, positions.stop - fwd.lo)
    else:
        at = positions - fwd.lo
    _, out = apply_rotary_pos_emb(k, k, fwd.cos[:, at], fwd.sin[:, at])
    return out


def _group_queries(query: torch.Tensor, n_kv: int) -> torch.Tensor:
    """(B, H, S, D) queries -> (B, Hkv, S, D): the mean of the query heads that share each KV head."""
    b, h, s, d = query.shape
    return query.detach().view(b, n_kv, h // n_kv, s, d).mean(2)


@dataclass
class BlockOutput:
    """hidden: (B, S, hidden) final-norm states (None for a lower-only pass).
    mem_k, mem_v: (B, L_mem, Hkv, S, D) every memory layer's K (before RoPE) and V of the block.
    queries: (B, S, key_dim) each token's retrieval query under `retrieval="keys"` (else None)."""

    hidden: torch.Tensor | None
    mem_k: torch.Tensor
    mem_v: torch.Tensor
    queries: torch.Tensor | None = None


class MemLongModel(torch.nn.Module):
    """A HF LLaMA-family causal LM read through MemLong's retrieval attention."""

    def __init__(self, hf_model: torch.nn.Module, config: MemLongConfig) -> None:
        super().__init__()
        self.hf = hf_model
        self.config = config
        self.base = hf_model.model
        hf_cfg = hf_model.config
        config.check_model(hf_cfg.num_hidden_layers)
        self.n_layers = hf_cfg.num_hidden_layers
        self.n_kv_heads = hf_cfg.num_key_value_heads
        self.head_dim = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads
        hf_model.config._attn_implementation = ATTN_NAME
        self._hooked: list[tuple[torch.nn.Module, object]] = []
        self._hook_k_proj()

    def _hook_k_proj(self) -> None:
        """Capture every layer's k_proj output (keys before RoPE) for the local cache and memory.

        Re-run whenever a k_proj module is replaced (e.g. wrapped by a peft LoRA layer), so the captured
        keys always include the adapter's contribution.
        """
        current = [layer.self_attn.k_proj for layer in self.base.layers]
        if [m for m, _ in self._hooked] == current:
            return
        for _, handle in self._hooked:
            handle.remove()
        self._hooked = [(m, m.register_forward_hook(self._stash_k(i))) for i, m in enumerate(current)]

    @contextlib.contextmanager
    def configured(self, **overrides) -> Iterator[MemLongConfig]:
        """Temporarily read with other settings (e.g. another set of retrieval layers) on the same weights."""
        saved = self.config
        self.config = dataclasses.replace(saved, **overrides)
        self.config.check_model(self.n_layers)
        try:
            yield self.config
        finally:
            self.config = saved

    @staticmethod
    def _stash_k(layer: int):
        def hook(_module, _inputs, output):
            fwd = _CURRENT.get()
            if fwd is not None:
                fwd.k_pre[layer] = output

        return hook

    @property
    def memory_layers(self) -> tuple[int, ...]:
        return self.config.memory_layers(self.n_layers)

    @property
    def kv_record_shape(self) -> tuple[int, ...]:
        """Shape of one chunk's stored K/V: (2, Hkv, chunk, D) in the paper layout, (L_mem, 2, Hkv, chunk,
        D) per layer. A paper record is byte-for-byte a per-layer record with L_mem = 1."""
        one = (2, self.n_kv_heads, self.config.chunk, self.head_dim)
        return one if self.config.layout == "paper" else (len(self.memory_layers), *one)

    @property
    def key_dim(self) -> int:
        """Width of a retrieval-by-keys vector: key layers x KV heads x head dim."""
        return self._key_width(self.config)

    def retrieval_dim(self, text_dim: int, config: MemLongConfig | None = None) -> int:
        """Width of the vectors a session of this model indexes under `config` (default: the current
        one): the text retriever's (`text_dim`) or key layers x KV heads x head dim."""
        cfg = config or self.config
        return self._key_width(cfg) if cfg.retrieval == "keys" else text_dim

    def _key_width(self, cfg: MemLongConfig) -> int:
        return len(cfg.key_layers_of(self.n_layers)) * self.n_kv_heads * self.head_dim

    def chunk_keys(
        self, k: torch.Tensor, lengths: torch.Tensor, skip: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(n, L_mem, Hkv, c, D) chunk keys and (n,) valid lengths -> (n, key_dim) float32 retrieval
        vectors: each key layer's keys averaged over the chunk's valid tokens, per KV head. skip (n,):
        leading tokens left out (the stream's attention sinks: their keys score high against every query,
        so the chunk holding them would win every search)."""
        sel = k[:, list(self.config.key_slices(self.n_layers))].float()  # (n, L_key, Hkv, c, D)
        slot = torch.arange(sel.shape[3])[None, :]
        first = torch.zeros_like(lengths) if skip is None else skip
        valid = (slot < lengths[:, None]) & (slot >= first[:, None])  # (n, c)
        total = (sel * valid[:, None, None, :, None]).sum(3)  # (n, L_key, Hkv, D)
        count = valid.sum(1).clamp(min=1)[:, None, None, None].float()
        return (total / count).reshape(k.shape[0], -1)

    @property
    def layout_tag(self) -> str:
        return self.config.layout_tag(self.n_layers)

    def new_stream(self) -> Stream:
        return Stream([LayerCache() for _ in range(self.n_layers)])

    def forward_block(
        self,
        input_ids: torch.Tensor,
        stream: Stream,
        memory: Memory | None = None,
        lower_only: bool = False,
        *,
        first_layer: int = 0,
        hidden: torch.Tensor | None = None,
    ) -> BlockOutput:
        """Read a block of new tokens (B, S), updating the stream's caches in place.

        lower_only (paper layout) runs layers 0..mem_layer-1 and the memory layer's K/V projections only:
        all that memory encoding needs in the paper layout. Those layers never see memory, so their caches and
        the stored K/V equal what a full pass would produce.

        first_layer, hidden: start at decoder layer `first_layer` (at most the lowest memory layer) from
        `hidden` (B, S, hidden), the states entering it; the layers below do not run. Training reads the
        frozen lower stack's output from a cache this way (memlong.training.cache).
        """
        cfg = self.config
        if lower_only and cfg.layout != "paper":
            raise InvalidArgument("lower_only", "only the paper layout stores one lower layer's K/V")
        if (hidden is None) != (first_layer == 0) or first_layer > self.memory_layers[0]:
            raise InvalidArgument("first_layer", "a later first layer (<= the memory layer) needs its input")
        self._hook_k_proj()
        if hidden is None:
            hidden = self.base.embed_tokens(input_ids)  # (B, S, hidden)
        b, s = input_ids.shape
        top = cfg.mem_layer if lower_only else self.n_layers
        # Position frame. A token at stream index t sits at position n_sink + W + (t mod chunk) + 1; its
        # window keys keep their true distances behind it, sinks sit at 1..n_sink and memory at 0.
        # Distances to sinks and memory thus depend only on t, never on how the text was cut into
        # blocks, as long as blocks do not cross chunk boundaries (the Reader's blocks never do).
        frame = cfg.sink_tokens + cfg.local_window + stream.tokens_seen % cfg.chunk
        # Memory keys rotated to positions mem_at.. ("prefix", or inserted), else unrotated ("zero").
        insert, mem_at = None, None
        if memory is not None and memory.anchor is not None:
            # Inserted memory: token j at stream index anchor-M+j, i.e. position P+1-(t-anchor)-M+j for
            # a block starting at stream index t; older local keys move back M (see Memory.anchor).
            insert = (memory.anchor, memory.k.shape[3])
            mem_at = frame + 1 - (stream.tokens_seen - memory.anchor) - insert[1]
        elif memory is not None and cfg.mem_position == "prefix":
            # Retrieved chunks read as the text right before the window: positions 1-M..0. The local
            # positions stay 1..P+S, so layers below the memory layer compute bit-identical results.
            mem_at = 1 - memory.k.shape[3]
        lo = 0 if mem_at is None else min(0, mem_at, 1 - memory.k.shape[3])
        positions = torch.arange(lo, frame + s + 1, device=input_ids.device)[None].expand(b, -1)
        cos, sin = self.base.rotary_emb(hidden, positions)  # (B, P+S+1-lo, D)
        read_k = None if memory is None else memory.k
        if mem_at is not None:
            at = slice(mem_at - lo, mem_at - lo + memory.k.shape[3])
            flat = read_k.flatten(1, 2)  # (B, L_mem*Hkv, M, D)
            _, flat = apply_rotary_pos_emb(flat, flat, cos[:, at], sin[:, at])
            read_k = flat.view_as(read_k)
        if not lower_only:
            for cache in stream.caches:
                if cache.seen != stream.tokens_seen:  # skipped tokens: its window is stale, its sinks true
                    cache.k = cache.v = cache.k_rot = None
                    cache.seen = stream.tokens_seen
        stored = self.memory_layers
        read_index = cfg.read_index(self.n_layers)
        # The side reader: this pass reads no memory; a second one below reads it (config.reader).
        side = memory is not None and cfg.reader == "side" and not lower_only
        fwd = _Forward(
            stream=stream,
            window=cfg.local_window,
            n_sink=cfg.sink_tokens,
            read_index=read_index,
            store_index={layer: i for i, layer in enumerate(stored)},
            memory=None if side else memory,
            mem_k=None if side else read_k,
            cos=cos,
            sin=sin,
            frame=frame,
            lo=lo,
            insert=insert,
            query_layers=cfg.key_layers_of(self.n_layers) if cfg.retrieval == "keys" else (),
            record={} if side else None,
        )
        q_pos = (cos[:, -s:], sin[:, -s:])  # queries are the block: positions P+1..P+S
        # Below the lowest reading layer the side pass would repeat the first one: it starts there.
        side_from = max(first_layer, min(read_index)) if side else top
        side_hidden = hidden
        token = _CURRENT.set(fwd)
        try:
            for i, layer in enumerate(self.base.layers[first_layer:top], start=first_layer):
                if i == side_from:
                    side_hidden = hidden
                hidden = layer(hidden, attention_mask=None, position_embeddings=q_pos)
            if lower_only:
                mem_layer = self.base.layers[cfg.mem_layer]
                normed = mem_layer.input_layernorm(hidden)
                k = mem_layer.self_attn.k_proj(normed)
                fwd.k_pre.clear()
                v = mem_layer.self_attn.v_proj(normed)
                mem_k = k.view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)[:, None]
                mem_v = v.view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)[:, None]
                if fwd.query_layers:  # the memory layer's own queries, rotated as its attention would
                    q = mem_layer.self_attn.q_proj(normed).view(b, s, -1, self.head_dim).transpose(1, 2)
                    q, _ = apply_rotary_pos_emb(q, q, *q_pos)
                    fwd.queries[cfg.mem_layer] = _group_queries(q, self.n_kv_heads)
                out = None
            else:
                mem_k = torch.stack([fwd.mem_kv[i][0] for i in range(len(stored))], dim=1)
                mem_v = torch.stack([fwd.mem_kv[i][1] for i in range(len(stored))], dim=1)
                if side:
                    hidden = self._side_pass(side_hidden, side_from, fwd, memory, read_k, q_pos)
                out = self.base.norm(hidden)
        finally:
            _CURRENT.reset(token)
        stream.tokens_seen += s
        queries = None
        if fwd.query_layers:  # (B, S, L_key * Hkv * D), key layers in order
            queries = torch.cat([fwd.queries[i].permute(0, 2, 1, 3).flatten(2) for i in fwd.query_layers], -1)
        return BlockOutput(hidden=out, mem_k=mem_k, mem_v=mem_v, queries=queries)

    def _side_pass(
        self,
        hidden: torch.Tensor,
        first: int,
        fwd: _Forward,
        memory: Memory,
        mem_k: torch.Tensor,
        q_pos: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """The side reader's pass over layers `first`.. from `hidden`, the first pass's states entering
        layer `first`: each layer's queries attend to memory and to the keys and values the first pass
        recorded there. Caches and stored K/V are the first pass's; this pass changes neither."""
        side = dataclasses.replace(
            fwd,
            memory=memory,
            mem_k=mem_k,
            side=fwd.record,
            record=None,
            k_pre={},
            mem_kv={},
            queries={},
            query_layers=(),
        )
        token = _CURRENT.set(side)
        try:
            for layer in self.base.layers[first:]:
                hidden = layer(hidden, attention_mask=None, position_embeddings=q_pos)
        finally:
            _CURRENT.reset(token)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.hf.lm_head(hidden)
