"""Compact K/V records: how a chunk's memory K/V are stored and moved, and expanded for attention.

A record holds one chunk's K/V of every memory layer, `([L_mem,] 2, Hkv, c, D)`. Codecs:

- `none`: the values in the session's `kv_dtype` (bfloat16: 2 bytes a value).
- `int8`: int8 values with a scale per key channel (over the chunk's tokens, per layer and head) and
  a scale per value token (over the head dim), the scales in float16. Keys have outlier channels and
  values outlier tokens, which is why the scales sit on those axes (KIVI, arXiv 2402.02750). Layout:
  `qk (L, H, c, D) int8 | qv (L, H, c, D) int8 | sk (L, H, D) f16 | sv (L, H, c) f16`; for SmolLM2
  0.512x the bfloat16 bytes. Error per value at most 0.57 x its scale (half a step, plus the float16
  rounding of the scale).
- `fp8`: float8 e4m3 values with one float32 scale per (layer, K or V, head) mapping its largest
  magnitude to 448. Layout: `q (L, 2, H, c, D) e4m3 | s (L, 2, H) f32`; 0.50x. Error at most 2^-4 of
  the value plus 2^-9 x its scale.

Encoding runs where the K/V are made (the decoder), decoding where they are attended to (the
decoder): ret-mem stores and moves the compact bytes without looking inside. No I/O here.
"""

from __future__ import annotations

import threading
import warnings

import numpy as np
import torch

from memlong.dtypes import KV_CODECS as CODECS
from memlong.dtypes import record_bytes, torch_dtype
from memlong.errors import InvalidArgument

__all__ = ["CODECS", "check_codec", "decode", "encode", "record_bytes"]
_QUIET = threading.Lock()
_F16_MAX = 65504.0
_FP8_MAX = 448.0  # largest float8_e4m3fn


def check_codec(codec: str, field: str = "kv_codec") -> str:
    if codec not in CODECS:
        raise InvalidArgument(field, f"must be one of {CODECS}, got {codec!r}")
    return codec


def _dims(shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """([L,] 2, H, c, D) -> (L, H, c, D)."""
    if len(shape) not in (4, 5) or shape[-4] != 2:
        raise InvalidArgument("kv_shape", f"must be ([L,] 2, H, c, D), got {shape}")
    n_layers = shape[0] if len(shape) == 5 else 1
    return n_layers, shape[-3], shape[-2], shape[-1]


def _f16_scale(amax: torch.Tensor, levels: float) -> torch.Tensor:
    """Float32 scales that are exactly representable in float16; 1 where a slice is all zeros."""
    s = (amax / levels).clamp(max=_F16_MAX).to(torch.float16).float()
    return torch.where(s > 0, s, torch.ones_like(s))


def encode(k: torch.Tensor, v: torch.Tensor, dtype: str, codec: str) -> np.ndarray:
    """K, V (n, L, H, c, D) -> (n, record_bytes) uint8 records."""
    n = k.shape[0]
    if codec == "none":
        # One pass: each of K and V is converted and laid out straight into the record (a stack
        # first would write them once more, at float32 width).
        out = torch.empty((n, k.shape[1], 2, *k.shape[2:]), dtype=torch_dtype(dtype))  # (n, L, 2, H, c, D)
        out[:, :, 0] = k
        out[:, :, 1] = v
        return out.view(torch.uint8).reshape(n, -1).numpy()
    k, v = k.float(), v.float()
    if codec == "int8":
        sk = _f16_scale(k.abs().amax(dim=3), 127.0)  # (n, L, H, D): per key channel
        sv = _f16_scale(v.abs().amax(dim=4), 127.0)  # (n, L, H, c): per value token
        qk = (k / sk[:, :, :, None, :]).round().clamp(-127, 127).to(torch.int8)
        qv = (v / sv[..., None]).round().clamp(-127, 127).to(torch.int8)
        parts = [qk, qv, sk.to(torch.float16), sv.to(torch.float16)]
    elif codec == "fp8":
        kv = torch.stack([k, v], dim=2)  # (n, L, 2, H, c, D)
        s = kv.abs().amax(dim=(4, 5)) / _FP8_MAX  # (n, L, 2, H)
        s = torch.where(s > 0, s, torch.ones_like(s))
        q = (kv / s[..., None, None]).clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)
        parts = [q, s]
    else:
        check_codec(codec)
    flat = [p.contiguous().view(torch.uint8).reshape(n, -1) for p in parts]
    return torch.cat(flat, dim=1).numpy()


def _tensor_of(array: np.ndarray) -> torch.Tensor:
    """torch.from_numpy, without its warning for a read-only array (see `decode`: the result is read)."""
    if array.flags.writeable:
        return torch.from_numpy(array)
    # catch_warnings swaps the process's filters: one decode at a time does (the prefetch thread decodes
    # beside the model's), so none restores the filters another has just replaced.
    with _QUIET, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def decode(records: np.ndarray, shape: tuple[int, ...], dtype: str, codec: str) -> torch.Tensor:
    """(..., record_bytes) uint8 -> (..., *shape) K/V: the stored dtype for `none` (a view, no copy),
    float32 for the compact codecs.

    Retrieved records may be read-only views of a shared-memory lease: for `none` the result then shares
    that read-only memory (torch has no read-only tensors), so callers only read it, as the chunk loop
    does (it converts to float32 at once)."""
    lead = records.shape[:-1]
    flat = _tensor_of(np.ascontiguousarray(records)).reshape(-1, records.shape[-1])  # (m, rb)
    if codec == "none":
        return flat.view(torch_dtype(dtype)).reshape(*lead, *shape)
    n_layers, h, c, d = _dims(tuple(shape))
    m, vals = flat.shape[0], n_layers * h * c * d
    if codec == "int8":
        qk = flat[:, :vals].view(torch.int8).reshape(m, n_layers, h, c, d).float()
        qv = flat[:, vals : 2 * vals].view(torch.int8).reshape(m, n_layers, h, c, d).float()
        o = 2 * vals
        sk = (
            flat[:, o : o + 2 * n_layers * h * d]
            .contiguous()
            .view(torch.float16)
            .reshape(m, n_layers, h, 1, d)
        )
        sv = (
            flat[:, o + 2 * n_layers * h * d :].contiguous().view(torch.float16).reshape(m, n_layers, h, c, 1)
        )
        kv = torch.stack([qk * sk.float(), qv * sv.float()], dim=2)  # (m, L, 2, H, c, D)
    elif codec == "fp8":
        q = flat[:, : 2 * vals].view(torch.float8_e4m3fn).reshape(m, n_layers, 2, h, c, d).float()
        s = flat[:, 2 * vals :].contiguous().view(torch.float32).reshape(m, n_layers, 2, h, 1, 1)
        kv = q * s
    else:
        check_codec(codec)
    return kv.reshape(*lead, *shape)
