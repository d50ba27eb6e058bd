"""Conversions between retmem protos and the in-process types, used by servicer and client alike."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from memlong.api.retmem.v1 import retmem_pb2 as pb
from memlong.errors import InvalidArgument
from memlong.memory import MAX_ACCEPTED_RUNS, SearchResult
from memlong.services.common import tensor

from .store import SessionSpec

PART_BYTES = 8 << 20  # export parts stay well under the message limit
BOOL_KEYS = frozenset({"pinned"})
STATE_ARRAYS = frozenset({"ids", "embeddings", "records", "lengths", "counters", "pinned", "accepted"})


def spec_to_proto(spec: SessionSpec) -> pb.SessionSpec:
    return pb.SessionSpec(
        dim=spec.dim,
        kv_shape=spec.kv_shape,
        kv_dtype=tensor.dtype_code(spec.kv_dtype),
        memory_size=spec.memory_size,
        layout=spec.layout,
        kv_codec="" if spec.kv_codec == "none" else spec.kv_codec,
        eviction=pb.EvictionPolicy(
            protect_newest=spec.protect_newest, drop_oldest=spec.drop_oldest, evict_free=spec.evict_free
        ),
    )


def spec_from_proto(msg: pb.SessionSpec, field: str = "spec") -> SessionSpec:
    if msg.kv_dtype == 0:
        raise InvalidArgument(f"{field}.kv_dtype", "must be set")
    try:
        kv_dtype = tensor.dtype_name(msg.kv_dtype)
    except InvalidArgument:
        raise InvalidArgument(f"{field}.kv_dtype", f"unknown dtype code {msg.kv_dtype}") from None
    extra: dict[str, Any] = {}
    if msg.HasField("eviction"):
        ev = msg.eviction
        extra = {
            "protect_newest": ev.protect_newest,
            "drop_oldest": ev.drop_oldest,
            "evict_free": ev.evict_free,
        }
    return SessionSpec(
        dim=msg.dim,
        kv_shape=tuple(msg.kv_shape),
        kv_dtype=kv_dtype,
        memory_size=msg.memory_size,
        layout=msg.layout,
        kv_codec=msg.kv_codec or "none",
        **extra,
    )


def kv_dtype_code(spec: SessionSpec) -> int:
    """Wire dtype of the session's K/V tensors (UINT8 for compact records)."""
    return tensor.dtype_code(spec.wire_kv[0])


def append_request(
    spec: SessionSpec,
    session_id: str,
    ids: np.ndarray,
    embeddings: np.ndarray,
    records: np.ndarray,
    lengths: np.ndarray,
) -> pb.AppendRequest:
    """One Append message for chunks (ids (n,), embeddings (n, dim) float32, records (n, record_bytes))."""
    code = kv_dtype_code(spec)
    return pb.AppendRequest(
        session_id=session_id,
        chunks=[
            pb.Chunk(
                seq=int(ids[i]),
                embedding=tensor.encode(embeddings[i]),
                kv=tensor.encode_bytes(records[i].tobytes(), code, spec.wire_kv[1]),
                length=int(lengths[i]),
            )
            for i in range(len(ids))
        ],
    )


def fill_row(msg: pb.SearchResponse, spec: SessionSpec, result: SearchResult, row: int) -> None:
    """Write one query row of a search result into a reply message (the payload copied once)."""
    msg.row = row
    msg.ids[:] = result.ids[row].tolist()
    msg.scores[:] = result.scores[row].tolist()
    msg.lengths[:] = result.lengths[row].tolist()
    kv_shape = (result.ids.shape[1], *spec.wire_kv[1])
    tensor.fill(msg.kv, result.records[row].tobytes(), kv_dtype_code(spec), kv_shape)


def state_to_parts(session_id: str, spec: SessionSpec, state: dict[str, Any]) -> Iterator[pb.SessionPart]:
    """An exported state as a stream of parts, arrays split along axis 0 into ~8 MiB pieces."""
    yield pb.SessionPart(session_id=session_id, spec=spec_to_proto(spec))
    for name, value in state.items():
        if isinstance(value, np.ndarray):
            arr = value.astype(np.uint8) if value.dtype == np.bool_ else value
            row_bytes = max(1, arr[:1].nbytes)
            step = max(1, PART_BYTES // row_bytes)
            for lo in range(0, max(1, len(arr)), step):
                yield pb.SessionPart(
                    name=name, array=tensor.encode(arr[lo : lo + step]), row_offset=lo, total_rows=len(arr)
                )
        elif isinstance(value, (float, np.floating)):
            yield pb.SessionPart(name=name, real=float(value))
        else:
            yield pb.SessionPart(name=name, integer=int(value))


def parts_to_state(parts: Iterable[pb.SessionPart]) -> tuple[str, SessionSpec, dict[str, Any]]:
    """Reassemble `state_to_parts` output, bounded by the spec's memory_size."""
    it = iter(parts)
    first = next(it, None)
    if first is None or not first.HasField("spec"):
        raise InvalidArgument("parts[0].spec", "the first part must carry session_id and spec")
    spec = spec_from_proto(first.spec, "parts[0].spec")
    state: dict[str, Any] = {}
    filled: dict[str, int] = {}
    for i, part in enumerate(it, start=1):
        field = f"parts[{i}]"
        kind = part.WhichOneof("value")
        if kind == "array":
            if part.name not in STATE_ARRAYS:
                raise InvalidArgument(f"{field}.name", f"unknown array {part.name!r}")
            most = MAX_ACCEPTED_RUNS if part.name == "accepted" else spec.memory_size
            if not 0 <= part.total_rows <= most:
                raise InvalidArgument(f"{field}.total_rows", f"must be in 0..{most}")
            piece = tensor.decode(part.array, f"{field}.array")
            if piece.ndim == 0:
                raise InvalidArgument(f"{field}.array.shape", "must have a row axis")
            if part.name not in state:
                state[part.name] = np.empty((part.total_rows, *piece.shape[1:]), piece.dtype)
                filled[part.name] = 0
            whole = state[part.name]
            lo, hi = part.row_offset, part.row_offset + len(piece)
            if (
                lo != filled[part.name]
                or hi > len(whole)
                or piece.shape[1:] != whole.shape[1:]
                or piece.dtype != whole.dtype
            ):
                raise InvalidArgument(
                    f"{field}.row_offset", f"piece [{lo}, {hi}) does not continue {part.name!r}"
                )
            whole[lo:hi] = piece
            filled[part.name] = hi
        elif kind == "integer":
            state[part.name] = part.integer
        elif kind == "real":
            state[part.name] = part.real
        else:
            raise InvalidArgument(f"{field}.value", "must be set")
    for name, n in filled.items():
        if n != len(state[name]):
            raise InvalidArgument("parts", f"array {name!r} incomplete: {n} of {len(state[name])} rows")
        if name in BOOL_KEYS:
            state[name] = state[name].astype(np.bool_)
    return first.session_id, spec, state
