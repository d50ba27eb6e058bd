from memlong.api.decoder.v1 import decoder_pb2 as _decoder_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Session(_message.Message):
    __slots__ = ("session_id", "name", "text_bytes", "tokens", "chunks", "created_at", "decoder", "shard", "retrieval")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TEXT_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    DECODER_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    name: str
    text_bytes: int
    tokens: int
    chunks: int
    created_at: float
    decoder: str
    shard: str
    retrieval: str
    def __init__(self, session_id: _Optional[str] = ..., name: _Optional[str] = ..., text_bytes: _Optional[int] = ..., tokens: _Optional[int] = ..., chunks: _Optional[int] = ..., created_at: _Optional[float] = ..., decoder: _Optional[str] = ..., shard: _Optional[str] = ..., retrieval: _Optional[str] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("name", "retrieval")
    NAME_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_FIELD_NUMBER: _ClassVar[int]
    name: str
    retrieval: str
    def __init__(self, name: _Optional[str] = ..., retrieval: _Optional[str] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions",)
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[Session]
    def __init__(self, sessions: _Optional[_Iterable[_Union[Session, _Mapping]]] = ...) -> None: ...

class DeleteSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class DeleteSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AppendRequest(_message.Message):
    __slots__ = ("session_id", "offset", "text")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    offset: int
    text: bytes
    def __init__(self, session_id: _Optional[str] = ..., offset: _Optional[int] = ..., text: _Optional[bytes] = ...) -> None: ...

class AppendProgress(_message.Message):
    __slots__ = ("bytes_done", "bytes_total", "tokens_done", "done", "text_bytes")
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    TOKENS_DONE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TEXT_BYTES_FIELD_NUMBER: _ClassVar[int]
    bytes_done: int
    bytes_total: int
    tokens_done: int
    done: bool
    text_bytes: int
    def __init__(self, bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ..., tokens_done: _Optional[int] = ..., done: _Optional[bool] = ..., text_bytes: _Optional[int] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("session_id", "text", "memory_mode", "return_logprobs")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MODE_FIELD_NUMBER: _ClassVar[int]
    RETURN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    text: bytes
    memory_mode: _decoder_pb2.MemoryMode
    return_logprobs: bool
    def __init__(self, session_id: _Optional[str] = ..., text: _Optional[bytes] = ..., memory_mode: _Optional[_Union[_decoder_pb2.MemoryMode, str]] = ..., return_logprobs: _Optional[bool] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("token_ids", "logprobs", "scored_tokens", "perplexity", "memory")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    SCORED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    scored_tokens: int
    perplexity: float
    memory: _decoder_pb2.MemoryReport
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., scored_tokens: _Optional[int] = ..., perplexity: _Optional[float] = ..., memory: _Optional[_Union[_decoder_pb2.MemoryReport, _Mapping]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("session_id", "prompt", "sampling", "memory_mode")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MODE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    prompt: bytes
    sampling: _decoder_pb2.SamplingParams
    memory_mode: _decoder_pb2.MemoryMode
    def __init__(self, session_id: _Optional[str] = ..., prompt: _Optional[bytes] = ..., sampling: _Optional[_Union[_decoder_pb2.SamplingParams, _Mapping]] = ..., memory_mode: _Optional[_Union[_decoder_pb2.MemoryMode, str]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("token",)
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    token: _decoder_pb2.GenerateResponse
    def __init__(self, token: _Optional[_Union[_decoder_pb2.GenerateResponse, _Mapping]] = ...) -> None: ...
