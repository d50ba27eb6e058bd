"""Hand-framed protobuf for the two messages that carry K/V over gRPC: the K/V bytes are never copied
by protobuf on either side.

Protobuf's wire format lets a message be written in pieces: fields may come in any order, and two
occurrences of a singular embedded message are merged by every parser. So a message that carries a
Tensor is written as the protobuf-serialised message *without* the tensor's `data`, followed by a
second occurrence of the tensor field that holds only `data`; any protobuf parser reads the two as one
message. These bytes are what `AppendRequest` (client) and `RetrieveResponse` / `SearchResponse`
(server) put on the wire: the payload is joined into the message bytes once, straight from the record
buffers, instead of `tobytes()` + a copy into the message + serialisation.

Reading is the same in reverse: the tensor data's position in the received bytes is found by walking
the wire format, everything else (a few hundred bytes) is parsed by protobuf from a copy without the
data, and the data is handed on as a view of the received bytes. Unknown fields are kept for protobuf
to judge; anything that does not walk as protobuf is a ValueError (INVALID_ARGUMENT at a server).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from memlong.api.retmem.v1 import retmem_pb2 as pb

VARINT, I64, LEN, I32 = 0, 1, 2, 5
TENSOR_DATA = 3  # memlong.common.v1.Tensor.data
CHUNK_KV = 3  # Chunk.kv
APPEND_CHUNKS = 2  # AppendRequest.chunks
ROW_KV = 5  # SearchResponse.kv
RETRIEVE_ROWS = 1  # RetrieveResponse.rows

Buffer = bytes | bytearray | memoryview


def varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _len_prefix(field: int, n: int) -> bytes:
    return varint(field << 3 | LEN) + varint(n)


def fields(buf: memoryview, lo: int, hi: int) -> Iterator[tuple[int, int, int, int, int]]:
    """Walk the fields of the message in buf[lo:hi]: (number, wire type, start of the key, start of
    the value, end of the field). For LEN fields the value is buf[value_start:end]."""
    pos = lo
    while pos < hi:
        start = pos
        key, pos = _read_varint(buf, pos, hi)
        number, wt = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        if wt == VARINT:
            _, end = _read_varint(buf, pos, hi)
        elif wt == LEN:
            n, pos = _read_varint(buf, pos, hi)
            end = pos + n
        elif wt == I64:
            end = pos + 8
        elif wt == I32:
            end = pos + 4
        else:
            raise ValueError(f"wire type {wt} not supported")
        if end > hi:
            raise ValueError("field runs past the end of its message")
        yield number, wt, start, pos, end
        pos = end


def _without_tensor_data(buf: memoryview, lo: int, hi: int, tensor_field: int) -> tuple[bytes, slice | None]:
    """The message in buf[lo:hi] with the `data` of its Tensor field `tensor_field` cut out, and where
    that data was (the last occurrence wins, as protobuf reads a repeated singular field)."""
    rest: list[Buffer] = []
    data: slice | None = None
    for number, wt, start, vlo, end in fields(buf, lo, hi):
        if number != tensor_field:
            rest.append(buf[start:end])
            continue
        if wt != LEN:
            raise ValueError(f"field {number} is not a message")
        kept: list[Buffer] = []
        for tnum, twt, tstart, tvlo, tend in fields(buf, vlo, end):
            if tnum == TENSOR_DATA:
                if twt != LEN:
                    raise ValueError("tensor data is not bytes")
                data = slice(tvlo, tend)
            else:
                kept.append(buf[tstart:tend])
        inner = b"".join(kept)
        rest += [_len_prefix(number, len(inner)), inner]
    return b"".join(rest), data


# ------------------------------------------------------------------------------------ writing


def with_tensor_data(head: bytes, tensor_field: int, data: Buffer) -> list[Buffer]:
    """Pieces of a message: `head` (serialised, its tensor without data) + the data as a second
    occurrence of the tensor field. Join them (b"".join) for the message bytes."""
    inner = _len_prefix(TENSOR_DATA, len(data))
    return [head, _len_prefix(tensor_field, len(inner) + len(data)), inner, data]


def append_request(session_id: str, chunks: Sequence[tuple[pb.Chunk, Buffer]]) -> bytes:
    """AppendRequest bytes: chunks given as (chunk whose kv has dtype, shape and checksum, K/V bytes)."""
    parts: list[Buffer] = [pb.AppendRequest(session_id=session_id).SerializeToString()]
    for meta, data in chunks:
        pieces = with_tensor_data(meta.SerializeToString(), CHUNK_KV, data)
        parts += [_len_prefix(APPEND_CHUNKS, sum(len(p) for p in pieces)), *pieces]
    return b"".join(parts)


def search_response(head: pb.SearchResponse, data: Buffer) -> bytes:
    """One SearchResponse's bytes: `head` (kv with dtype, shape and checksum) + the row's K/V."""
    return b"".join(with_tensor_data(head.SerializeToString(), ROW_KV, data))


def retrieve_response(rows: Sequence[tuple[pb.SearchResponse, Buffer]]) -> bytes:
    """RetrieveResponse bytes: one (head, K/V bytes) per query row."""
    parts: list[Buffer] = []
    for head, data in rows:
        pieces = with_tensor_data(head.SerializeToString(), ROW_KV, data)
        parts += [_len_prefix(RETRIEVE_ROWS, sum(len(p) for p in pieces)), *pieces]
    return b"".join(parts)


# ------------------------------------------------------------------------------------ reading


@dataclass
class RawChunk:
    """One chunk of a received AppendRequest: everything but the K/V bytes, parsed, and those bytes."""

    meta: pb.Chunk
    data: memoryview  # empty when the chunk carries none (kv_region, or a malformed request)

    @property
    def seq(self) -> int:
        return self.meta.seq


@dataclass
class RawAppend:
    """A received AppendRequest with its K/V left in the received bytes. Reads like the message for
    telemetry (`DESCRIPTOR`, session_id, chunks[i].seq)."""

    session_id: str
    chunks: list[RawChunk]
    DESCRIPTOR: ClassVar[Any] = pb.AppendRequest.DESCRIPTOR


def parse_append(data: bytes) -> RawAppend:
    """AppendRequest bytes -> RawAppend (the server's request deserializer for Append)."""
    buf = memoryview(data)
    rest: list[Buffer] = []
    chunks: list[RawChunk] = []
    for number, wt, start, vlo, end in fields(buf, 0, len(buf)):
        if number == APPEND_CHUNKS and wt == LEN:
            head, span = _without_tensor_data(buf, vlo, end, CHUNK_KV)
            chunks.append(RawChunk(pb.Chunk.FromString(head), buf[span] if span else buf[0:0]))
        else:
            rest.append(buf[start:end])
    top = pb.AppendRequest.FromString(b"".join(rest))  # session_id (UTF-8 checked) and unknown fields
    return RawAppend(top.session_id, chunks)


def parse_rows(
    data: bytes, top_field: int | None = RETRIEVE_ROWS
) -> list[tuple[pb.SearchResponse, memoryview]]:
    """RetrieveResponse bytes (or, with top_field None, one SearchResponse's) -> (row without its K/V
    bytes, a view of those bytes) per row."""
    buf = memoryview(data)
    spans = (
        [(0, len(buf))]
        if top_field is None
        else [
            (vlo, end)
            for number, wt, _, vlo, end in fields(buf, 0, len(buf))
            if number == top_field and wt == LEN
        ]
    )
    rows = []
    for lo, hi in spans:
        head, span = _without_tensor_data(buf, lo, hi, ROW_KV)
        rows.append((pb.SearchResponse.FromString(head), buf[span] if span else buf[0:0]))
    return rows
