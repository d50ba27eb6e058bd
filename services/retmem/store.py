"""A ret-mem session's spec and the checks on what is stored in it, shared by the shards and the client.

K/V travel as opaque per-chunk records: `(n, record_bytes)` uint8 in, `SearchResult.records`
`(q, k, record_bytes)` uint8 out. No grpc and no file system here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from memlong.dtypes import KV_CODECS, KV_DTYPES, record_bytes
from memlong.errors import InvalidArgument
from memlong.memory import MemoryConfig


@dataclass(frozen=True)
class SessionSpec:
    """A session's fixed settings: embedding width, K/V layout of one chunk, capacity, eviction."""

    dim: int
    kv_shape: tuple[int, ...]  # ([n_memory_layers,] 2, n_kv_heads, chunk_tokens, head_dim)
    kv_dtype: str = "bfloat16"
    memory_size: int = 256  # chunks
    protect_newest: float = 0.25
    drop_oldest: float = 0.05
    evict_free: float = 0.25
    layout: str = ""  # the memory layout that writes and reads the K/V (MemLongConfig.layout_tag)
    kv_codec: str = "none"  # how a record holds the K/V (KV_CODECS); kv_dtype is what they expand to

    def __post_init__(self) -> None:
        shape = tuple(self.kv_shape)
        object.__setattr__(self, "kv_shape", tuple(int(d) for d in shape))
        if len(shape) not in (4, 5) or shape[-4] != 2 or any(int(d) <= 0 or int(d) > 1 << 20 for d in shape):
            raise InvalidArgument(
                "spec.kv_shape",
                f"must be ([n_memory_layers,] 2, n_kv_heads, chunk_tokens, head_dim), got {shape}",
            )
        if len(self.layout) > 4096:
            raise InvalidArgument("spec.layout", "at most 4096 characters")
        if self.kv_dtype not in KV_DTYPES:
            raise InvalidArgument(
                "spec.kv_dtype", f"must be one of {sorted(KV_DTYPES)}, got {self.kv_dtype!r}"
            )
        if self.kv_codec not in KV_CODECS:
            raise InvalidArgument("spec.kv_codec", f"must be one of {list(KV_CODECS)}, got {self.kv_codec!r}")
        try:
            self.memory_config()
        except InvalidArgument as e:
            raise InvalidArgument(f"spec.{e.field}", str(e).partition(": ")[2]) from None

    @property
    def chunk_tokens(self) -> int:
        return self.kv_shape[-2]

    @property
    def record_bytes(self) -> int:
        """Bytes of one chunk's K/V record."""
        return record_bytes(self.kv_shape, self.kv_dtype, self.kv_codec)

    @property
    def wire_kv(self) -> tuple[str, tuple[int, ...]]:
        """(dtype, shape) one chunk's K/V travel as: kv_dtype of kv_shape, or opaque uint8 bytes of a
        compact record."""
        if self.kv_codec == "none":
            return self.kv_dtype, self.kv_shape
        return "uint8", (self.record_bytes,)

    def memory_config(self) -> MemoryConfig:
        return MemoryConfig(
            dim=self.dim,
            record_bytes=self.record_bytes,
            memory_size=self.memory_size,
            protect_newest=self.protect_newest,
            drop_oldest=self.drop_oldest,
            evict_free=self.evict_free,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kv_shape"] = list(self.kv_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SessionSpec:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise InvalidArgument("spec", f"unknown keys {sorted(unknown)}")
        return cls(**{**d, "kv_shape": tuple(d["kv_shape"])})


@dataclass(frozen=True)
class SessionInfo:
    """What GetSession reports."""

    session_id: str
    spec: SessionSpec
    num_chunks: int
    shard: str
    stats: dict[str, float]


def as_records(spec: SessionSpec, kv: np.ndarray, field: str = "kv") -> np.ndarray:
    """K/V batch -> (n, record_bytes) uint8 without copying when contiguous.

    Accepts (n, record_bytes) uint8 records or typed (n, *kv_shape) arrays of the session's dtype
    (uint16 bit patterns for bfloat16).
    """
    if kv.dtype == np.uint8 and kv.ndim == 2:
        if kv.shape[1] != spec.record_bytes:
            raise InvalidArgument(field, f"records must be (n, {spec.record_bytes}), got {kv.shape}")
        return np.ascontiguousarray(kv)
    want = KV_DTYPES[spec.kv_dtype]
    if spec.kv_codec != "none" or kv.dtype != want or kv.shape[1:] != spec.kv_shape:
        raise InvalidArgument(
            field,
            f"must be (n, {', '.join(map(str, spec.kv_shape))}) {spec.kv_dtype}, got {kv.shape} {kv.dtype}",
        )
    kv = np.ascontiguousarray(kv)
    return kv.view(np.uint8).reshape(len(kv), spec.record_bytes)


def check_lengths(spec: SessionSpec, lengths: np.ndarray) -> None:
    """Valid token counts cannot exceed the chunk size (the core checks >= 1)."""
    if lengths.size and int(lengths.max()) > spec.chunk_tokens:
        raise InvalidArgument("lengths", f"must be <= chunk_tokens {spec.chunk_tokens}")
