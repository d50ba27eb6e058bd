"""Retrieval causal attention against stock transformers and a naive reference."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from memlong.errors import InvalidArgument
from memlong.model import MemLongConfig, MemLongModel, Memory
from tests.factories import tiny_llama, tiny_memlong


def naive_forward(
    model: MemLongModel, ids: torch.Tensor, window: int, mem: Memory | None, side: bool = False
) -> torch.Tensor:
    """Logits by explicit math, one query at a time.

    Query t sits at position n_sink + window + (t mod chunk) + 1 and sees: the window keys u in
    [t-window, t] at their true distance behind it; sinks j < n_sink that left its window, at position
    j+1; memory (reading layers) unrotated, at position 0, or at 1-M..0 ("prefix"); memory inserted
    before stream index `anchor` (read from there on) at stream indices anchor-M.., with every local key
    and sink before the anchor M positions further back. One softmax.
    side=True (the side reader): a memory-free pass supplies every layer's keys and values; a second
    residual stream's queries attend to them and memory, and its states give the logits.
    """
    base, cfg = model.base, model.config
    b, length = ids.shape
    hd, n_sink, c = model.head_dim, cfg.sink_tokens, cfg.chunk
    x = base.embed_tokens(ids)

    def rope(v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # v (B, h, n, D), pos (n,)
        cos, sin = base.rotary_emb(x, pos[None].expand(b, -1))
        return apply_rotary_pos_emb(v, v, cos, sin)[0]

    def attend(li: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mem: Memory | None):
        g = q.shape[1] // k.shape[1]
        outs = []
        for t in range(length):
            p_t = n_sink + window + t % c + 1
            local = torch.arange(max(0, t - window), t + 1)
            sinks = torch.arange(min(n_sink, max(0, t - window)))
            read = cfg.read_index(len(base.layers))
            reads = mem is not None and li in read and (mem.anchor is None or t >= mem.anchor)
            # inserted memory: M slots at stream index anchor-M.., local keys before the anchor M back
            back = mem.k.shape[3] if reads and mem.anchor is not None else 0
            pos = p_t - (t - local) - back * (local < (mem.anchor if back else 0))
            sink_pos = sinks + 1 - back * (sinks < (mem.anchor if back else 0))
            keys = [rope(k[:, :, sinks], sink_pos), rope(k[:, :, local], pos)]
            vals = [v[:, :, sinks], v[:, :, local]]
            valid = [torch.ones(b, len(sinks) + len(local), dtype=torch.bool)]
            if reads:
                mk = mem.k[:, read[li]]
                if mem.anchor is not None:
                    slots = torch.arange(mem.anchor - back, mem.anchor)
                    mk = rope(mk, p_t - (t - slots))
                elif cfg.mem_position == "prefix":  # the retrieved chunks read as the text before the window
                    mk = rope(mk, torch.arange(1 - mk.shape[2], 1))
                keys.insert(0, mk)
                vals.insert(0, mem.v[:, read[li]])
                valid.insert(0, mem.mask[:, min(t, mem.mask.shape[1] - 1)])
            kk = torch.cat(keys, 2).repeat_interleave(g, 1)
            vv = torch.cat(vals, 2).repeat_interleave(g, 1)
            qt = rope(q[:, :, t : t + 1], torch.tensor([p_t]))
            scores = (qt @ kk.transpose(-1, -2)) / math.sqrt(hd)  # (B, H, 1, keys)
            scores = scores.masked_fill(~torch.cat(valid, 1)[:, None, None], float("-inf"))
            outs.append(torch.softmax(scores, -1) @ vv)  # (B, H, 1, D)
        return torch.cat(outs, 2).transpose(1, 2).reshape(b, length, -1)

    def project(proj: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:  # (B, heads, L, D) before RoPE
        return proj(h).view(b, length, -1, hd).transpose(1, 2)

    def mlp(layer, x: torch.Tensor) -> torch.Tensor:
        return x + layer.mlp(layer.post_attention_layernorm(x))

    xs = x  # the side stream
    for li, layer in enumerate(base.layers):
        att = layer.self_attn
        h = layer.input_layernorm(x)
        q, k, v = project(att.q_proj, h), project(att.k_proj, h), project(att.v_proj, h)
        if side:
            qs = project(att.q_proj, layer.input_layernorm(xs))
            xs = mlp(layer, xs + att.o_proj(attend(li, qs, k, v, mem)))
        x = mlp(layer, x + att.o_proj(attend(li, q, k, v, None if side else mem)))
    return model.hf.lm_head(base.norm(xs if side else x))


def _random_memory(g: torch.Generator, n_mem: int, m: int, valid: int, anchor: int | None = None) -> Memory:
    """Memory of m slots for a batch of 2 (2 KV heads, head dim 8): row 1 all valid, row 2 its first
    `valid` slots (the rest padding)."""
    return Memory(
        k=torch.randn(2, n_mem, 2, m, 8, generator=g),
        v=torch.randn(2, n_mem, 2, m, 8, generator=g),
        mask=torch.tensor([[True] * m, [True] * valid + [False] * (m - valid)])[:, None, :],
        anchor=anchor,
    )


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
def test_empty_memory_equals_stock_transformers(heads):
    stock = tiny_llama(n_heads=heads[0], n_kv_heads=heads[1])
    model = MemLongModel(
        copy.deepcopy(stock),
        MemLongConfig(mem_layer=1, ret_attn_layers=(1, 3), chunk=4, local_window=64, memory_size=64),
    )
    stock.config._attn_implementation = "sdpa"
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = stock(ids).logits
        out = model.forward_block(ids, model.new_stream())
        got = model.logits(out.hidden)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("sinks", [0, 3])
@pytest.mark.parametrize("block", [1, 3, 8])
def test_blockwise_equals_one_sliding_window_forward(block, sinks):
    # Blocks split at chunk boundaries (chunk 8), as the Reader's do; the reference reads per token.
    model = tiny_memlong(chunk=8, window=6, sink_tokens=sinks)
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = naive_forward(model, ids, window=6, mem=None)
        stream = model.new_stream()
        parts = []
        t = 0
        while t < 40:
            step = min(block, 8 - t % 8, 40 - t)
            parts.append(model.logits(model.forward_block(ids[:, t : t + step], stream).hidden))
            t += step
    torch.testing.assert_close(torch.cat(parts, dim=1), want, atol=1e-5, rtol=0)


def test_sinks_keep_a_long_text_readable_and_are_not_counted_twice():
    model = tiny_memlong(chunk=4, window=4, sink_tokens=2)
    ids = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        stream = model.new_stream()
        model.forward_block(ids[:, :4], stream)
        cache = stream.caches[0]
        assert cache.sinks == 2 and cache.seen == 4
        # Token 5 sees 1..5 in its window: sink 0 has left it, sink 1 has not.
        from memlong.model import _sink_mask

        assert _sink_mask(2, 4, 2, 4, torch.device("cpu")).tolist() == [[False, False], [True, False]]


@pytest.mark.parametrize("position", ["zero", "prefix"])
@pytest.mark.parametrize("layout", ["per_layer", "paper"])
def test_memory_attention_equals_naive_reference_gqa(layout, position):
    model = tiny_memlong(window=6, n_heads=4, n_kv_heads=2, sink_tokens=2, chunk=4, layout=layout)
    model.config = dataclasses.replace(model.config, mem_position=position)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (2, 12), generator=g)
    m, n_mem = 10, len(model.memory_layers)  # per_layer: every layer reads its own slice
    mem = _random_memory(g, n_mem, m, valid=6)  # row 2: 4 padding slots
    with torch.no_grad():
        want = naive_forward(model, ids, window=6, mem=mem)
        with_mem, no_mem = model.new_stream(), model.new_stream()
        got = torch.cat(
            [
                model.logits(model.forward_block(ids[:, t : t + 4], with_mem, memory=mem).hidden)
                for t in range(0, 12, 4)
            ],
            dim=1,
        )
        without = torch.cat(
            [model.logits(model.forward_block(ids[:, t : t + 4], no_mem).hidden) for t in range(0, 12, 4)],
            dim=1,
        )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - without).abs().max() > 1e-3  # memory really changes the output


@pytest.mark.parametrize("position", ["zero", "prefix"])
def test_side_reader_equals_naive_reference(position):
    # A memory-free pass supplies keys, values, the caches and the stored K/V; a second pass's queries
    # read them and memory. Blocks 3 + 1 + 4 + 4: mid-chunk cuts too.
    model = tiny_memlong(window=6, n_heads=4, n_kv_heads=2, sink_tokens=2, chunk=4)
    model.config = dataclasses.replace(model.config, mem_position=position, reader="side")
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 97, (2, 12), generator=g)
    m, n_mem = 10, len(model.memory_layers)
    mem = _random_memory(g, n_mem, m, valid=6)  # row 2: 4 padding slots
    with torch.no_grad():
        want = naive_forward(model, ids, window=6, mem=mem, side=True)
        plain = naive_forward(model, ids, window=6, mem=None)
        with_mem, no_mem, parts, stored, free = model.new_stream(), model.new_stream(), [], [], []
        for t, end in itertools.pairwise([0, 3, 4, 8, 12]):
            out = model.forward_block(ids[:, t:end], with_mem, memory=mem)
            parts.append(model.logits(out.hidden))
            stored.append(out.mem_k)
            free.append(model.forward_block(ids[:, t:end], no_mem).mem_k)
    torch.testing.assert_close(torch.cat(parts, dim=1), want, atol=1e-5, rtol=0)
    assert (want - plain).abs().max() > 1e-3  # memory really changes the output
    # what it stores and keeps in its window is the memory-free pass's, bit for bit
    torch.testing.assert_close(torch.cat(stored, 3), torch.cat(free, 3), atol=0, rtol=0)
    for a, b in zip(with_mem.caches, no_mem.caches, strict=True):
        torch.testing.assert_close(a.k, b.k, atol=0, rtol=0)
        torch.testing.assert_close(a.sink_v, b.sink_v, atol=0, rtol=0)


@pytest.mark.parametrize("anchor", [10, 1])  # mid-chunk, as a prompt seeded mid-chunk is; between sinks
@pytest.mark.parametrize("layout", ["per_layer", "paper"])
def test_inserted_memory_equals_naive_reference(layout, anchor):
    model = tiny_memlong(window=6, n_heads=4, n_kv_heads=2, sink_tokens=2, chunk=4, layout=layout)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 97, (2, 16), generator=g)
    m, n_mem = 8, len(model.memory_layers)
    mem = _random_memory(g, n_mem, m, valid=5, anchor=anchor)  # row 2: 3 padding slots
    with torch.no_grad():
        want = naive_forward(model, ids, window=6, mem=mem)
        stream, parts = model.new_stream(), []
        cuts = sorted({0, 4, 8, 12, 16, anchor})
        for t, end in itertools.pairwise(cuts):
            block = ids[:, t:end]
            read = mem if t >= mem.anchor else None
            parts.append(model.logits(model.forward_block(block, stream, memory=read).hidden))
    torch.testing.assert_close(torch.cat(parts, dim=1), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("sinks", [0, 2])
def test_inserted_memory_reads_as_the_text_it_was_computed_in(sinks):
    # A text's first chunks, stored by one reader and inserted before a fresh reader's first token, give
    # that reader the logits the first reader had for the rest of the text (all inside one window).
    model = tiny_memlong(window=32, sink_tokens=sinks, chunk=4)
    ids = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        first, ks, vs, want = model.new_stream(), [], [], []
        for t in range(0, 16, 4):
            out = model.forward_block(ids[:, t : t + 4], first)
            ks.append(out.mem_k)
            vs.append(out.mem_v)
            want.append(model.logits(out.hidden))
        mem = Memory(
            k=torch.cat(ks[:2], 3), v=torch.cat(vs[:2], 3), mask=torch.ones(1, 1, 8, dtype=torch.bool)
        )
        fresh = model.new_stream()
        got = [
            model.logits(
                model.forward_block(
                    ids[:, t : t + 4], fresh, memory=dataclasses.replace(mem, anchor=0)
                ).hidden
            )
            for t in (8, 12)
        ]
        zero = model.logits(model.forward_block(ids[:, 8:12], model.new_stream(), memory=mem).hidden)
    torch.testing.assert_close(torch.cat(got, 1), torch.cat(want[2:], 1), atol=1e-5, rtol=0)
    assert (zero - want[2]).abs().max() > 1e-3  # at position 0 the same memory reads otherwise


def test_memory_keys_are_the_memory_layer_k_before_rope():
    model = tiny_memlong(window=64, layout="paper")
    ids = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model.forward_block(ids, model.new_stream())
        lower = model.forward_block(ids, model.new_stream(), lower_only=True)
        h = model.base.embed_tokens(ids)
        stock_k = []
        hook = model.base.layers[1].self_attn.k_proj.register_forward_hook(lambda m, i, o: stock_k.append(o))
        model.hf.config._attn_implementation = "sdpa"
        model.hf(ids)
        model.hf.config._attn_implementation = "memlong"
        hook.remove()
    assert full.mem_k.shape == (1, 1, 2, 8, 8)  # (B, L_mem, Hkv, S, D): KV-head count, not query heads
    assert lower.hidden is None and h.shape == (1, 8, 32)
    # Stored keys are the plain k_proj output of the memory layer: no rotary applied.
    want = stock_k[0].view(1, 8, 2, 8).transpose(1, 2)[:, None]
    torch.testing.assert_close(full.mem_k, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(lower.mem_k, full.mem_k, atol=1e-6, rtol=0)
    torch.testing.assert_close(lower.mem_v, full.mem_v, atol=1e-6, rtol=0)


def test_per_layer_memory_stores_every_layer_k_before_rope():
    model = tiny_memlong(window=64)
    ids = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(4))
    stock_k: dict[int, torch.Tensor] = {}
    hooks = [
        layer.self_attn.k_proj.register_forward_hook(lambda m, i, o, li=li: stock_k.__setitem__(li, o))
        for li, layer in enumerate(model.base.layers)
    ]
    with torch.no_grad():
        model.hf.config._attn_implementation = "sdpa"
        model.hf(ids)
        model.hf.config._attn_implementation = "memlong"
    for h in hooks:
        h.remove()
    with torch.no_grad():
        out = model.forward_block(ids, model.new_stream())
    assert out.mem_k.shape == (1, 4, 2, 8, 8) and model.kv_record_shape == (4, 2, 2, 4, 8)
    for li in range(4):
        torch.testing.assert_close(out.mem_k[:, li], stock_k[li].view(1, 8, 2, 8).transpose(1, 2))
    with pytest.raises(InvalidArgument, match="lower_only"):
        model.forward_block(ids, model.new_stream(), lower_only=True)


def test_config_rejects_bad_settings():
    with pytest.raises(InvalidArgument, match="ret_attn_layers"):
        MemLongConfig(mem_layer=5, ret_attn_layers=(3,))
    with pytest.raises(InvalidArgument, match="bogus"):
        MemLongConfig.from_dict({"bogus": 1})
    with pytest.raises(InvalidArgument, match="ret_attn_layers"):
        MemLongModel(tiny_llama(), MemLongConfig(layout="paper", mem_layer=1, ret_attn_layers=(9,)))
    with pytest.raises(InvalidArgument, match="layout"):
        MemLongConfig(layout="cross")
    with pytest.raises(InvalidArgument, match="reader"):
        MemLongConfig(reader="both")
    with pytest.raises(InvalidArgument, match="prompt_query_tokens"):
        MemLongConfig(prompt_query_tokens=-1)
    assert MemLongConfig(chunk=16).prompt_query_tokens == 32  # a span longer than a chunk is fine
    with pytest.raises(InvalidArgument, match="reader"):
        MemLongConfig(layout="paper", reader="side")
    with pytest.raises(InvalidArgument, match="prompt_insert"):
        MemLongConfig(reader="side", prompt_insert=True)
    with pytest.raises(InvalidArgument, match="mem_layers"):
        MemLongModel(tiny_llama(), MemLongConfig(mem_layers=(0, 7)))
