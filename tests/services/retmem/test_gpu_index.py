"""Search indexes on a GPU (`--faiss-gpu`), checked on CPU: faiss's GPU API is replaced by a fake that
keeps its vectors in a CPU flat index, so the code that places, fills, rebuilds and searches a GPU
index runs here; no GPU was used. Selection: a clear startup error when faiss has no GPU support or
sees no GPU."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import faiss
import numpy as np
import pytest

from memlong.errors import FailedPrecondition, InvalidArgument
from memlong.gpu_index import GpuFlatIndex, GpuIndexes
from memlong.services.retmem.server import RetMemConfig, RetMemServer
from memlong.services.retmem.shard import Shard
from tests.services.retmem.servers import chunks, tiny_spec


class FakeGpuFlatIP:
    """faiss.GpuIndexFlatIP's calls used by GpuFlatIndex, on a CPU flat index."""

    made: list[FakeGpuFlatIP] = []

    def __init__(self, resources, dim: int, config) -> None:
        self.cpu, self.device = faiss.IndexFlatIP(dim), config.device
        self.resets = 0
        FakeGpuFlatIP.made.append(self)

    def add(self, x):
        self.cpu.add(x)

    def search(self, x, k):
        assert k <= 2048, "faiss's GPU selection takes k <= 2048"  # as the real GPU index refuses more
        return self.cpu.search(x, k)

    def reset(self):
        self.resets += 1
        self.cpu.reset()

    def reconstruct_n(self, i0, n):
        return self.cpu.reconstruct_n(i0, n)


@pytest.fixture
def fake_gpu(monkeypatch):
    FakeGpuFlatIP.made = []
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "GpuIndexFlatConfig", SimpleNamespace, raising=False)
    monkeypatch.setattr(faiss, "GpuIndexFlatIP", FakeGpuFlatIP, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
    return FakeGpuFlatIP


def test_a_gpu_index_without_gpu_support_is_a_clear_startup_error(tmp_path: Path, monkeypatch):
    if hasattr(faiss, "GpuIndexFlatIP"):
        pytest.skip("this faiss has GPU support")
    with pytest.raises(FailedPrecondition, match=r"no GPU support.*memlong\[gpu\]"):
        RetMemServer(RetMemConfig(data_dir=tmp_path, faiss_gpu=0))
    assert not (tmp_path / "shard0").exists()  # refused before any shard was opened
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "GpuIndexFlatIP", FakeGpuFlatIP, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0, raising=False)
    with pytest.raises(FailedPrecondition, match="sees no GPU"):
        GpuIndexes(0)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
    with pytest.raises(InvalidArgument, match="faiss_gpu"):
        GpuIndexes(1)


def test_a_shard_with_gpu_indexes_answers_as_one_in_ram(tmp_path: Path, fake_gpu):
    # Same appends, evictions and searches on two shards: the same ids, scores and records.
    spec = tiny_spec(memory_size=24)
    cpu = Shard("cpu", tmp_path / "a")
    gpu = Shard("gpu", tmp_path / "b", gpu=GpuIndexes(0))
    rng = np.random.default_rng(3)
    for shard in (cpu, gpu):
        shard.open()
        shard.create_session("s", spec)
    n = 0
    for step in range(12):
        batch = chunks(rng, spec, n, 5)
        n += 5
        for shard in (cpu, gpu):
            shard.append("s", *batch)
        queries = rng.standard_normal((3, spec.dim)).astype(np.float32)
        want, got = cpu.search("s", queries, 6), gpu.search("s", queries, 6)
        for field in ("ids", "scores", "records", "lengths"):
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
        if step == 6:
            for shard in (cpu, gpu):
                shard.evict("s", id_range=(0, 10))
    assert n > spec.memory_size  # policy evictions happened too
    index = gpu.bank.get("s")._index
    assert isinstance(index, GpuFlatIndex) and index.ntotal == len(gpu.bank.get("s"))
    assert fake_gpu.made and sum(f.resets for f in fake_gpu.made) >= 2  # removals rebuilt it
    # A recovered session (adopted into the bank) is placed on the GPU again, with the same answers.
    gpu.close()
    again = Shard("gpu", tmp_path / "b", gpu=GpuIndexes(0))
    again.open()
    queries = rng.standard_normal((2, spec.dim)).astype(np.float32)
    np.testing.assert_array_equal(again.search("s", queries, 6).ids, cpu.search("s", queries, 6).ids)
    assert isinstance(again.bank.get("s")._index, GpuFlatIndex)
    again.close()
    cpu.close()


def test_a_search_past_the_gpu_selection_limit_is_answered_exactly(fake_gpu):
    """An exact search may widen to every stored vector; past the 2,048 results a GPU index selects,
    the GPU index still answers what a CPU flat index answers (scores best first, -1 past the end)."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((2100, 8)).astype(np.float32)
    queries = rng.standard_normal((2, 8)).astype(np.float32)
    index = GpuIndexes(0).new_index(8)
    index.add_with_ids(vectors, np.arange(100, 2200, dtype=np.int64))
    cpu = faiss.IndexFlatIP(8)
    cpu.add(vectors)
    for k in (8, 2100, 2200):
        scores, ids = index.search(queries, k)
        want_scores, want_pos = cpu.search(queries, k)
        assert np.array_equal(ids, np.where(want_pos >= 0, want_pos + 100, -1))
        assert np.allclose(scores[ids >= 0], want_scores[want_pos >= 0], rtol=1e-5, atol=1e-5)
