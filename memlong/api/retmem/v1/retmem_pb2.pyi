from memlong.api.common.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SharedRegion(_message.Message):
    __slots__ = ("segment", "offset", "length")
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    segment: str
    offset: int
    length: int
    def __init__(self, segment: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class AttachRequest(_message.Message):
    __slots__ = ("segment", "nonce_bytes")
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    NONCE_BYTES_FIELD_NUMBER: _ClassVar[int]
    segment: str
    nonce_bytes: int
    def __init__(self, segment: _Optional[str] = ..., nonce_bytes: _Optional[int] = ...) -> None: ...

class AttachResponse(_message.Message):
    __slots__ = ("nonce",)
    NONCE_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    def __init__(self, nonce: _Optional[bytes] = ...) -> None: ...

class EvictionPolicy(_message.Message):
    __slots__ = ("protect_newest", "drop_oldest", "evict_free")
    PROTECT_NEWEST_FIELD_NUMBER: _ClassVar[int]
    DROP_OLDEST_FIELD_NUMBER: _ClassVar[int]
    EVICT_FREE_FIELD_NUMBER: _ClassVar[int]
    protect_newest: float
    drop_oldest: float
    evict_free: float
    def __init__(self, protect_newest: _Optional[float] = ..., drop_oldest: _Optional[float] = ..., evict_free: _Optional[float] = ...) -> None: ...

class SessionSpec(_message.Message):
    __slots__ = ("dim", "kv_shape", "kv_dtype", "memory_size", "eviction", "layout", "kv_codec")
    DIM_FIELD_NUMBER: _ClassVar[int]
    KV_SHAPE_FIELD_NUMBER: _ClassVar[int]
    KV_DTYPE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_SIZE_FIELD_NUMBER: _ClassVar[int]
    EVICTION_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    KV_CODEC_FIELD_NUMBER: _ClassVar[int]
    dim: int
    kv_shape: _containers.RepeatedScalarFieldContainer[int]
    kv_dtype: _tensor_pb2.DType
    memory_size: int
    eviction: EvictionPolicy
    layout: str
    kv_codec: str
    def __init__(self, dim: _Optional[int] = ..., kv_shape: _Optional[_Iterable[int]] = ..., kv_dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., memory_size: _Optional[int] = ..., eviction: _Optional[_Union[EvictionPolicy, _Mapping]] = ..., layout: _Optional[str] = ..., kv_codec: _Optional[str] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("session_id", "spec")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    spec: SessionSpec
    def __init__(self, session_id: _Optional[str] = ..., spec: _Optional[_Union[SessionSpec, _Mapping]] = ...) -> None: ...

class CreateSessionResponse(_message.Message):
    __slots__ = ("shard",)
    SHARD_FIELD_NUMBER: _ClassVar[int]
    shard: str
    def __init__(self, shard: _Optional[str] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("seq", "embedding", "kv", "length", "kv_region")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    KV_REGION_FIELD_NUMBER: _ClassVar[int]
    seq: int
    embedding: _tensor_pb2.Tensor
    kv: _tensor_pb2.Tensor
    length: int
    kv_region: SharedRegion
    def __init__(self, seq: _Optional[int] = ..., embedding: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., kv: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., length: _Optional[int] = ..., kv_region: _Optional[_Union[SharedRegion, _Mapping]] = ...) -> None: ...

class AppendRequest(_message.Message):
    __slots__ = ("session_id", "chunks")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    chunks: _containers.RepeatedCompositeFieldContainer[Chunk]
    def __init__(self, session_id: _Optional[str] = ..., chunks: _Optional[_Iterable[_Union[Chunk, _Mapping]]] = ...) -> None: ...

class AppendResponse(_message.Message):
    __slots__ = ("appended",)
    APPENDED_FIELD_NUMBER: _ClassVar[int]
    appended: int
    def __init__(self, appended: _Optional[int] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("session_id", "queries", "top_k", "reply_region", "max_records_per_message")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    REPLY_REGION_FIELD_NUMBER: _ClassVar[int]
    MAX_RECORDS_PER_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    queries: _tensor_pb2.Tensor
    top_k: int
    reply_region: SharedRegion
    max_records_per_message: int
    def __init__(self, session_id: _Optional[str] = ..., queries: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., top_k: _Optional[int] = ..., reply_region: _Optional[_Union[SharedRegion, _Mapping]] = ..., max_records_per_message: _Optional[int] = ...) -> None: ...

class RetrieveResponse(_message.Message):
    __slots__ = ("rows",)
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[SearchResponse]
    def __init__(self, rows: _Optional[_Iterable[_Union[SearchResponse, _Mapping]]] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("row", "ids", "scores", "lengths", "kv", "kv_region", "record_crcs", "first_slot", "records_checked")
    ROW_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    KV_REGION_FIELD_NUMBER: _ClassVar[int]
    RECORD_CRCS_FIELD_NUMBER: _ClassVar[int]
    FIRST_SLOT_FIELD_NUMBER: _ClassVar[int]
    RECORDS_CHECKED_FIELD_NUMBER: _ClassVar[int]
    row: int
    ids: _containers.RepeatedScalarFieldContainer[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    lengths: _containers.RepeatedScalarFieldContainer[int]
    kv: _tensor_pb2.Tensor
    kv_region: SharedRegion
    record_crcs: _containers.RepeatedScalarFieldContainer[int]
    first_slot: int
    records_checked: bool
    def __init__(self, row: _Optional[int] = ..., ids: _Optional[_Iterable[int]] = ..., scores: _Optional[_Iterable[float]] = ..., lengths: _Optional[_Iterable[int]] = ..., kv: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., kv_region: _Optional[_Union[SharedRegion, _Mapping]] = ..., record_crcs: _Optional[_Iterable[int]] = ..., first_slot: _Optional[int] = ..., records_checked: _Optional[bool] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("session_id", "ids")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, session_id: _Optional[str] = ..., ids: _Optional[_Iterable[int]] = ...) -> None: ...

class FetchResponse(_message.Message):
    __slots__ = ("lengths", "kv")
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    lengths: _containers.RepeatedScalarFieldContainer[int]
    kv: _tensor_pb2.Tensor
    def __init__(self, lengths: _Optional[_Iterable[int]] = ..., kv: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class PinRequest(_message.Message):
    __slots__ = ("session_id", "ids")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, session_id: _Optional[str] = ..., ids: _Optional[_Iterable[int]] = ...) -> None: ...

class PinResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EvictRequest(_message.Message):
    __slots__ = ("session_id", "n_free", "from_chunk_id", "to_chunk_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    N_FREE_FIELD_NUMBER: _ClassVar[int]
    FROM_CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    TO_CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    n_free: int
    from_chunk_id: int
    to_chunk_id: int
    def __init__(self, session_id: _Optional[str] = ..., n_free: _Optional[int] = ..., from_chunk_id: _Optional[int] = ..., to_chunk_id: _Optional[int] = ...) -> None: ...

class EvictResponse(_message.Message):
    __slots__ = ("evicted_ids",)
    EVICTED_IDS_FIELD_NUMBER: _ClassVar[int]
    evicted_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, evicted_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("session_id", "spec", "num_chunks", "shard", "stats")
    class StatsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    spec: SessionSpec
    num_chunks: int
    shard: str
    stats: _containers.ScalarMap[str, float]
    def __init__(self, session_id: _Optional[str] = ..., spec: _Optional[_Union[SessionSpec, _Mapping]] = ..., num_chunks: _Optional[int] = ..., shard: _Optional[str] = ..., stats: _Optional[_Mapping[str, float]] = ...) -> None: ...

class DeleteSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class DeleteSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExportSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class SessionPart(_message.Message):
    __slots__ = ("session_id", "spec", "name", "array", "integer", "real", "row_offset", "total_rows")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARRAY_FIELD_NUMBER: _ClassVar[int]
    INTEGER_FIELD_NUMBER: _ClassVar[int]
    REAL_FIELD_NUMBER: _ClassVar[int]
    ROW_OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROWS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    spec: SessionSpec
    name: str
    array: _tensor_pb2.Tensor
    integer: int
    real: float
    row_offset: int
    total_rows: int
    def __init__(self, session_id: _Optional[str] = ..., spec: _Optional[_Union[SessionSpec, _Mapping]] = ..., name: _Optional[str] = ..., array: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., integer: _Optional[int] = ..., real: _Optional[float] = ..., row_offset: _Optional[int] = ..., total_rows: _Optional[int] = ...) -> None: ...

class ImportSessionResponse(_message.Message):
    __slots__ = ("num_chunks", "shard")
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    num_chunks: int
    shard: str
    def __init__(self, num_chunks: _Optional[int] = ..., shard: _Optional[str] = ...) -> None: ...
