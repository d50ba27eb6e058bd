"""Session search indexes on a GPU (faiss's GPU build, the `memlong[gpu]` extra).

`GpuIndexes(device)` is made once per process: it checks that this faiss can use a GPU and holds the
GPU's faiss resources. `new_index(dim)` gives a `GpuFlatIndex`, which offers the three calls a
`SessionMemory` makes of its index (add_with_ids, remove_ids, search), so a memory keeps its index on
the GPU with nothing else changed.

Results stay exact: a flat index computes every inner product (no approximation), and the memory
rescoring its candidates in float64 with a float32 error bound (`SessionMemory._exact_topk`) makes
the answer independent of the order in which the GPU sums. That bound assumes float32 arithmetic:
the process that serves a GPU index sets NVIDIA_TF32_OVERRIDE=0 before CUDA starts (ret-mem's
server does), so cuBLAS never multiplies in TF32.
"""

from __future__ import annotations

import threading
from typing import Any

import faiss
import numpy as np

from memlong.errors import FailedPrecondition, InvalidArgument

GPU_MAX_K = 2048  # faiss's GPU k-selection takes at most this many results per query
INSTALL_HINT = (
    "install the GPU extra (pip install 'memlong[gpu]', then replace faiss-cpu's files: "
    "pip uninstall -y faiss-cpu && pip install --force-reinstall --no-deps faiss-gpu) with a CUDA build "
    "of torch==2.13.0 (README: 'A GPU index')"
)


class GpuIndexes:
    """Makes session indexes on GPU `device`; FailedPrecondition at once if that cannot work here."""

    def __init__(self, device: int = 0) -> None:
        if isinstance(device, bool) or not isinstance(device, int) or device < 0:
            raise InvalidArgument("faiss_gpu", f"must be a GPU number >= 0, got {device!r}")
        if not all(hasattr(faiss, n) for n in ("StandardGpuResources", "GpuIndexFlatIP", "get_num_gpus")):
            raise FailedPrecondition(
                f"a GPU index was asked for, but this faiss has no GPU support: {INSTALL_HINT}"
            )
        n_gpus = int(faiss.get_num_gpus())
        if n_gpus == 0:
            raise FailedPrecondition("a GPU index was asked for, but faiss sees no GPU on this machine")
        if device >= n_gpus:
            raise InvalidArgument(
                "faiss_gpu", f"GPU {device} asked for; faiss sees {n_gpus} (0..{n_gpus - 1})"
            )
        self.device = device
        self.resources = faiss.StandardGpuResources()
        # faiss's GPU indexes are not thread-safe, and every index made here shares these resources
        # (one scratch area on the GPU): one call on them at a time, whichever session it is for.
        self.lock = threading.Lock()

    def new_index(self, dim: int) -> GpuFlatIndex:
        config = faiss.GpuIndexFlatConfig()
        config.device = self.device
        config.useFloat16 = False  # full float32 vectors: the exactness bound assumes them
        return GpuFlatIndex(faiss.GpuIndexFlatIP(self.resources, dim, config), self.lock)

    def describe(self) -> str:
        return f"faiss GPU {self.device}"


class GpuFlatIndex:
    """One session's exact inner-product index on the GPU, keyed by chunk id like an IndexIDMap2.

    The GPU index holds the vectors in the order they were added (ids ascending, as a session adds
    them) and answers with positions, mapped back to ids here. A GPU flat index cannot remove single
    vectors: `remove_ids` rebuilds it from the remaining ones, which evictions (rounds that free a
    quarter of memory) make rare.
    """

    def __init__(self, flat: Any, lock: threading.Lock | None = None) -> None:
        self.flat = flat
        self.lock = lock or threading.Lock()  # shared by the indexes on one GpuIndexes' resources
        self.ids = np.empty(0, np.int64)  # (n,) id of each position

    @property
    def ntotal(self) -> int:
        return len(self.ids)

    def add_with_ids(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        with self.lock:
            self.flat.add(np.ascontiguousarray(vectors, np.float32))  # (n, dim)
        self.ids = np.concatenate([self.ids, np.asarray(ids, np.int64)])

    def remove_ids(self, ids: np.ndarray) -> int:
        keep = ~np.isin(self.ids, np.asarray(ids, np.int64))  # (n,)
        n_removed = int((~keep).sum())
        if n_removed:
            with self.lock:
                kept = self.flat.reconstruct_n(0, len(self.ids))[keep]  # (n - removed, dim)
                self.flat.reset()
                if len(kept):
                    self.flat.add(np.ascontiguousarray(kept, np.float32))
            self.ids = self.ids[keep]
        return n_removed

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores (q, k) float32, ids (q, k) int64; -1 where fewer than k are stored)."""
        queries = np.ascontiguousarray(queries, np.float32)
        with self.lock:
            if k <= GPU_MAX_K:
                scores, pos = self.flat.search(queries, k)
            else:  # past faiss's GPU selection limit (an exact search widening to every vector): here
                vectors = self.flat.reconstruct_n(0, len(self.ids))  # (n, dim)
        if k > GPU_MAX_K:
            scores, pos = _top_k(queries @ vectors.T, k)
        ids = np.where(pos >= 0, self.ids[np.clip(pos, 0, max(len(self.ids) - 1, 0))], -1)
        return scores, ids


def _top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(q, n) scores -> the k best per row, best first, as faiss answers: (scores, positions), padded
    with -FLT_MAX / -1 where fewer than k exist."""
    q, n = scores.shape
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (q, min(n, k))
    top = np.take_along_axis(scores, order, axis=1)
    pad = k - order.shape[1]
    if pad > 0:
        order = np.pad(order, ((0, 0), (0, pad)), constant_values=-1)
        top = np.pad(top, ((0, 0), (0, pad)), constant_values=-np.finfo(np.float32).max)
    return top.astype(np.float32), order.astype(np.int64)
