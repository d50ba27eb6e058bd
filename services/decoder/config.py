"""The decoder service's settings: one frozen dataclass, validated, built from CLI and env in one place."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from memlong.config import MemLongConfig
from memlong.errors import InvalidArgument, check_port, check_positive
from memlong.rpc.channel import DEFAULT_MAX_MESSAGE_BYTES
from memlong.rpc.internal import token_from_env
from memlong.rpc.tls import TlsConfig
from memlong.services.retmem.routing import parse_addresses

ENV_PREFIX = "MEMLONG_DECODER_"


@dataclass(frozen=True)
class DecoderConfig:
    """Settings of one decoder replica."""

    retmem: Mapping[str, str]  # ret-mem shard name -> host:port (the whole ring)
    memlong: MemLongConfig = field(default_factory=MemLongConfig)
    model: str | None = None  # HF checkpoint dir; None: the packaged SmolLM2
    adapter: str | None = None  # MemLong LoRA adapter dir folded into the weights (memlong train)
    host: str = "127.0.0.1"
    port: int = 0
    threads: int = 0  # torch intra-op threads; 0 leaves torch's default
    max_inflight: int = 4  # calls admitted at once; more get RESOURCE_EXHAUSTED (backpressure)
    default_timeout_s: float = 600.0  # for calls that arrive without a deadline
    retmem_timeout_s: float = 30.0  # cap of one ret-mem call (still never past the caller's deadline)
    # K/V through shared memory when ret-mem is on this host (memlong.services.retmem.shm); off: always
    # in the gRPC messages. MEMLONG_RETMEM_SHARED_MEMORY=0 turns it off for every client of a process.
    retmem_shared_memory: bool = True
    max_call_text_bytes: int = 64 << 20  # all the text of one call (an ingest stream, a Score, a prompt)
    prefetch: bool = True  # overlap the next chunk's retrieval with the current chunk's compute
    # Chunks a call's background writer may hold unacknowledged (its appends overlap the model's work,
    # several chunks per ret-mem Append when they queue up; services/decoder/writer.py); 0: each chunk
    # is appended in the serving thread before the model reads on.
    write_behind_chunks: int = 8
    ingest_progress_tokens: int = 2048  # tokens between two IngestProgress messages
    # Sessions whose local window (sinks + last local_window tokens, every layer) this replica keeps
    # between calls, so a call continues a session as one pass would; 0 turns it off (cold windows).
    window_cache_sessions: int = 8
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_workers: int = 16
    internal_token: str | None = None  # required of callers and sent to ret-mem (memlong.rpc.internal)
    tls: TlsConfig | None = None  # its port and its ret-mem channels; None: the process's internal policy
    grace_s: float = 5.0

    def __post_init__(self) -> None:
        if not self.retmem:
            raise InvalidArgument("retmem", "at least one ret-mem shard address is needed")
        check_port(self.port)
        check_positive(
            self,
            ("max_inflight", "max_call_text_bytes", "ingest_progress_tokens", "max_message_bytes")
            + ("default_timeout_s", "retmem_timeout_s"),
        )
        if self.threads < 0:
            raise InvalidArgument("threads", "must be >= 0")
        if self.window_cache_sessions < 0:
            raise InvalidArgument("window_cache_sessions", "must be >= 0")
        if self.write_behind_chunks < 0:
            raise InvalidArgument("write_behind_chunks", "must be >= 0")
        if self.max_workers < self.max_inflight + 2:
            raise InvalidArgument("max_workers", "must exceed max_inflight by 2 (health, refusals)")

    def describe(self) -> dict:
        """JSON-able summary (for logs and benchmark records)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["memlong"] = self.memlong.__dict__
        out["retmem"] = dict(self.retmem)
        return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Decoder flags (every flag also reads MEMLONG_DECODER_<NAME> from the environment)."""
    env = os.environ.get
    p.add_argument("--host", default=env(ENV_PREFIX + "HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env(ENV_PREFIX + "PORT", "50071")), help="0: free port")
    p.add_argument("--retmem", default=env(ENV_PREFIX + "RETMEM", ""), help="shard=host:port,... (the ring)")
    p.add_argument("--max-inflight", type=int, default=int(env(ENV_PREFIX + "MAX_INFLIGHT", "4")))
    p.add_argument("--no-prefetch", action="store_true", help="retrieve at the boundary, no overlap")
    p.add_argument(
        "--write-behind-chunks",
        type=int,
        default=int(env(ENV_PREFIX + "WRITE_BEHIND_CHUNKS", DecoderConfig.write_behind_chunks)),
        help="chunks a call's appends may have in flight in the background (0: append before reading on)",
    )
    p.add_argument(
        "--max-call-text-bytes",
        type=int,
        default=int(env(ENV_PREFIX + "MAX_CALL_TEXT_BYTES", DecoderConfig.max_call_text_bytes)),
        help="all the text of one call: an ingest stream, a Score text, a prompt (default 64 MiB)",
    )
    p.add_argument(
        "--no-retmem-shared-memory",
        action="store_true",
        default=env(ENV_PREFIX + "NO_RETMEM_SHARED_MEMORY", "") not in ("", "0"),
        help="keep K/V in the gRPC messages even when ret-mem is on this host",
    )
    p.add_argument(
        "--window-cache-sessions",
        type=int,
        default=int(env(ENV_PREFIX + "WINDOW_CACHE_SESSIONS", "8")),
        help="sessions whose local window this replica keeps between calls (per-layer SmolLM2: ~71 MB each)",
    )
    p.add_argument(
        "--memlong-json",
        default=env(ENV_PREFIX + "MEMLONG_JSON", ""),
        help='MemLong settings as JSON, overriding the flags, e.g. {"top_k": 4}',
    )


def config_from_args(args: argparse.Namespace) -> DecoderConfig:
    """Build the config from parsed flags (memlong.cli's model flags plus add_arguments')."""
    from memlong.flags import memlong_config

    memlong = memlong_config(args)
    if getattr(args, "memlong_json", ""):
        memlong = MemLongConfig.from_dict({**memlong.__dict__, **json.loads(args.memlong_json)})
    return DecoderConfig(
        internal_token=token_from_env(),
        retmem=parse_addresses(args.retmem),
        memlong=memlong,
        model=args.model,
        adapter=getattr(args, "adapter", None),
        host=args.host,
        port=args.port,
        threads=args.threads,
        max_inflight=args.max_inflight,
        prefetch=not args.no_prefetch,
        write_behind_chunks=args.write_behind_chunks,
        max_call_text_bytes=args.max_call_text_bytes,
        retmem_shared_memory=not getattr(args, "no_retmem_shared_memory", False),
        window_cache_sessions=args.window_cache_sessions,
    )
