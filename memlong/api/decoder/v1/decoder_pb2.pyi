from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MemoryMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MEMORY_MODE_UNSPECIFIED: _ClassVar[MemoryMode]
    MEMORY_MODE_REQUIRED: _ClassVar[MemoryMode]
    MEMORY_MODE_IF_AVAILABLE: _ClassVar[MemoryMode]
    MEMORY_MODE_OFF: _ClassVar[MemoryMode]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
MEMORY_MODE_UNSPECIFIED: MemoryMode
MEMORY_MODE_REQUIRED: MemoryMode
MEMORY_MODE_IF_AVAILABLE: MemoryMode
MEMORY_MODE_OFF: MemoryMode
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP: FinishReason

class DescribeRequest(_message.Message):
    __slots__ = ("retrieval",)
    RETRIEVAL_FIELD_NUMBER: _ClassVar[int]
    retrieval: str
    def __init__(self, retrieval: _Optional[str] = ...) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("model", "memlong_config_json", "dim", "kv_shape", "kv_dtype", "memory_chunks", "vocab_size", "layout", "retrieval", "kv_codec")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MEMLONG_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    KV_SHAPE_FIELD_NUMBER: _ClassVar[int]
    KV_DTYPE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_FIELD_NUMBER: _ClassVar[int]
    KV_CODEC_FIELD_NUMBER: _ClassVar[int]
    model: str
    memlong_config_json: str
    dim: int
    kv_shape: _containers.RepeatedScalarFieldContainer[int]
    kv_dtype: str
    memory_chunks: int
    vocab_size: int
    layout: str
    retrieval: str
    kv_codec: str
    def __init__(self, model: _Optional[str] = ..., memlong_config_json: _Optional[str] = ..., dim: _Optional[int] = ..., kv_shape: _Optional[_Iterable[int]] = ..., kv_dtype: _Optional[str] = ..., memory_chunks: _Optional[int] = ..., vocab_size: _Optional[int] = ..., layout: _Optional[str] = ..., retrieval: _Optional[str] = ..., kv_codec: _Optional[str] = ...) -> None: ...

class SessionRef(_message.Message):
    __slots__ = ("session_id", "next_chunk_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NEXT_CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    next_chunk_id: int
    def __init__(self, session_id: _Optional[str] = ..., next_chunk_id: _Optional[int] = ...) -> None: ...

class IngestRequest(_message.Message):
    __slots__ = ("session", "text")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    session: SessionRef
    text: bytes
    def __init__(self, session: _Optional[_Union[SessionRef, _Mapping]] = ..., text: _Optional[bytes] = ...) -> None: ...

class IngestProgress(_message.Message):
    __slots__ = ("bytes_done", "tokens_done", "next_chunk_id", "done", "chunks_stored", "compute_s")
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_DONE_FIELD_NUMBER: _ClassVar[int]
    NEXT_CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_STORED_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    bytes_done: int
    tokens_done: int
    next_chunk_id: int
    done: bool
    chunks_stored: int
    compute_s: float
    def __init__(self, bytes_done: _Optional[int] = ..., tokens_done: _Optional[int] = ..., next_chunk_id: _Optional[int] = ..., done: _Optional[bool] = ..., chunks_stored: _Optional[int] = ..., compute_s: _Optional[float] = ...) -> None: ...

class MemoryReport(_message.Message):
    __slots__ = ("memory_used", "note", "retrievals", "retrieved_ids", "retrieval_wait_s", "compute_s", "retrieval_total_s", "bytes_retrieved", "query", "queue_s", "retrieval_hidden_s", "prefetched_retrievals")
    MEMORY_USED_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    RETRIEVALS_FIELD_NUMBER: _ClassVar[int]
    RETRIEVED_IDS_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    BYTES_RETRIEVED_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_HIDDEN_S_FIELD_NUMBER: _ClassVar[int]
    PREFETCHED_RETRIEVALS_FIELD_NUMBER: _ClassVar[int]
    memory_used: bool
    note: str
    retrievals: int
    retrieved_ids: _containers.RepeatedScalarFieldContainer[int]
    retrieval_wait_s: float
    compute_s: float
    retrieval_total_s: float
    bytes_retrieved: int
    query: str
    queue_s: float
    retrieval_hidden_s: float
    prefetched_retrievals: int
    def __init__(self, memory_used: _Optional[bool] = ..., note: _Optional[str] = ..., retrievals: _Optional[int] = ..., retrieved_ids: _Optional[_Iterable[int]] = ..., retrieval_wait_s: _Optional[float] = ..., compute_s: _Optional[float] = ..., retrieval_total_s: _Optional[float] = ..., bytes_retrieved: _Optional[int] = ..., query: _Optional[str] = ..., queue_s: _Optional[float] = ..., retrieval_hidden_s: _Optional[float] = ..., prefetched_retrievals: _Optional[int] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("session", "text", "memory_mode", "commit", "return_logprobs")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MODE_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    RETURN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    session: SessionRef
    text: bytes
    memory_mode: MemoryMode
    commit: bool
    return_logprobs: bool
    def __init__(self, session: _Optional[_Union[SessionRef, _Mapping]] = ..., text: _Optional[bytes] = ..., memory_mode: _Optional[_Union[MemoryMode, str]] = ..., commit: _Optional[bool] = ..., return_logprobs: _Optional[bool] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("token_ids", "logprobs", "scored_tokens", "perplexity", "memory", "next_chunk_id")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    SCORED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    NEXT_CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    scored_tokens: int
    perplexity: float
    memory: MemoryReport
    next_chunk_id: int
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., scored_tokens: _Optional[int] = ..., perplexity: _Optional[float] = ..., memory: _Optional[_Union[MemoryReport, _Mapping]] = ..., next_chunk_id: _Optional[int] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "has_seed", "stop_token_ids", "stop_strings", "ignore_eos")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    HAS_SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    STOP_STRINGS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    has_seed: bool
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    stop_strings: _containers.RepeatedScalarFieldContainer[str]
    ignore_eos: bool
    def __init__(self, max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., has_seed: _Optional[bool] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., stop_strings: _Optional[_Iterable[str]] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("session", "prompt", "sampling", "memory_mode")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MODE_FIELD_NUMBER: _ClassVar[int]
    session: SessionRef
    prompt: bytes
    sampling: SamplingParams
    memory_mode: MemoryMode
    def __init__(self, session: _Optional[_Union[SessionRef, _Mapping]] = ..., prompt: _Optional[bytes] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., memory_mode: _Optional[_Union[MemoryMode, str]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("token_id", "text", "finish_reason", "memory", "prompt_tokens")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    text: str
    finish_reason: FinishReason
    memory: MemoryReport
    prompt_tokens: int
    def __init__(self, token_id: _Optional[int] = ..., text: _Optional[str] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., memory: _Optional[_Union[MemoryReport, _Mapping]] = ..., prompt_tokens: _Optional[int] = ...) -> None: ...
