"""RetMemClient: ret-mem sessions over gRPC, routed by consistent hashing of session ids.

Every call carries a deadline (the client default, or the caller's remaining `Deadline`); only the
idempotent methods are retried, by the channel's service config. Server statuses come back as the
same domain exceptions the in-process store raises, so callers handle both the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc
import numpy as np

from memlong.api.retmem.v1 import retmem_pb2 as pb
from memlong.api.retmem.v1 import retmem_pb2_grpc as pb_grpc
from memlong.errors import InvalidArgument
from memlong.memory import SearchResult
from memlong.rpc.channel import DEFAULT_MAX_MESSAGE_BYTES, ChannelOptions, Deadline, get_channel
from memlong.rpc.status import raise_for_rpc_error
from memlong.rpc.tls import TlsConfig
from memlong.services.common import tensor

from . import wire
from .routing import Ring
from .store import SessionInfo, SessionSpec, as_records

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RetMem"].full_name
# Safe to repeat: appends are idempotent by chunk id, reads change at most retrieval counters.
IDEMPOTENT = ("Append", "Search", "Retrieve", "Fetch", "Pin", "Unpin", "GetSession", "ExportSession")


class RetMemClient:
    """Client for one ring of ret-mem shards. `shards` maps shard name -> "host:port"."""

    def __init__(
        self,
        shards: Mapping[str, str],
        timeout_s: float = 10.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        internal_token: str | None = None,
        tls: TlsConfig | None = None,  # None: the process's internal TLS policy
    ) -> None:
        self.ring = Ring(list(shards))
        self.targets = dict(shards)
        self.timeout_s = timeout_s
        self.max_message_bytes = max_message_bytes
        self.options = ChannelOptions(
            max_message_bytes=max_message_bytes,
            idempotent_methods=tuple((SERVICE_NAME, m) for m in IDEMPOTENT),
            internal_token=internal_token,
            tls=tls,
            internal=True,
        )
        self._specs: dict[str, SessionSpec] = {}

    # ------------------------------------------------------------------------------- plumbing

    def _stub(self, session_id: str) -> pb_grpc.RetMemStub:
        return pb_grpc.RetMemStub(get_channel(self.targets[self.ring.owner(session_id)], self.options))

    def _timeout(self, deadline: Deadline | None) -> float:
        return self.timeout_s if deadline is None else deadline.timeout(cap_s=self.timeout_s)

    def _call(self, session_id: str, method: str, request: Any, deadline: Deadline | None) -> Any:
        try:
            return getattr(self._stub(session_id), method)(request, timeout=self._timeout(deadline))
        except grpc.RpcError as err:
            raise_for_rpc_error(err)

    def spec(self, session_id: str, deadline: Deadline | None = None) -> SessionSpec:
        """The session's spec (cached: it never changes)."""
        spec = self._specs.get(session_id)
        if spec is None:
            spec = self.info(session_id, deadline).spec
            self._specs[session_id] = spec
        return spec

    # ----------------------------------------------------------------------------- the protocol

    def create_session(self, session_id: str, spec: SessionSpec, deadline: Deadline | None = None) -> None:
        req = pb.CreateSessionRequest(session_id=session_id, spec=wire.spec_to_proto(spec))
        self._call(session_id, "CreateSession", req, deadline)
        self._specs[session_id] = spec

    def append(
        self,
        session_id: str,
        ids: np.ndarray,
        embeddings: np.ndarray,
        kv: np.ndarray,
        lengths: np.ndarray,
        deadline: Deadline | None = None,
    ) -> int:
        """Append chunks: ids (n,), embeddings (n, dim) float32, kv (n, record_bytes) uint8 or typed."""
        spec = self.spec(session_id, deadline)
        records = as_records(spec, np.asarray(kv))  # (n, record_bytes)
        embeddings = np.asarray(embeddings, np.float32)
        # Several requests when the chunks would not fit one message (per-layer records are MBs each);
        # appends are idempotent per sequence number, so a retried part stores nothing twice.
        per_msg = max(1, (self.max_message_bytes - 4096) // (spec.record_bytes + 4 * spec.dim + 256))
        appended = 0
        for lo in range(0, len(ids), per_msg):
            part = slice(lo, lo + per_msg)
            req = wire.append_request(
                spec, session_id, ids[part], embeddings[part], records[part], lengths[part]
            )
            appended += self._call(session_id, "Append", req, deadline).appended
        return appended

    def search(
        self, session_id: str, queries: np.ndarray, top_k: int, deadline: Deadline | None = None
    ) -> SearchResult:
        """Top-k chunks per query row (chronological). records (q, k, record_bytes) uint8.

        A reply that fits one message comes from the unary Retrieve (one round trip: the decoder's
        per-chunk call); a larger one is streamed row by row by Search. With one query row the
        records are a read-only view of the reply (no copy).
        """
        spec = self.spec(session_id, deadline)
        queries = np.asarray(queries, np.float32)
        req = pb.SearchRequest(session_id=session_id, queries=tensor.encode(queries), top_k=top_k)
        q, k = len(queries), int(top_k)
        out = _Rows(spec, q, k)
        timeout = self._timeout(deadline)
        try:
            if q * (k * (spec.record_bytes + 32) + 64) <= self.max_message_bytes:
                for msg in self._stub(session_id).Retrieve(req, timeout=timeout).rows:
                    out.add(msg)
            else:
                for msg in self._stub(session_id).Search(req, timeout=timeout):
                    out.add(msg)
        except grpc.RpcError as err:
            raise_for_rpc_error(err)
        return out.result()

    def fetch(
        self, session_id: str, ids: np.ndarray, deadline: Deadline | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        spec = self.spec(session_id, deadline)
        ids = np.asarray(ids, np.int64).reshape(-1)
        resp = self._call(
            session_id, "Fetch", pb.FetchRequest(session_id=session_id, ids=ids.tolist()), deadline
        )
        kv = tensor.decode(resp.kv, "kv", shape=(len(ids), *spec.wire_kv[1]))
        return kv.view(np.uint8).reshape(len(ids), spec.record_bytes), np.asarray(resp.lengths, np.int32)

    def pin(self, session_id: str, ids: np.ndarray, deadline: Deadline | None = None) -> None:
        req = pb.PinRequest(session_id=session_id, ids=np.asarray(ids, np.int64).reshape(-1).tolist())
        self._call(session_id, "Pin", req, deadline)

    def unpin(self, session_id: str, ids: np.ndarray, deadline: Deadline | None = None) -> None:
        req = pb.PinRequest(session_id=session_id, ids=np.asarray(ids, np.int64).reshape(-1).tolist())
        self._call(session_id, "Unpin", req, deadline)

    def evict(
        self,
        session_id: str,
        n_free: int | None = None,
        id_range: tuple[int, int] | None = None,
        deadline: Deadline | None = None,
    ) -> np.ndarray:
        lo, hi = id_range or (0, 0)
        req = pb.EvictRequest(session_id=session_id, n_free=n_free or 0, from_chunk_id=lo, to_chunk_id=hi)
        return np.asarray(self._call(session_id, "Evict", req, deadline).evicted_ids, np.int64)

    def info(self, session_id: str, deadline: Deadline | None = None) -> SessionInfo:
        msg = self._call(session_id, "GetSession", pb.GetSessionRequest(session_id=session_id), deadline)
        return SessionInfo(
            msg.session_id, wire.spec_from_proto(msg.spec), msg.num_chunks, msg.shard, dict(msg.stats)
        )

    def delete_session(self, session_id: str, deadline: Deadline | None = None) -> None:
        self._call(session_id, "DeleteSession", pb.DeleteSessionRequest(session_id=session_id), deadline)
        self._specs.pop(session_id, None)

    def export_session(
        self, session_id: str, deadline: Deadline | None = None
    ) -> tuple[SessionSpec, dict[str, Any]]:
        try:
            parts = self._stub(session_id).ExportSession(
                pb.ExportSessionRequest(session_id=session_id), timeout=self._timeout(deadline)
            )
            _, spec, state = wire.parts_to_state(parts)
        except grpc.RpcError as err:
            raise_for_rpc_error(err)
        return spec, state

    def import_session(
        self, session_id: str, spec: SessionSpec, state: dict[str, Any], deadline: Deadline | None = None
    ) -> int:
        try:
            resp = self._stub(session_id).ImportSession(
                wire.state_to_parts(session_id, spec, state), timeout=self._timeout(deadline)
            )
        except grpc.RpcError as err:
            raise_for_rpc_error(err)
        self._specs[session_id] = spec
        return resp.num_chunks


class _Rows:
    """Assembles SearchResponse rows into a SearchResult, checking each row's K/V tensor."""

    def __init__(self, spec: SessionSpec, q: int, k: int) -> None:
        self.spec, self.q, self.k = spec, q, k
        self.code = (wire.kv_dtype_code(spec),)
        self.ids = np.full((q, k), -1, np.int64)  # (q, k)
        self.scores = np.full((q, k), -np.inf, np.float32)  # (q, k)
        self.lengths = np.zeros((q, k), np.int32)  # (q, k)
        self.records: np.ndarray | None = None  # (q, k, record_bytes)

    def add(self, msg: pb.SearchResponse) -> None:
        r, k, rb = msg.row, self.k, self.spec.record_bytes
        if not 0 <= r < self.q:
            raise InvalidArgument("row", f"reply row {r} outside 0..{self.q - 1}")
        kv = tensor.decode(msg.kv, f"rows[{r}].kv", dtypes=self.code, shape=(k, *self.spec.wire_kv[1]))
        self.ids[r], self.scores[r], self.lengths[r] = msg.ids, msg.scores, msg.lengths
        flat = kv.view(np.uint8).reshape(k, rb)  # (k, record_bytes), a view of the reply
        if self.q == 1:
            self.records = flat[None]
            return
        if self.records is None:
            self.records = np.zeros((self.q, k, rb), np.uint8)
        self.records[r] = flat

    def result(self) -> SearchResult:
        records = self.records
        if records is None:
            records = np.zeros((self.q, self.k, self.spec.record_bytes), np.uint8)
        return SearchResult(ids=self.ids, scores=self.scores, records=records, lengths=self.lengths)
