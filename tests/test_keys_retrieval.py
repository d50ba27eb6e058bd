"""Retrieval by the model's own attention keys (LongMem's token-to-chunk), on a tiny model.

References are computed here from the projections and the rotary table directly, not through the
attention kernel: chunk vectors are the mean pre-RoPE keys of the key layers (the stream's sinks left
out), queries the mean of the previous chunk's queries as rotated when they attend memory, averaged over
the query heads that share a KV head.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from memlong.chunkloop import Reader, records_to_kv
from memlong.errors import InvalidArgument
from tests.factories import RecordingRetriever, SearchSpy, TinyTokenizer, tiny_memlong, tiny_memory


def _tokens(n, seed=0):
    return torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _keys_reader(model):
    retriever = RecordingRetriever()
    tap = SearchSpy(tiny_memory(model, retriever))
    return Reader(model, retriever, TinyTokenizer(), tap), tap, retriever


def _layer0_queries(model, tokens) -> torch.Tensor:
    """(n, Hkv*D) layer-0 queries of each token, rotated to the position its block gives it, averaged
    per KV group. Layer 0 reads embeddings only, so this holds whatever memory the reader attended."""
    cfg, base = model.config, model.base
    ids = torch.tensor([tokens])
    x = base.layers[0].input_layernorm(base.embed_tokens(ids))
    att = base.layers[0].self_attn
    q = att.q_proj(x).view(1, len(tokens), -1, model.head_dim).transpose(1, 2)  # (1, H, n, D)
    pos = torch.tensor([cfg.sink_tokens + cfg.local_window + t % cfg.chunk + 1 for t in range(len(tokens))])
    cos, sin = base.rotary_emb(x, pos[None])
    q, _ = apply_rotary_pos_emb(q, q, cos, sin)
    g = q.shape[1] // model.n_kv_heads
    q = q.view(1, model.n_kv_heads, g, len(tokens), model.head_dim).mean(2)  # (1, Hkv, n, D)
    return q[0].permute(1, 0, 2).reshape(len(tokens), -1)


@torch.no_grad()
def test_chunks_are_their_mean_keys_and_queries_the_previous_chunks_mean_query():
    model = tiny_memlong(chunk=4, window=8, sink_tokens=2)
    toks = _tokens(40, seed=1)
    with model.configured(retrieval="keys", key_layers=(0, 2)):
        reader, tap, retriever = _keys_reader(model)
        reader.score(toks)
        assert retriever.texts == []  # no text is decoded or embedded
        state = tap.memory.export_state()
        assert state["embeddings"].shape == (8, model.key_dim) and model.key_dim == 2 * 2 * 8
        kv = records_to_kv(state["records"], model.kv_record_shape, "float32")  # (n, L, 2, Hkv, c, D)
        for row, chunk_id in enumerate(state["ids"]):
            first = 2 if chunk_id == 0 else 0  # the stream's two sinks are left out of chunk 0
            want = kv[row, [0, 2], 0, :, first:].mean(2).reshape(-1)  # layers 0 and 2, per KV head
            np.testing.assert_allclose(state["embeddings"][row], want.numpy(), atol=1e-5)
    # Queries: with key layer 0 alone the reference needs no attention at all.
    with model.configured(retrieval="keys", key_layers=(0,), key_query_tokens=0, key_query_center=0.0):
        reader, tap, _ = _keys_reader(model)
        reader.score(toks)
        ref = _layer0_queries(model, toks)
        boundaries = range(12, 40, 4)  # chunk [0, 4) leaves the window at 12
        assert len(tap.queries) == len(boundaries)
        for b, query in zip(boundaries, tap.queries, strict=True):
            np.testing.assert_allclose(query[0], ref[b - 4 : b].mean(0).numpy(), atol=1e-5)


@torch.no_grad()
def test_a_prompt_seeds_the_search_with_its_own_queries_and_the_look_ahead_changes_nothing():
    model = tiny_memlong(chunk=4, window=8, sink_tokens=2)
    text, prompt = _tokens(30, seed=2), _tokens(7, seed=3)
    with model.configured(retrieval="keys", key_layers=(0,), key_query_tokens=0, key_query_center=0.0):
        reader, tap, _ = _keys_reader(model)
        reader.score(text)
        twin = reader.fork(tap.memory, writable=False)
        tap.queries.clear()
        got = reader.read_prompt(prompt)
        # 30 + 7 tokens: the prompt's last boundary is at 36; the seeded query is its last 4 tokens,
        # of which 36 is not read yet when the search runs (the look-ahead).
        ref = _layer0_queries(model, text + prompt)
        np.testing.assert_allclose(tap.queries[-1][0], ref[-4:].mean(0).numpy(), atol=1e-5)
        assert reader.position == twin.position + 7 == 37
        assert reader.stream.tokens_seen == 37  # the look-ahead ran on a copy of the local state
        assert torch.isfinite(got).all()


@torch.no_grad()
def test_paper_layout_ingest_records_the_same_queries_as_reading_every_layer():
    model = tiny_memlong(chunk=4, window=8, sink_tokens=2, layout="paper")  # mem_layer 1
    toks = _tokens(44, seed=4)
    with model.configured(retrieval="keys", key_layers=(1,)):
        lower, tap_lower, _ = _keys_reader(model)
        full, tap_full, _ = _keys_reader(model)
        lower.ingest(toks[:40])  # layers 0..1 only after the first chunk
        full.score(toks[:40])
        torch.testing.assert_close(lower._key_history, full._key_history, atol=1e-5, rtol=0)
        np.testing.assert_allclose(
            tap_lower.memory.export_state()["embeddings"],
            tap_full.memory.export_state()["embeddings"],
            atol=1e-5,
        )


def test_retrieval_source_is_part_of_the_layout_and_checked():
    model = tiny_memlong()
    assert model.layout_tag == "per_layer:0,1,2,3"  # text: the tag sessions always had
    with model.configured(retrieval="keys"):  # default: two layers at 40 % depth (paper: the memory layer)
        assert model.layout_tag == "per_layer:0,1,2,3;retrieval=keys:1,2"
        assert model.key_dim == 2 * 2 * 8
    with model.configured(retrieval="keys", key_layers=(2, 0)):
        assert model.layout_tag == "per_layer:0,1,2,3;retrieval=keys:0,2"
        assert model.retrieval_dim(16) == model.key_dim
    with pytest.raises(InvalidArgument, match="retrieval"):
        with model.configured(retrieval="bm25"):
            pass
    with pytest.raises(InvalidArgument, match="key_layers"):  # only stored layers have keys in memory
        with model.configured(retrieval="keys", mem_layers=(1, 2), key_layers=(0,)):
            pass
    paper = tiny_memlong(layout="paper")
    with pytest.raises(InvalidArgument, match="key_layers"):
        with paper.configured(retrieval="keys", key_layers=(3,)):
            pass


@torch.no_grad()
def test_the_query_can_favour_the_last_tokens_and_take_out_the_common_direction():
    model = tiny_memlong(chunk=4, window=8, sink_tokens=2)
    toks = _tokens(32, seed=5)
    with model.configured(retrieval="keys", key_layers=(0,), key_query_tokens=2, key_query_center=0.5):
        reader, tap, _ = _keys_reader(model)
        reader.score(toks)
        ref = _layer0_queries(model, toks)
        for b, query in zip(range(12, 32, 4), tap.queries, strict=True):
            want = ref[b - 2 : b].mean(0) - 0.5 * ref[b - 4 : b].mean(0)
            np.testing.assert_allclose(query[0], want.numpy(), atol=1e-5)
    for bad in ({"key_query_tokens": 5}, {"key_query_center": float("nan")}, {"key_query_center": -0.1}):
        with pytest.raises(InvalidArgument, match="key_query"):
            with model.configured(**bad):
                pass
