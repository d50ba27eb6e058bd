"""Tensor <-> numpy at the wire boundary: dtype allow-list, size checks, checksums.

Decoding makes no copy of its own: the array is a read-only `np.frombuffer` view of the payload. Where
the payload comes from decides the copies: `Tensor.data` read out of a parsed message is a new bytes
object each time (protobuf copies it out: read it once), while the hand-framed K/V messages
(`memlong.services.retmem.rawwire`) pass `data=` a view of the received bytes, so no copy at all.
It never executes anything: a Tensor is dtype + shape + raw bytes + CRC-32.
bfloat16 has no numpy dtype; it travels and decodes as its raw 16-bit patterns (`np.uint16`), which is
what torch's `view(torch.bfloat16)` wants.

`concat_checksum` gives the CRC-32 of equal-length pieces laid end to end from the pieces' own CRC-32s
(zlib's crc32_combine), so a reply made of stored records gets its checksum without reading them again.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Iterable, Sequence

import numpy as np

try:  # ISA-L computes the same CRC-32 (zlib polynomial) ~40x faster: 0.01 ms vs 0.4 ms per 768 KiB
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover - the wire format is identical either way
    _crc32 = zlib.crc32

from memlong.api.common.v1 import tensor_pb2
from memlong.errors import InvalidArgument, ResourceExhausted

DType = tensor_pb2.DType

# wire dtype -> (numpy dtype used in memory, name)
_NUMPY: dict[int, tuple[np.dtype, str]] = {
    DType.DTYPE_FLOAT32: (np.dtype("<f4"), "float32"),
    DType.DTYPE_FLOAT16: (np.dtype("<f2"), "float16"),
    DType.DTYPE_BFLOAT16: (np.dtype("<u2"), "bfloat16"),
    DType.DTYPE_INT32: (np.dtype("<i4"), "int32"),
    DType.DTYPE_INT64: (np.dtype("<i8"), "int64"),
    DType.DTYPE_UINT8: (np.dtype("u1"), "uint8"),
}
_BY_NAME = {name: code for code, (_, name) in _NUMPY.items()}
_BY_NUMPY = {
    np.dtype("<f4"): DType.DTYPE_FLOAT32,
    np.dtype("<f2"): DType.DTYPE_FLOAT16,
    np.dtype("<i4"): DType.DTYPE_INT32,
    np.dtype("<i8"): DType.DTYPE_INT64,
    np.dtype("u1"): DType.DTYPE_UINT8,
}

MAX_RANK = 8
MAX_DIM = 1 << 31


def checksum(data: bytes | memoryview) -> int:
    """CRC-32 (zlib polynomial) of a byte buffer, as carried in Tensor.checksum."""
    return _crc32(data) & 0xFFFFFFFF


def dtype_code(name: str) -> int:
    """Wire dtype for a name such as "bfloat16"; InvalidArgument for an unknown name."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise InvalidArgument("dtype", f"unknown dtype {name!r}; allowed: {sorted(_BY_NAME)}") from None


def dtype_name(code: int) -> str:
    """Name of a wire dtype; InvalidArgument for UNSPECIFIED or unknown codes."""
    if code not in _NUMPY:
        raise InvalidArgument("dtype", f"unsupported dtype code {code}")
    return _NUMPY[code][1]


def encode(array: np.ndarray, dtype: str | None = None) -> tensor_pb2.Tensor:
    """numpy -> Tensor. `dtype` overrides the wire dtype (e.g. "bfloat16" for uint16 patterns)."""
    code = dtype_code(dtype) if dtype is not None else _BY_NUMPY.get(array.dtype.newbyteorder("<"))
    if code is None:
        raise InvalidArgument("dtype", f"numpy dtype {array.dtype} has no wire dtype")
    return encode_bytes(np.ascontiguousarray(array).tobytes(), code, array.shape)


def encode_bytes(data: bytes, dtype: int, shape: Sequence[int]) -> tensor_pb2.Tensor:
    """Raw bytes (already in wire layout) -> Tensor."""
    return tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data, checksum=checksum(data))


def fill(out: tensor_pb2.Tensor, data: bytes, dtype: int, shape: Sequence[int]) -> None:
    """Write raw bytes (already in wire layout) into a Tensor field of a message being built.

    The hot path builds replies this way: passing a finished Tensor to a parent message's
    constructor copies the payload once more (0.3 ms per 768 KiB).
    """
    out.dtype = dtype
    out.shape[:] = shape
    out.data = data
    out.checksum = checksum(data)


def check_header(
    tensor: tensor_pb2.Tensor,
    field: str,
    nbytes: int,
    *,
    dtypes: Sequence[int] | None = None,
    shape: Sequence[int | None] | None = None,
) -> tuple[np.dtype, list[int]]:
    """Check a Tensor's dtype and shape against a payload of `nbytes` (which may lie outside the
    message: a shared-memory region); returns (numpy dtype, shape). Every failure names `field`."""
    if tensor.dtype not in _NUMPY:
        raise InvalidArgument(f"{field}.dtype", f"unsupported dtype code {tensor.dtype}")
    if dtypes is not None and tensor.dtype not in dtypes:
        allowed = [dtype_name(d) for d in dtypes]
        raise InvalidArgument(f"{field}.dtype", f"got {dtype_name(tensor.dtype)}, expected one of {allowed}")
    dims = list(tensor.shape)
    if len(dims) > MAX_RANK:
        raise InvalidArgument(f"{field}.shape", f"rank {len(dims)} > {MAX_RANK}")
    count = 1
    for d in dims:
        if d < 0 or d > MAX_DIM:
            raise InvalidArgument(f"{field}.shape", f"dimension {d} out of range [0, {MAX_DIM}]")
        count *= d  # Python ints: no overflow
    np_dtype = _NUMPY[tensor.dtype][0]
    if count * np_dtype.itemsize != nbytes:
        raise InvalidArgument(f"{field}.data", f"shape {dims} x {np_dtype.itemsize} bytes != {nbytes} bytes")
    if shape is not None:
        if len(shape) != len(dims) or any(
            e is not None and e != d for e, d in zip(shape, dims, strict=False)
        ):
            want = ["*" if e is None else e for e in shape]
            raise InvalidArgument(f"{field}.shape", f"got {dims}, expected {want}")
    return np_dtype, dims


def decode(
    tensor: tensor_pb2.Tensor,
    field: str,
    *,
    dtypes: Sequence[int] | None = None,
    shape: Sequence[int | None] | None = None,
    max_bytes: int | None = None,
    data: bytes | memoryview | None = None,
) -> np.ndarray:
    """Tensor -> read-only numpy view, validated. Every failure names `field`.

    `dtypes` is the allow-list (default: all supported); `shape` the expected shape with None as a
    wildcard; `max_bytes` an upper bound on the payload (ResourceExhausted above it). `data`: the
    payload when it was cut out of the received bytes (the message's own `data` is then empty).
    """
    if data is None:
        data = tensor.data  # each access copies the payload out of the message: read it once
    np_dtype, dims = check_header(tensor, field, len(data), dtypes=dtypes, shape=shape)
    if max_bytes is not None and len(data) > max_bytes:
        raise ResourceExhausted(f"{field}: {len(data)} bytes > limit {max_bytes}")
    if checksum(data) != tensor.checksum:
        raise InvalidArgument(f"{field}.checksum", "CRC-32 of data does not match")
    return np.frombuffer(data, dtype=np_dtype).reshape(dims)


# ------------------------------------------------------------------ CRC-32 of concatenated pieces
# zlib's crc32_combine: CRC(A || B) = (x^(8 len B) * CRC(A)) mod P  xor  CRC(B), in GF(2)[x] with the
# reflected polynomial. Shifting by a fixed length is one multiplication by a precomputed power of x.

_POLY = 0xEDB88320


def _multmodp(a: int, b: int) -> int:
    """a * b modulo the CRC-32 polynomial (reflected bit order)."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if a & (m - 1) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


_X2N = [1 << 30]  # x^(2^k) modulo the polynomial, k = 0..31
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


@functools.lru_cache(maxsize=64)
def _shift(nbytes: int) -> int:
    """x^(8 * nbytes) modulo the polynomial: what a CRC is multiplied by when nbytes follow it."""
    p, n, k = 1 << 31, nbytes, 3
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return p


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of A || B from CRC-32(A), CRC-32(B) and len(B) (as zlib.crc32_combine)."""
    return _multmodp(_shift(len2), crc1) ^ crc2


def concat_checksum(crcs: Iterable[int], piece_bytes: int) -> int:
    """CRC-32 of pieces of `piece_bytes` each, laid end to end, from their CRC-32s."""
    op, crc = _shift(piece_bytes), 0
    for c in crcs:
        crc = _multmodp(op, crc) ^ int(c)
    return crc


@functools.lru_cache(maxsize=16)
def zeros_checksum(nbytes: int) -> int:
    """CRC-32 of `nbytes` zero bytes (a padding record)."""
    return checksum(bytes(nbytes))
