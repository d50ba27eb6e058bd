"""MemLong settings: which layers store and read memory, chunk, window, top-k. No torch here, so that
services that only pass settings around (gateway, ret-mem, the command line) start without it."""

from __future__ import annotations

from dataclasses import dataclass

from memlong.dtypes import KV_CODECS, KV_DTYPES
from memlong.errors import InvalidArgument, check_positive

LAYOUTS = ("per_layer", "paper")
RETRIEVAL_SOURCES = ("text", "keys")
READERS = ("stream", "side")


def retrieval_source(layout_tag: str) -> str:
    """The retrieval source recorded in a session's layout tag (`MemLongConfig.layout_tag`)."""
    return "keys" if ";retrieval=keys" in layout_tag else "text"


@dataclass(frozen=True)
class MemLongConfig:
    """MemLong settings. Layer indices are 0-based decoder layers of the wrapped model.

    Two memory layouts:
    - "per_layer" (default; training-free): every layer in `mem_layers` (empty: all layers) stores its
      own pre-RoPE K/V per chunk and reads them back. One record per chunk holds all of them.
    - "paper": MemLong's layout. Only `mem_layer` stores K/V; the `ret_attn_layers` read them through
      their own projections, which needs stage-2 training (untrained it costs +68 % perplexity).
    """

    layout: str = "per_layer"  # "per_layer" or "paper"
    mem_layers: tuple[int, ...] = ()  # per_layer: layers that store and read their own K/V (empty: all)
    mem_layer: int = 15  # layer whose pre-RoPE K/V are stored as memory; layers 0..mem_layer are frozen
    ret_attn_layers: tuple[int, ...] = (15, 19, 23, 27)  # layers attending to [memory ; local]
    chunk: int = 128  # tokens per memory chunk
    top_k: int = 8  # chunks retrieved per chunk boundary
    local_window: int = 1024  # previous tokens each token sees locally (plus itself)
    memory_size: int = 1 << 20  # tokens of memory per session (rounded down to whole chunks)
    query: str = "prev_chunk"  # retrieval query: the chunk of text just before the tokens predicted
    # "zero": memory keys unrotated, at position 0 (the paper's choice; measured as good as "prefix" for
    # per-layer memory, bench/results/study_8k); "prefix": the retrieved chunks read as the text just
    # before the window.
    mem_position: str = "zero"
    kv_dtype: str = "bfloat16"  # dtype of stored memory K/V
    # How a chunk's record holds its K/V (memlong.kvcodec): "none" (kv_dtype values), "int8" or "fp8"
    # (compact, about half the bytes; expanded before attention).
    kv_codec: str = "none"
    sink_tokens: int = 4  # first tokens of a stream every layer keeps attending to (attention sinks)
    # What chunks are found by. "text": the retriever's embedding of the chunk's text, queried with the
    # embedding of the text before the boundary (MemLong). "keys": the model's own attention (LongMem's
    # token-to-chunk): a chunk is the mean of its stored keys at `key_layers`, the query the mean of the
    # previous chunk's attention queries there (as rotated when they attend memory), per KV head.
    retrieval: str = "text"
    # "keys": layers whose keys and queries are used (empty: `key_layers_of` picks them).
    key_layers: tuple[int, ...] = ()
    # "keys": the query is the mean of the last `key_query_tokens` queries before the boundary (0: the
    # whole chunk) minus `key_query_center` x the whole chunk's mean query, which takes out what every
    # query has in common (without it the same few "hub" chunks win every search). Defaults from
    # bench/results/keys_study (passkey, SmolLM2-135M): last token, half the common direction.
    key_query_tokens: int = 1
    key_query_center: float = 0.5
    # "text": a given prompt (generation) is retrieved for with its last `prompt_query_tokens` tokens
    # (0: its last chunk). Shorter spans keep the question and leave out the text before it, which at
    # long lengths matches other chunks better than the one sought (bench/results/passkey_query_study),
    # With the served ingest, at 64k the last 32 tokens' other chunks steered the answer away from the key
    # (bench/results/passkey_read_study); with an ingest that reads no memory, the question reading the
    # best chunk the last 32 tokens find answers it (bench/results/noingest_study): 32.
    prompt_query_tokens: int = 32
    # Chunks read for a given prompt's retrieval (0: `top_k`). Passkey at 16k answers the same with 1, 2,
    # 4 or 8 once the needle's chunk is among them (bench/results/passkey_read_study); 1 with the rest of
    # the defaults (bench/results/noingest_study).
    prompt_top_k: int = 1
    # A given prompt's chunks within the last `local_window` tokens of its end (the window its
    # continuation reads) read memory retrieved with the prompt's query too, not with the chunk before
    # each of them: the text just before the question then sees what the question is about. False: only
    # the prompt's last partial chunk reads it. Passkey answers the same either way (16k under the old
    # ingest, bench/results/passkey_read_study; 64k with the rest of the defaults, `q32 p1` against
    # `window q32 p1` in bench/results/noingest_study), but when the window holds the prompt's own
    # demonstrations, reading a retrieved chunk through them costs ICL 13 points (SST-2/MR,
    # bench/results/icl_readings): False.
    prompt_window: bool = False
    # A given prompt's retrieved chunks read as text inserted right before where the prompt starts
    # reading them (model.Memory.anchor): each query sees them at their distance from there, in their
    # own order, and the local text before them moved back by their length. False: at `mem_position`.
    # Full attention over the needle's chunk so placed answers the 64k passkey 9/10, over it sharing
    # the window's positions 6/10 (bench/results/passkey_oracle, `warm near ctx`, `warm near overlap`),
    # but the reader answers worse with it than at position 0 (trials 0-2: mean log p(key) -2.32 against
    # -2.01, bench/results/passkey_read_study): False.
    prompt_insert: bool = False
    # False: ingest reads only its local window (no retrieval), stores what it computes there; scoring and
    # generation still read memory. Stored chunks then hold only their own text, not the unrelated chunks
    # their predecessor retrieved (the cause of the 64k passkey misses: bench/results/passkey_ingest_study):
    # with the prompt defaults above, passkey 64k 8/10 against 4/10 (bench/results/noingest_study); KJV
    # perplexity +0.7 % at 8k and 32k (bench/results/noingest). Ingesting a text then scoring more then
    # equals the same calls in one session, not scoring it all; True: ingest reads memory as scoring does,
    # and it does (so does the side reader).
    ingest_memory: bool = False
    # Who reads memory. "stream": the text's own pass (every layer's window K/V, and so the chunks stored,
    # carry what it read). "side" (LongMem's decoupling, training-free): the text is read once without
    # memory (a plain sliding-window pass: its K/V fill the window and memory), and a second pass on the
    # same weights reads memory for the tokens' own outputs, its queries attending to memory and that
    # pass's window K/V in one softmax. Ingest then runs the first pass only and retrieves nothing, and
    # ingesting a text then scoring more equals scoring it all. Per-layer layout only.
    reader: str = "stream"

    def __post_init__(self) -> None:
        object.__setattr__(self, "ret_attn_layers", tuple(sorted(int(i) for i in self.ret_attn_layers)))
        object.__setattr__(self, "mem_layers", tuple(sorted({int(i) for i in self.mem_layers})))
        object.__setattr__(self, "key_layers", tuple(sorted({int(i) for i in self.key_layers})))
        if self.layout not in LAYOUTS:
            raise InvalidArgument("layout", f"must be one of {LAYOUTS}, got {self.layout!r}")
        if self.mem_layers and self.mem_layers[0] < 0:
            raise InvalidArgument("mem_layers", "layer indices must be >= 0")
        if self.mem_layer < 0:
            raise InvalidArgument("mem_layer", f"must be >= 0, got {self.mem_layer}")
        if not self.ret_attn_layers:
            raise InvalidArgument("ret_attn_layers", "at least one retrieval layer is needed")
        if self.ret_attn_layers[0] < self.mem_layer:
            # Layers below the memory layer must not see memory: that keeps 0..mem_layer a pure
            # function of the text, so stored K/V never depend on what was retrieved.
            raise InvalidArgument("ret_attn_layers", "retrieval layers must be >= mem_layer")
        if self.sink_tokens < 0:
            raise InvalidArgument("sink_tokens", f"must be >= 0, got {self.sink_tokens}")
        check_positive(self, ("chunk", "top_k", "local_window", "memory_size"))
        if self.memory_size < self.chunk:
            raise InvalidArgument("memory_size", "must hold at least one chunk")
        if self.query not in ("prev_chunk",):
            raise InvalidArgument("query", f"unknown retrieval query mode {self.query!r}")
        if self.mem_position not in ("zero", "prefix"):
            raise InvalidArgument("mem_position", f"unknown memory position mode {self.mem_position!r}")
        if self.retrieval not in RETRIEVAL_SOURCES:
            raise InvalidArgument("retrieval", f"must be one of {RETRIEVAL_SOURCES}, got {self.retrieval!r}")
        if not 0 <= self.key_query_tokens <= self.chunk:
            raise InvalidArgument("key_query_tokens", f"must be in 0..chunk, got {self.key_query_tokens}")
        if self.prompt_query_tokens < 0:
            raise InvalidArgument(
                "prompt_query_tokens",
                f"must be >= 0 (0: the prompt's last chunk), got {self.prompt_query_tokens}",
            )
        if self.prompt_top_k < 0:
            raise InvalidArgument("prompt_top_k", f"must be >= 0 (0: top_k), got {self.prompt_top_k}")
        if not 0.0 <= self.key_query_center <= 1.0:  # false for NaN too
            raise InvalidArgument("key_query_center", f"must be in [0, 1], got {self.key_query_center}")
        if self.key_layers and self.key_layers[0] < 0:
            raise InvalidArgument("key_layers", "layer indices must be >= 0")
        if self.kv_dtype not in KV_DTYPES:
            raise InvalidArgument("kv_dtype", f"unsupported {self.kv_dtype!r}")
        if self.reader not in READERS:
            raise InvalidArgument("reader", f"must be one of {READERS}, got {self.reader!r}")
        if self.reader == "side" and self.layout != "per_layer":
            raise InvalidArgument("reader", "the side reader reads per-layer memory (layout per_layer)")
        if self.reader == "side" and self.prompt_insert:
            raise InvalidArgument("prompt_insert", "the side reader reads memory at mem_position only")
        if self.kv_codec not in KV_CODECS:
            raise InvalidArgument("kv_codec", f"must be one of {KV_CODECS}, got {self.kv_codec!r}")

    @classmethod
    def from_dict(cls, values: dict) -> MemLongConfig:
        """Build from a mapping, rejecting unknown keys (they are almost always typos)."""
        known = set(cls.__dataclass_fields__)
        unknown = set(values) - known
        if unknown:
            raise InvalidArgument(sorted(unknown)[0], f"unknown MemLong setting; known: {sorted(known)}")
        return cls(**values)

    def check_model(self, n_layers: int) -> None:
        if self.layout == "paper" and (self.ret_attn_layers[-1] >= n_layers or self.mem_layer >= n_layers):
            raise InvalidArgument("ret_attn_layers", f"model has only {n_layers} layers")
        if self.mem_layers and self.mem_layers[-1] >= n_layers:
            raise InvalidArgument("mem_layers", f"model has only {n_layers} layers")
        if self.retrieval == "keys":
            stored = set(self.memory_layers(n_layers))
            if not set(self.key_layers_of(n_layers)) <= stored:
                raise InvalidArgument(
                    "key_layers", f"retrieval by keys reads stored layers only: {sorted(stored)}"
                )

    def key_layers_of(self, n_layers: int) -> tuple[int, ...]:
        """The layers retrieval by keys reads: `key_layers`, else the memory layer (paper layout) or the
        two stored layers at 40 % of the depth (per-layer memory: 12 and 13 of SmolLM2's 30, where
        bench/results/keys_study found the needle most often)."""
        if self.key_layers:
            return self.key_layers
        stored = self.memory_layers(n_layers)
        at = len(stored) * 2 // 5
        return tuple(stored[at : at + 2])

    def key_slices(self, n_layers: int) -> tuple[int, ...]:
        """Indices of the key layers in the stored record (`memory_layers` order)."""
        order = {layer: i for i, layer in enumerate(self.memory_layers(n_layers))}
        return tuple(order[layer] for layer in self.key_layers_of(n_layers))

    def memory_layers(self, n_layers: int) -> tuple[int, ...]:
        """Layers whose K/V are stored, in record order."""
        if self.layout == "paper":
            return (self.mem_layer,)
        return self.mem_layers or tuple(range(n_layers))

    def read_index(self, n_layers: int) -> dict[int, int]:
        """layer -> which stored layer's K/V it reads (index into `memory_layers`)."""
        if self.layout == "paper":
            return {r: 0 for r in self.ret_attn_layers}
        return {layer: i for i, layer in enumerate(self.memory_layers(n_layers))}

    def layout_tag(self, n_layers: int) -> str:
        """What wrote a session's memory; a reader of another layout is refused (see `SessionSpec`)."""
        if self.layout == "paper":
            return f"paper:mem_layer={self.mem_layer}" + self._retrieval_tag(n_layers)
        layers = self.memory_layers(n_layers)
        return "per_layer:" + ",".join(map(str, layers)) + self._retrieval_tag(n_layers)

    def _retrieval_tag(self, n_layers: int) -> str:
        """ "" for text retrieval (the tag sessions had before keys existed), else the key layers."""
        return (
            ""
            if self.retrieval == "text"
            else ";retrieval=keys:" + ",".join(map(str, self.key_layers_of(n_layers)))
        )

    def retrieval_label(self, n_layers: int | None = None) -> str:
        """What chunks are found by, for result tables: "text", or "keys" with the key layers (the
        default ones resolved when the model's layer count is given)."""
        if self.retrieval == "text":
            return "text"
        layers = self.key_layers_of(n_layers) if n_layers else self.key_layers
        return "keys:" + (",".join(map(str, layers)) or "default")

    @property
    def ingest_reads_memory(self) -> bool:
        """Whether ingest retrieves and reads memory as scoring does (the stream reader with
        `ingest_memory`); the side reader's ingest never does: it has no outputs to read it for."""
        return self.ingest_memory and self.reader == "stream"

    def reading_label(self) -> str:
        """Who reads memory, for result tables: "side", "stream", or "stream (ingest reads no memory)"."""
        if self.reader == "side" or self.ingest_reads_memory:
            return self.reader
        return "stream (ingest reads no memory)"

    def prompt_label(self) -> str:
        """How a given prompt retrieves, for result tables: its query span, chunks read, window."""
        parts = [f"last {self.prompt_query_tokens} tokens" if self.prompt_query_tokens else "last chunk"]
        if self.prompt_top_k:
            parts.append(f"top-{self.prompt_top_k}")
        if self.prompt_window:
            parts.append("window")
        if self.prompt_insert:
            parts.append("inserted")
        return ", ".join(parts)

    def describe(self) -> str:
        """One line for logs and reports: the layout and the reading settings."""
        if self.layout == "paper":
            where = f"paper layout: mem_layer {self.mem_layer}, retrieval layers {list(self.ret_attn_layers)}"
        else:
            where = "per-layer memory: " + (
                f"layers {list(self.mem_layers)}" if self.mem_layers else "every layer"
            )
        return (
            f"{where}; chunk {self.chunk}, top-k {self.top_k}, local window {self.local_window}, "
            f"{self.sink_tokens} sinks, memory keys at '{self.mem_position}', query '{self.query}', "
            f"retrieval by {self.retrieval_label()}; memory read by: {self.reading_label()}; a prompt "
            f"retrieves with: {self.prompt_label()}"
        )

    @property
    def memory_chunks(self) -> int:
        return self.memory_size // self.chunk
