"""Retrieval causal attention against stock transformers and a naive reference."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from memlong.model import MemLongConfig, MemLongModel, Memory
from tests.factories import tiny_llama, tiny_memlong


def naive_forward(model: MemLongModel, ids: torch.Tensor, window: int, mem: Memory | None) -> torch.Tensor:
    """Logits by explicit math: sliding-window softmax over [memory at position 0 ; tokens at 1..L]."""
    base, cfg = model.base, model.config
    b, length = ids.shape
    x = base.embed_tokens(ids)
    pos = torch.arange(1, length + 1)[None].expand(b, length)
    cos, sin = base.rotary_emb(x, pos)
    qi = torch.arange(length)[:, None]
    kj = torch.arange(length)[None, :]
    local_ok = (kj <= qi) & (kj >= qi - window)  # (L, L)
    for li, layer in enumerate(base.layers):
        att = layer.self_attn
        h = layer.input_layernorm(x)
        hd = model.head_dim
        q = att.q_proj(h).view(b, length, -1, hd).transpose(1, 2)
        k = att.k_proj(h).view(b, length, -1, hd).transpose(1, 2)
        v = att.v_proj(h).view(b, length, -1, hd).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        g = q.shape[1] // k.shape[1]
        scores = q @ k.repeat_interleave(g, 1).transpose(-1, -2) / math.sqrt(hd)  # (B, H, L, L)
        scores = scores.masked_fill(~local_ok, float("-inf"))
        vals = v.repeat_interleave(g, 1)
        if mem is not None and li in cfg.ret_attn_layers:
            mk = mem.k.repeat_interleave(g, 1)  # unrotated = position 0
            ms = q @ mk.transpose(-1, -2) / math.sqrt(hd)  # (B, H, L, M)
            ms = ms.masked_fill(~mem.mask[:, None].expand(b, 1, length, mk.shape[2]), float("-inf"))
            scores = torch.cat([ms, scores], dim=-1)
            vals = torch.cat([mem.v.repeat_interleave(g, 1), vals], dim=2)
        o = torch.softmax(scores, dim=-1) @ vals  # (B, H, L, D)
        x = x + att.o_proj(o.transpose(1, 2).reshape(b, length, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.hf.lm_head(base.norm(x))


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


@pytest.mark.parametrize("block", [1, 3, 8, 40])
def test_blockwise_equals_one_sliding_window_forward(block):
    model = tiny_memlong(window=6)
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = naive_forward(model, ids, window=6, mem=None)
        stream = model.new_stream()
        parts = [
            model.logits(model.forward_block(ids[:, i : i + block], stream).hidden)
            for i in range(0, 40, block)
        ]
    torch.testing.assert_close(torch.cat(parts, dim=1), want, atol=1e-5, rtol=0)


def test_memory_attention_equals_naive_reference_gqa():
    model = tiny_memlong(window=64, n_heads=4, n_kv_heads=2)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (2, 12), generator=g)
    m = 10
    mem = Memory(
        k=torch.randn(2, 2, m, 8, generator=g),
        v=torch.randn(2, 2, m, 8, generator=g),
        mask=torch.tensor([[True] * m, [True] * 6 + [False] * 4])[:, None, :],  # row 2 has 4 padding slots
    )
    with torch.no_grad():
        want = naive_forward(model, ids, window=64, mem=mem)
        got = model.logits(model.forward_block(ids, model.new_stream(), memory=mem).hidden)
        without = model.logits(model.forward_block(ids, model.new_stream()).hidden)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - without).abs().max() > 1e-3  # memory really changes the output


def test_memory_keys_are_the_memory_layer_k_before_rope():
    model = tiny_memlong(window=64)
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
    assert full.mem_k.shape == (1, 2, 8, 8)  # (B, Hkv, S, D): KV-head count, not query heads
    assert lower.hidden is None and h.shape == (1, 8, 32)
    # Stored keys are the plain k_proj output of the memory layer: no rotary applied.
    torch.testing.assert_close(full.mem_k, stock_k[0].view(1, 8, 2, 8).transpose(1, 2), atol=1e-6, rtol=0)
    torch.testing.assert_close(lower.mem_k, full.mem_k, atol=1e-6, rtol=0)
    torch.testing.assert_close(lower.mem_v, full.mem_v, atol=1e-6, rtol=0)


def test_config_rejects_bad_settings():
    from memlong.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="ret_attn_layers"):
        MemLongConfig(mem_layer=5, ret_attn_layers=(3,))
    with pytest.raises(InvalidArgument, match="bogus"):
        MemLongConfig.from_dict({"bogus": 1})
    with pytest.raises(InvalidArgument, match="ret_attn_layers"):
        MemLongModel(tiny_llama(), MemLongConfig(mem_layer=1, ret_attn_layers=(9,)))
