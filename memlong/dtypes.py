"""The element types a chunk's K/V may be stored in: the one list, with the numpy dtype a record's
bytes are kept in (bfloat16 as raw little-endian uint16: numpy has no bfloat16). The model computes in
the torch dtype of the same name (`torch_dtype`)."""

from __future__ import annotations

import math

import numpy as np

KV_DTYPES: dict[str, np.dtype] = {
    "bfloat16": np.dtype("<u2"),
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
}


def torch_dtype(kv_dtype: str):
    """The torch dtype of K/V element type `kv_dtype` (a name in KV_DTYPES; KeyError otherwise). torch is
    imported only here, when asked: the ret-mem service reads this list without torch."""
    import torch

    KV_DTYPES[kv_dtype]  # only the listed types
    return getattr(torch, kv_dtype)


# How a chunk's record holds its K/V (memlong.kvcodec encodes and expands them): "none" as kv_dtype
# values, "int8" or "fp8" compact (about half the bytes of bfloat16).
KV_CODECS = ("none", "int8", "fp8")


def record_bytes(kv_shape: tuple[int, ...], kv_dtype: str, codec: str = "none") -> int:
    """Bytes of one chunk's record of K/V `kv_shape` ([L,] 2, H, c, D) in `kv_dtype`, held by `codec`."""
    n_layers = kv_shape[0] if len(kv_shape) == 5 else 1
    h, c, d = kv_shape[-3:]
    if codec == "int8":  # int8 K and V + float16 scales per key channel and per value token
        return 2 * n_layers * h * c * d + 2 * n_layers * h * (d + c)
    if codec == "fp8":  # e4m3 K and V + one float32 scale per (layer, K or V, head)
        return 2 * n_layers * h * c * d + 8 * n_layers * h
    return math.prod(kv_shape) * KV_DTYPES[kv_dtype].itemsize
