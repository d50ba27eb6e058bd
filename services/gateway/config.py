"""The gateway's settings: one frozen dataclass, validated, built from CLI / env / key file in one place.

API keys come from a JSON file `{"keys": {"<key>": "<tenant>", ...}}` (--api-keys-file or
MEMLONG_API_KEYS_FILE) or from MEMLONG_API_KEYS="key=tenant,key2=tenant2". Only their SHA-256
hashes are kept.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from memlong.errors import InvalidArgument, check_port, check_positive
from memlong.rpc.channel import DEFAULT_MAX_MESSAGE_BYTES
from memlong.rpc.internal import token_from_env
from memlong.rpc.tls import TlsConfig
from memlong.services.retmem.routing import parse_addresses

from .interceptors import hash_key


@dataclass(frozen=True)
class Quotas:
    """Per-tenant limits; exceeding one answers RESOURCE_EXHAUSTED."""

    max_sessions: int = 100
    max_tenant_text_bytes: int = 1 << 30  # text committed over all of the tenant's sessions
    max_inflight: int = 4  # calls at once

    def __post_init__(self) -> None:
        check_positive(self, ("max_sessions", "max_tenant_text_bytes", "max_inflight"), "quotas.")


@dataclass(frozen=True)
class GatewayConfig:
    """Settings of one gateway."""

    decoders: Mapping[str, str]  # replica name -> host:port
    retmem: Mapping[str, str]  # shard name -> host:port (the whole ring)
    key_hashes: Mapping[str, str]  # sha256(API key) -> tenant
    data_dir: Path | None = None  # session table; None keeps it in memory only
    host: str = "127.0.0.1"
    port: int = 0
    quotas: Quotas = field(default_factory=Quotas)
    max_inflight: int = 16  # calls at once over all tenants (backpressure)
    default_timeout_s: float = 600.0  # for calls that arrive without a deadline
    max_timeout_s: float = 3600.0
    max_append_bytes: int = 32 << 20  # one Append stream
    max_request_text_bytes: int = 4 << 20  # the text of one Score call or one Generate prompt
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    grace_s: float = 5.0
    internal_token: str | None = None  # sent to the decoders and ret-mem (memlong.rpc.internal)
    # TLS of the public port and of the channels to the decoders and ret-mem; None: the process's
    # public / internal policy (memlong.rpc.tls).
    tls: TlsConfig | None = None
    internal_tls: TlsConfig | None = None

    def __post_init__(self) -> None:
        if not self.decoders:
            raise InvalidArgument("decoders", "at least one decoder address is needed")
        if not self.retmem:
            raise InvalidArgument("retmem", "at least one ret-mem shard address is needed")
        if not self.key_hashes:
            raise InvalidArgument("api_keys", "no API keys configured: every call would be refused")
        check_port(self.port)
        check_positive(
            self, ("max_inflight", "max_append_bytes", "max_request_text_bytes", "max_message_bytes")
        )
        if not 0 < self.default_timeout_s <= self.max_timeout_s:
            raise InvalidArgument("default_timeout_s", "must be in (0, max_timeout_s]")


def parse_keys(text: str) -> dict[str, str]:
    """ "key=tenant,key2=tenant2" -> {sha256(key): tenant}."""
    out: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, tenant = item.partition("=")
        if not sep or not key or not tenant:
            raise InvalidArgument("api_keys", "expected key=tenant,...")
        out[hash_key(key)] = tenant
    return out


def load_key_file(path: Path) -> dict[str, str]:
    data = json.loads(Path(path).read_text())
    if set(data) != {"keys"} or not isinstance(data["keys"], dict):
        raise InvalidArgument("api_keys_file", 'must be {"keys": {"<key>": "<tenant>"}}')
    return {hash_key(str(k)): str(t) for k, t in data["keys"].items()}


def add_arguments(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    p.add_argument("--host", default=env("MEMLONG_GATEWAY_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env("MEMLONG_GATEWAY_PORT", "50051")), help="0: free port")
    p.add_argument("--decoders", default=env("MEMLONG_GATEWAY_DECODERS", ""), help="name=host:port,...")
    p.add_argument("--retmem", default=env("MEMLONG_GATEWAY_RETMEM", ""), help="shard=host:port,...")
    p.add_argument("--data-dir", type=Path, default=env("MEMLONG_GATEWAY_DATA_DIR"))
    p.add_argument("--api-keys-file", type=Path, default=env("MEMLONG_API_KEYS_FILE"))
    p.add_argument("--max-sessions", type=int, default=100, help="per tenant")
    p.add_argument("--max-tenant-inflight", type=int, default=4)
    p.add_argument("--max-inflight", type=int, default=16)
    # Two text limits, each its own name (unset: the config's default).
    p.add_argument(
        "--max-tenant-text-bytes",
        type=int,
        default=env("MEMLONG_GATEWAY_MAX_TENANT_TEXT_BYTES"),
        help="text stored over all of a tenant's sessions (quota; default 1 GiB)",
    )
    p.add_argument(
        "--max-request-text-bytes",
        type=int,
        default=env("MEMLONG_GATEWAY_MAX_REQUEST_TEXT_BYTES"),
        help="the text of one Score call or one Generate prompt (default 4 MiB)",
    )


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    keys = parse_keys(os.environ.get("MEMLONG_API_KEYS", ""))
    if args.api_keys_file:
        keys.update(load_key_file(args.api_keys_file))
    return GatewayConfig(
        internal_token=token_from_env(),
        decoders=parse_addresses(args.decoders),
        retmem=parse_addresses(args.retmem),
        key_hashes=keys,
        data_dir=args.data_dir,
        host=args.host,
        port=args.port,
        quotas=Quotas(
            max_sessions=args.max_sessions,
            max_inflight=args.max_tenant_inflight,
            **_given(max_tenant_text_bytes=args.max_tenant_text_bytes),
        ),
        max_inflight=args.max_inflight,
        **_given(max_request_text_bytes=args.max_request_text_bytes),
    )


def _given(**values: str | int | None) -> dict[str, int]:
    """The limits set by a flag or its environment variable (as ints); the others keep their default."""
    return {name: int(v) for name, v in values.items() if v is not None}
