"""The chunk loop on a tiny model: ingest, score and generate against references."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from memlong.chunkloop import Reader, SamplingParams, records_to_kv
from tests.factories import RecordingRetriever, SearchSpy, TinyTokenizer, tiny_memlong, tiny_memory
from tests.test_model import naive_forward


def _reader(model, memory=True, retriever=None):
    retriever = retriever or RecordingRetriever()
    mem = tiny_memory(model, retriever) if memory else None
    return Reader(model, retriever, TinyTokenizer(), mem)


def _tokens(n, seed=0):
    return torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_scoring_without_memory_equals_one_sliding_window_forward():
    model = tiny_memlong(chunk=4, window=8)
    toks = _tokens(50)
    got = _reader(model, memory=False).score(toks)
    with torch.no_grad():
        logp = torch.log_softmax(naive_forward(model, torch.tensor([toks]), window=8, mem=None)[0], -1)
    want = logp[:-1].gather(1, torch.tensor(toks[1:])[:, None])[:, 0]
    assert torch.isnan(got[0])
    torch.testing.assert_close(got[1:], want, atol=1e-5, rtol=0)


def test_chunks_enter_memory_only_after_leaving_the_window_and_queries_are_causal():
    model = tiny_memlong(chunk=4, window=8)
    retriever = RecordingRetriever()
    reader = _reader(model, retriever=retriever)
    queries = []
    search = reader.memory.search
    reader.memory.search = lambda q, k: queries.append(q.copy()) or search(q, k)
    toks = _tokens(40, seed=1)
    reader.score(toks)
    # 40 tokens read, window 8: chunks [0,4) .. [28,32) have left the window -> 8 chunks stored.
    assert reader.stats.chunks_stored == 8 and len(reader.memory) == 8
    # One retrieval per chunk boundary once memory is non-empty: chunk [0,4) leaves the window of the
    # token at 12 (which sees 4..12), so boundaries 12, 16, ..., 36.
    assert reader.stats.retrievals == len(queries) == 7
    for boundary, query in zip(range(12, 40, 4), queries, strict=True):
        want = retriever.embed(
            [TinyTokenizer().decode(toks[boundary - 4 : boundary])]
        )  # text before the chunk
        np.testing.assert_array_equal(query, want)


def test_ingest_stores_the_same_memory_as_scoring():
    model = tiny_memlong(chunk=4, window=8)
    toks = _tokens(64, seed=2)
    a, b = _reader(model), _reader(model)
    a.ingest(toks)
    b.score(toks)
    ids = a.memory.ids()
    assert (ids == b.memory.ids()).all() and len(ids) == 14
    ra, _ = a.memory.fetch(ids)
    rb, _ = b.memory.fetch(ids)
    torch.testing.assert_close(
        records_to_kv(ra, model.kv_record_shape, "float32"),
        records_to_kv(rb, model.kv_record_shape, "float32"),
        atol=1e-5,
        rtol=0,
    )


def test_memory_changes_predictions_and_flush_stores_the_partial_tail():
    model = tiny_memlong(chunk=4, window=8)
    toks = _tokens(46, seed=3)
    with_mem, without = _reader(model), _reader(model, memory=False)
    lp_mem, lp_loc = with_mem.score(toks), without.score(toks)
    torch.testing.assert_close(
        lp_mem[1:13], lp_loc[1:13], atol=1e-5, rtol=0
    )  # memory empty before position 12
    assert (lp_mem[13:] - lp_loc[13:]).abs().max() > 1e-4
    with_mem.flush()
    assert len(with_mem.memory) == 12  # 11 full chunks + a 2-token tail
    _, lengths = with_mem.memory.fetch(with_mem.memory.ids()[-1:])
    assert lengths.tolist() == [2]


def test_greedy_generation_matches_scoring_and_retrieves_once_per_chunk():
    model = tiny_memlong(chunk=4, window=8)
    prompt = _tokens(30, seed=4)
    gen_reader = _reader(model)
    out = list(gen_reader.generate(prompt, SamplingParams(max_new_tokens=10)))
    assert len(out) == 10
    retrievals_prompt = _reader(model)
    retrievals_prompt.score(prompt)
    # 10 new tokens from position 30 cross boundaries 32, 36 (40 is never read: the 10th token is not fed).
    assert gen_reader.stats.retrievals - retrievals_prompt.stats.retrievals == 2
    # Teacher-forced: each generated token is the argmax after scoring the prompt and the tokens before it.
    for j, token in enumerate(out):
        check = _reader(model)
        check.score(prompt + out[:j])
        assert int(torch.argmax(check._last_logp)) == token


def test_sampling_is_seeded_and_stops():
    model = tiny_memlong(chunk=4, window=8)
    prompt = _tokens(12, seed=5)
    p = SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, top_k=20, seed=7)
    a = list(_reader(model).generate(prompt, p))
    b = list(_reader(model).generate(prompt, p))
    assert a == b
    stop = a[3]
    c = list(_reader(model).generate(prompt, SamplingParams(**{**p.__dict__, "stop_token_ids": (stop,)})))
    assert c == a[: a.index(stop) + 1]


def test_a_chunk_queried_before_it_is_stored_is_embedded_once():
    from collections import Counter

    model = tiny_memlong(chunk=4, window=8)
    retriever = RecordingRetriever()
    reader = _reader(model, retriever=retriever)
    toks = _tokens(60, seed=6)
    reader.score(toks)
    assert reader.stats.retrievals > 5 and reader.stats.chunks_stored > 5
    assert max(Counter(retriever.texts).values()) == 1  # the query's embedding is reused for the store
    ids = reader.memory.ids()
    texts = [TinyTokenizer().decode(toks[4 * i : 4 * i + 4]) for i in ids]
    stored = reader.memory.export_state()["embeddings"]
    np.testing.assert_array_equal(stored, RecordingRetriever().embed(texts))  # what a fresh embed gives


def _assert_same_caches(a, b, layers):
    for li in layers:
        ca, cb = a.stream.caches[li], b.stream.caches[li]
        assert ca.seen == cb.seen, li
        for name in ("k", "v", "sink_k", "sink_v"):
            torch.testing.assert_close(getattr(ca, name), getattr(cb, name), atol=1e-5, rtol=0, msg=name)


def _continued_reads_as_one_pass(model, toks, split: int, first_call):
    """A reader given `toks[:split]` by `first_call(reader, tokens)` and then scoring the rest gives the
    log-probs and the caches (every layer) of one reader scoring all of `toks`. Returns both readers."""
    two, one = _reader(model), _reader(model)
    first_call(two, toks[:split])
    lp_two = two.score(toks[split:])
    lp_one = one.score(toks)
    torch.testing.assert_close(lp_two[1:], lp_one[split + 1 :], atol=1e-5, rtol=0)
    _assert_same_caches(two, one, range(4))
    return two, one


@pytest.mark.parametrize("split", [48, 50])  # on a chunk boundary, inside a chunk
@pytest.mark.parametrize("reader", ["stream", "side"])
def test_ingest_then_score_equals_one_pass_of_score_at_every_layer(reader, split):
    # "stream": upper layers read memory, so what they store depends on retrieval; ingest reads exactly
    # as scoring does (without the LM head). "side": ingest runs only the memory-free pass that scoring
    # stores and keeps too, and retrieves nothing; scoring that resumes inside a chunk retrieves with the
    # text before its boundary, as one pass did there. Either way the two paths agree at every layer.
    model = tiny_memlong(chunk=4, window=8)
    model.config = dataclasses.replace(model.config, reader=reader)
    toks = _tokens(72, seed=7)

    def ingest(reader, first):
        reader.ingest(first)
        _assert_same_caches(reader, _scored(model, first), range(4))

    two, one = _continued_reads_as_one_pass(model, toks, split, ingest)
    assert one.stats.retrievals > 10
    assert (two.stats.retrievals < one.stats.retrievals) == (reader == "side")
    _assert_same_memory(two, one, model)


@pytest.mark.parametrize("split", [20, 22])  # on a chunk boundary, inside a chunk
def test_under_the_served_reading_calls_cut_anywhere_read_as_one_call(split):
    # Served: ingest reads no memory, so ingesting a text then scoring more is not scoring it all (the
    # test above); but however the same calls are cut, the session reads the same: logits, every layer's
    # caches, and the memory stored.
    model = tiny_memlong(chunk=4, window=8, ingest_memory=False)
    toks = _tokens(72, seed=7)
    one = _reader(model)
    one.ingest(toks[:48])
    lp_one = one.score(toks[48:])
    two = _reader(model)
    two.ingest(toks[:split])
    two.ingest(toks[split:48])
    lp_two = torch.cat([two.score(toks[48 : 48 + split - 8]), two.score(toks[48 + split - 8 :])])
    assert lp_one[0].isnan() and lp_two[0].isnan()  # an ingest leaves the next token unscored
    torch.testing.assert_close(lp_two[1:], lp_one[1:], atol=1e-5, rtol=0)
    _assert_same_caches(two, one, range(4))
    assert one.stats.retrievals > 3 and two.stats.retrievals == one.stats.retrievals
    _assert_same_memory(two, one, model)


def _assert_same_memory(a, b, model):
    ids = b.memory.ids()
    assert (a.memory.ids() == ids).all()
    torch.testing.assert_close(
        records_to_kv(a.memory.fetch(ids)[0], model.kv_record_shape, "float32"),
        records_to_kv(b.memory.fetch(ids)[0], model.kv_record_shape, "float32"),
        atol=1e-5,
        rtol=0,
    )


def _scored(model, toks):
    reader = _reader(model)
    reader.score(toks)
    return reader


def test_paper_ingest_keeps_the_true_sinks_of_every_layer():
    # The paper layout ingests cheaply (layers 0..mem_layer after the first chunk); the layers above it
    # still hold the text's true first tokens as sinks, and the lower layers equal one pass exactly.
    model = tiny_memlong(chunk=4, window=8, layout="paper")
    toks = _tokens(40, seed=8)
    ingested, scored = _reader(model), _scored(model, toks)
    ingested.ingest(toks)
    for li in range(4):
        ca, cb = ingested.stream.caches[li], scored.stream.caches[li]
        torch.testing.assert_close(ca.sink_k, cb.sink_k, atol=1e-5, rtol=0)
    _assert_same_caches(ingested, scored, range(model.config.mem_layer))
    # The upper layers drop their stale window on the next full read and keep their sinks.
    ingested.score(_tokens(4, seed=9))
    upper = ingested.stream.caches[3]
    assert upper.seen == 44 and upper.length == 4
    torch.testing.assert_close(upper.sink_k, scored.stream.caches[3].sink_k, atol=1e-5, rtol=0)


def test_a_forked_reader_never_writes_the_shared_memory():
    model = tiny_memlong(chunk=4, window=8)
    base = _reader(model)
    base.ingest(_tokens(40, seed=10))
    before = base.memory.ids().tolist()
    fork = base.fork(base.memory)
    fork.score(_tokens(24, seed=11))
    assert fork.stats.chunks_stored > 0 and base.memory.ids().tolist() == before
    # ... yet the fork retrieves its own chunks as if they were stored (the same as an unshared copy)
    alone = _reader(model)
    alone.ingest(_tokens(40, seed=10))
    torch.testing.assert_close(
        alone.score(_tokens(24, seed=11)), fork_again(base, 11), atol=1e-5, rtol=0, equal_nan=True
    )


def fork_again(base, seed):
    return base.fork(base.memory).score(_tokens(24, seed=seed))


def test_a_session_continued_after_a_flush_reads_as_one_pass():
    # A served session stores everything at the end of a call (durability) but keeps its window: the
    # chunks still inside the window stay out of retrieval until they leave it, so the next call reads
    # exactly as one pass over both texts would (text ending on a chunk boundary).
    model = tiny_memlong(chunk=4, window=8)

    def served_call(reader, first):
        reader.ingest(first)
        reader.flush(keep_window=True)
        assert len(reader.memory) == len(first) // 4  # everything is in memory after the call

    _continued_reads_as_one_pass(model, _tokens(80, seed=12), 44, served_call)


class _LoggedMemory:
    """A memory that logs its calls in order; with `ahead=True` it also searches in the background
    (`search_async`, on a thread), as the ret-mem port does."""

    def __init__(self, memory, ahead: bool) -> None:
        self.memory, self.log = memory, []
        self.started, self.cancelled = [], []  # searches started ahead; those given up
        if not ahead:
            self.search_async = None

    def append(self, ids, embeddings, records, lengths):
        self.log.append(("append", int(ids[0]), int(ids[-1])))
        return self.memory.append(ids, embeddings, records, lengths)

    def search(self, queries, top_k):
        self.log.append(("search", queries.tobytes()))
        return self.memory.search(queries, top_k)

    def search_async(self, make_queries, top_k, then):
        pool = concurrent.futures.ThreadPoolExecutor(1)
        future = pool.submit(lambda: then(self.search(make_queries(), top_k)))
        pool.shutdown(wait=False)
        search = SimpleNamespace(work_s=0.0, result=future.result)
        search.cancel = lambda: self.cancelled.append(search)
        self.started.append(search)
        return search


@pytest.mark.parametrize("start", [0, 2])  # the score starts on a chunk boundary, or inside a chunk
def test_retrieval_started_a_chunk_ahead_answers_as_at_the_boundary(start):
    # Reading known text, the next boundary's query is the chunk being computed: its search runs while
    # the model works, after the chunks leaving the window were stored. Same calls to memory in the same
    # order, same log-probs and memory as retrieving at each boundary.
    model = tiny_memlong(chunk=4, window=8)
    toks = _tokens(60, seed=14)
    runs = {}
    for ahead in (False, True):
        retriever = RecordingRetriever()
        memory = _LoggedMemory(tiny_memory(model, retriever), ahead)
        reader = Reader(model, retriever, TinyTokenizer(), memory)
        reader.ingest(toks[: 24 + start], more=True)  # the score continues its text
        logp = reader.score(toks[24 + start :])
        runs[ahead] = (memory.log, logp, reader.stats, memory.memory.ids())
    (log0, lp0, st0, ids0), (log1, lp1, st1, ids1) = runs[False], runs[True]
    assert log1 == log0 and st1.retrievals == st0.retrievals > 8
    torch.testing.assert_close(lp1, lp0, atol=0, rtol=0, equal_nan=True)  # first: NaN after an ingest
    assert (ids0 == ids1).all()
    assert st0.prefetched == 0 and st1.prefetch_unused == 0
    assert st1.prefetched == st1.retrievals  # every one started a chunk ahead (more=True chains calls)


def test_a_search_started_ahead_that_answers_no_boundary_is_cancelled():
    """Given up, not left running: one whose boundary asks another query (a given prompt), one still
    open when the state is flushed, and one open when the reader is put aside."""
    model = tiny_memlong(chunk=4, window=8)
    toks = _tokens(60, seed=15)
    retriever = RecordingRetriever()
    memory = _LoggedMemory(tiny_memory(model, retriever), ahead=True)
    reader = Reader(model, retriever, TinyTokenizer(), memory)
    reader.ingest(toks[:24], more=True)  # the text goes on: the search for chunk 24's boundary starts
    ahead = memory.started[-1]
    assert memory.cancelled == []
    reader.read_prompt(toks[24:27])  # the prompt is the boundary's query: the search ahead answers no one
    assert memory.cancelled == [ahead] and reader.stats.prefetch_unused == 1
    reader.ingest(toks[27:32], more=True)
    reader.flush()  # the state it was started for is gone
    assert memory.cancelled == [ahead, memory.started[-1]]
    flushed = memory.cancelled[-1]
    reader.ingest(toks[32:44], more=True)  # the searches started ahead within it answer their boundaries
    reader.cancel_prefetch()  # e.g. the reader kept for the session's next call
    assert memory.cancelled == [ahead, flushed, memory.started[-1]]
    reader.cancel_prefetch()  # nothing open: a no-op
    assert len(memory.cancelled) == 3 and reader.stats.prefetch_unused == 1


# Fixed logits, best tokens not first (a sampler that keeps the first k indices is caught).
SAMPLING_LOGITS = [0.5, -1.0, 2.0, 0.1, 1.2, -0.4, 1.6, 0.9]


def _truncated_distribution(logits: list[float], top_k: int, top_p: float, temperature: float) -> list[float]:
    """The reference, in plain Python: softmax(logits / temperature); keep the top_k most likely (0: all),
    renormalise; keep the most likely tokens while the mass before each is under top_p; renormalise."""
    e = [math.exp((x - max(logits)) / temperature) for x in logits]
    p = [x / sum(e) for x in e]
    ranked = sorted(range(len(p)), key=lambda i: -p[i])
    kept = ranked[:top_k] if top_k else ranked
    mass = sum(p[i] for i in kept)
    nucleus, before = [], 0.0
    for i in kept:
        if before >= top_p:
            break
        nucleus.append(i)
        before += p[i] / mass
    total = sum(p[i] for i in nucleus)
    return [p[i] / total if i in nucleus else 0.0 for i in range(len(p))]


@pytest.mark.parametrize(
    "top_k, top_p, temperature",
    [
        (0, 1.0, 1.0),  # no truncation
        (3, 1.0, 1.0),  # top-k alone
        (0, 0.7, 1.0),  # top-p alone
        (0, 0.8, 2.0),  # top-p after the temperature: 6 tokens here, 4 on the untempered probabilities
        (4, 0.8, 0.5),  # both; top-p binds
        (5, 0.75, 1.5),  # both bind; top-p on the renormalised top-k keeps 4, on the full distribution 5
    ],
)
def test_sampling_draws_from_the_truncated_distribution(top_k, top_p, temperature):
    """Support and frequencies of `_sample` on fixed log-probs, against the plain-Python reference: over
    20,000 seeded draws only tokens of the truncated distribution appear, each within 5 standard errors
    of its renormalised probability."""
    from memlong.chunkloop import _sample

    logp = torch.log_softmax(torch.tensor(SAMPLING_LOGITS), dim=0)
    want = np.array(_truncated_distribution(SAMPLING_LOGITS, top_k, top_p, temperature))
    assert 0 < np.count_nonzero(want) < len(want) or (top_k, top_p) == (0, 1.0)

    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    gen = torch.Generator().manual_seed(11)
    n = 20_000
    counts = np.bincount([_sample(logp, params, gen) for _ in range(n)], minlength=len(want))
    drawn, allowed = set(np.flatnonzero(counts)), set(np.flatnonzero(want))
    assert drawn <= allowed, f"tokens {sorted(drawn - allowed)} drawn outside top-k/top-p {sorted(allowed)}"
    se = np.sqrt(want * (1 - want) / n)
    assert np.all(np.abs(counts / n - want) <= 5 * se), (counts / n, want)


def test_a_prompt_is_retrieved_for_with_its_last_prompt_query_tokens():
    model = tiny_memlong(chunk=4, window=8)
    toks, tok = _tokens(40, seed=21), TinyTokenizer()
    prompt = toks[32:39]  # crosses the boundary at 36: the rest of the prompt reads memory it retrieved
    for n, span in ((0, 4), (2, 2)):  # 0: the prompt's last chunk
        retriever = RecordingRetriever()
        reader = Reader(model, retriever, tok, tiny_memory(model, retriever))
        with model.configured(prompt_query_tokens=n):
            reader.ingest(toks[:32], more=True)
            retriever.texts.clear()
            reader.read_prompt(prompt)
        assert tok.decode(prompt[-span:]) in retriever.texts
        assert (tok.decode(prompt[-4:]) in retriever.texts) == (span == 4)


@pytest.mark.parametrize("prompt_top_k", [0, 1])
def test_a_prompts_retrieval_reads_its_best_prompt_top_k_chunks(prompt_top_k):
    """The retrieval a prompt seeds reads its best `prompt_top_k` chunks (0: top_k), and only it: the
    boundaries before the prompt and after it read top_k."""
    model = tiny_memlong(chunk=4, window=8, top_k=3)
    toks, tok = _tokens(48, seed=22), TinyTokenizer()
    retriever = RecordingRetriever()
    memory = tiny_memory(model, retriever)
    spy = SearchSpy(memory)
    searches = spy.searches  # top_k asked for, per search
    reader = Reader(model, retriever, tok, spy)
    with model.configured(prompt_top_k=prompt_top_k):
        reader.ingest(toks[:32])
        assert reader._block_memory.k.shape[3] == 3 * 4
        n_before = len(searches)
        reader.read_prompt(toks[32:39])  # the prompt's retrieval serves 36..39
        assert searches[n_before:] == [3, prompt_top_k or 3]
        assert reader._block_memory.k.shape[3] == (prompt_top_k or 3) * 4
        list(reader.generate([], SamplingParams(max_new_tokens=3)))  # 40: the chunk before it holds prompt
        assert searches[-1] == (prompt_top_k or 3)
        list(reader.generate([], SamplingParams(max_new_tokens=4)))  # crosses 44: a plain boundary again
        assert searches[-1] == 3 and reader._block_memory.k.shape[3] == 3 * 4


@pytest.mark.parametrize("prompt_window", [False, True])
def test_a_prompts_chunks_in_the_last_window_retrieve_with_its_query_under_prompt_window(prompt_window):
    """`prompt_window`: every boundary of a given prompt inside the last `local_window` tokens of its end
    queries with the prompt's last chunk; earlier ones with the chunk before them. Without it only the
    prompt's last boundary does. Either way so does the first boundary after the prompt (the chunk before
    it holds the prompt's end), and not the next."""
    model = tiny_memlong(chunk=4, window=8)
    toks, tok = _tokens(48, seed=23), TinyTokenizer()
    retriever = RecordingRetriever()
    memory = tiny_memory(model, retriever)
    reader = Reader(model, retriever, tok, None)
    queries: list[tuple[int, np.ndarray]] = []  # (reader position, query) per search

    class Spy:
        def append(self, *args):
            return memory.append(*args)

        def search(self, q, top_k):
            queries.append((reader.position, q))
            return memory.search(q, top_k)

    reader.memory = Spy()
    with model.configured(prompt_window=prompt_window):
        reader.ingest(toks[:16])
        queries.clear()
        prompt = toks[16:35]  # ends at 35: the window it leaves is 27..35, its boundaries 28 and 32
        reader.read_prompt(prompt)
        list(reader.generate([], SamplingParams(max_new_tokens=7)))  # crosses 36 and 40
    # 36: the chunk before it still holds the prompt's end, so the answer reads what the question found
    seeded = {28, 32, 36} if prompt_window else {32, 36}
    assert [p for p, _ in queries] == [16, 20, 24, 28, 32, 36, 40]
    asked = reader._queries.embed(tok.decode(prompt[-4:]))
    for position, q in queries:
        if position in seeded:
            assert np.array_equal(q, asked), position
        elif position < 35:
            assert np.array_equal(q, reader._queries.embed(tok.decode(toks[position - 4 : position]))), (
                position
            )
        else:  # 40: the chunk before it is all generated tokens
            assert not np.array_equal(q, asked)


@pytest.mark.parametrize("prompt_window", [False, True])
def test_prompt_insert_reads_a_prompts_chunks_as_text_before_where_it_first_reads_them(prompt_window):
    """`prompt_insert`: every block that reads what a given prompt retrieved gets it inserted before the
    position of the prompt's first such boundary (the window's first with `prompt_window`, else the
    prompt's last); blocks reading memory retrieved by the chunk before them get it at its usual place."""
    model = tiny_memlong(chunk=4, window=8)
    toks, tok = _tokens(48, seed=24), TinyTokenizer()
    retriever = RecordingRetriever()
    reader = Reader(model, retriever, tok, tiny_memory(model, retriever))
    anchors: list[tuple[int, int | None]] = []  # (block start, anchor of the memory it read)
    forward = model.forward_block

    def spy(ids, stream, memory=None, **kw):
        if stream is reader.stream and memory is not None:
            anchors.append((stream.tokens_seen, memory.anchor))
        return forward(ids, stream, memory, **kw)

    model.forward_block = spy
    with model.configured(prompt_window=prompt_window, prompt_insert=True):
        reader.ingest(toks[:16])
        anchors.clear()
        reader.read_prompt(toks[16:35])  # boundaries 28 and 32 lie in the window it leaves (27..35)
        list(reader.generate([], SamplingParams(max_new_tokens=7)))  # 36 still reads it; 40 does not
    first = 28 if prompt_window else 32
    for start, anchor in anchors:
        assert anchor == (first if first <= start < 40 else None), (start, anchor)
    assert {start for start, anchor in anchors if anchor is not None} >= {first, 32, 36}
    with model.configured(prompt_window=prompt_window):  # off: never inserted
        anchors.clear()
        reader.read_prompt(toks[42:47])
        assert anchors and all(anchor is None for _, anchor in anchors)


def test_an_ingest_without_memory_searches_nothing_and_stores_what_its_window_computes():
    """`ingest_memory=False`: ingest reads its local window only (no search, no memory in any block) and
    stores the K/V that window computes; scoring afterwards still retrieves."""
    from memlong.chunkloop import records_to_kv

    model = tiny_memlong(chunk=4, window=8)
    toks, tok = _tokens(40, seed=25), TinyTokenizer()
    retriever = RecordingRetriever()
    memory = tiny_memory(model, retriever)
    spy, read = SearchSpy(memory), []
    searches = spy.searches
    forward = model.forward_block

    def block_spy(ids, stream, memory=None, **kw):
        read.append(memory is not None)
        return forward(ids, stream, memory, **kw)

    with model.configured(ingest_memory=False):
        reader = Reader(model, retriever, tok, spy)
        model.forward_block = block_spy
        reader.ingest(toks[:32])
        assert searches == [] and not any(read) and reader.next_chunk_id == 6  # 0..23 left the window
        reader.score(toks[32:40])
        assert searches and read[-1]
        model.forward_block = forward
        stream, want = model.new_stream(), []
        for t in range(0, 24, 4):  # the same text read with no memory, block by block
            want.append(model.forward_block(torch.tensor([toks[t : t + 4]]), stream).mem_k[0])
        records, _ = memory.fetch(list(range(6)))
        cfg = model.config
        got = records_to_kv(records, model.kv_record_shape, cfg.kv_dtype, cfg.kv_codec)
        got = got.reshape(6, -1, *model.kv_record_shape[-4:])[:, :, 0].float()  # (6, L_mem, Hkv, c, D) K
    torch.testing.assert_close(got, torch.stack(want).to(got.dtype).float(), atol=0, rtol=0)
    # An ingest that ends inside a chunk leaves its rest unread: scoring there retrieves at once.
    with model.configured(ingest_memory=False):
        reader = Reader(model, retriever, tok, SearchSpy(memory))
        reader.ingest(toks[:30])
        model.forward_block, read[:] = block_spy, []
        reader.score(toks[30:36])
        model.forward_block = forward
    assert read == [True, True]  # 30..31 and 32..35
    # A prompt read there retrieves once, with its own query, for the rest of the chunk.
    with model.configured(ingest_memory=False):
        spy = SearchSpy(memory)
        reader = Reader(model, retriever, tok, spy)
        reader.ingest(toks[:30])
        reader.read_prompt(toks[30:31])
    assert len(spy.searches) == 1 and reader.stats.retrievals == 1
