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

from typing import Any

import faiss
import numpy as np

from memlong.errors import FailedPrecondition, InvalidArgument

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

    def new_index(self, dim: int) -> GpuFlatIndex:
        config = faiss.GpuIndexFlatConfig()
        config.device = self.device
        config.useFloat16 = False  # full float32 vectors: the exactness bound assumes them
        return GpuFlatIndex(faiss.GpuIndexFlatIP(self.resources, dim, config))

    def describe(self) -> str:
        return f"faiss GPU {self.device}"


class GpuFlatIndex:
    """One session's exact inner-product index on the GPU, keyed by chunk id like an IndexIDMap2.

    The GPU index holds the vectors in the order they were added (ids ascending, as a session adds
    them) and answers with positions, mapped back to ids here. A GPU flat index cannot remove single
    vectors: `remove_ids` rebuilds it from the remaining ones, which evictions (rounds that free a
    quarter of memory) make rare.
    """

    def __init__(self, flat: Any) -> None:
        self.flat = flat
        self.ids = np.empty(0, np.int64)  # (n,) id of each position

    @property
    def ntotal(self) -> int:
        return len(self.ids)

    def add_with_ids(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        self.flat.add(np.ascontiguousarray(vectors, np.float32))  # (n, dim)
        self.ids = np.concatenate([self.ids, np.asarray(ids, np.int64)])

    def remove_ids(self, ids: np.ndarray) -> int:
        keep = ~np.isin(self.ids, np.asarray(ids, np.int64))  # (n,)
        n_removed = int((~keep).sum())
        if n_removed:
            kept = self.flat.reconstruct_n(0, len(self.ids))[keep]  # (n - removed, dim)
            self.flat.reset()
            if len(kept):
                self.flat.add(np.ascontiguousarray(kept, np.float32))
            self.ids = self.ids[keep]
        return n_removed

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores (q, k) float32, ids (q, k) int64; -1 where fewer than k are stored)."""
        scores, pos = self.flat.search(np.ascontiguousarray(queries, np.float32), k)
        ids = np.where(pos >= 0, self.ids[np.clip(pos, 0, max(len(self.ids) - 1, 0))], -1)
        return scores, ids
