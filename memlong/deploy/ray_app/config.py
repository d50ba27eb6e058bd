"""The Ray Serve application's settings: one frozen dataclass, validated, from CLI flags in one place."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from memlong.errors import InvalidArgument


@dataclass(frozen=True)
class RayAppConfig:
    """Where each service listens and what it holds.

    Every replica runs the service's own gRPC server on a fixed port of its node, so plain gRPC
    clients reach the gateway directly and the ring of shard addresses is known before anything
    starts (session-stable routing needs no lookup). Ports: gateway `gateway_port`, decoder i
    `decoder_port + i`, shard i `retmem_port + i`; Serve's HTTP proxy `http_port` (the gateway
    deployment's OpenAI-compatible HTTP API).
    """

    data_dir: Path
    host: str = "127.0.0.1"
    gateway_port: int = 50051
    decoder_port: int = 50071
    retmem_port: int = 50061
    http_port: int = 8000  # Serve's HTTP proxy: the OpenAI-compatible API (the gateway's ingress)
    shards: int = 2
    decoders: int = 1
    api_keys: tuple[tuple[str, str], ...] = ()  # (key, tenant); empty: the local tenant's key file
    memlong: dict[str, Any] = field(default_factory=dict)  # MemLongConfig overrides
    model: str | None = None
    adapter: str | None = None  # MemLong LoRA adapter dir (a path every replica's node can read)
    threads: int = 0
    # "module:function" returning (model, tokenizer, retriever); None loads the packaged model.
    components: str | None = None
    app_name: str = "memlong"

    def __post_init__(self) -> None:
        if not 1 <= self.shards <= 64:
            raise InvalidArgument("shards", f"must be in [1, 64], got {self.shards}")
        if not 1 <= self.decoders <= 16:
            raise InvalidArgument("decoders", f"must be in [1, 16], got {self.decoders}")
        ports = [self.gateway_port, self.http_port, *self.decoder_ports, *self.retmem_ports]
        if len(set(ports)) != len(ports) or not all(0 < p < 65536 for p in ports):
            raise InvalidArgument(
                "ports", f"gateway, HTTP, decoder and shard ports overlap or are out of range: {ports}"
            )
        if self.components is not None and ":" not in self.components:
            raise InvalidArgument("components", "expected module:function")

    @property
    def decoder_ports(self) -> list[int]:
        return [self.decoder_port + i for i in range(self.decoders)]

    @property
    def retmem_ports(self) -> list[int]:
        return [self.retmem_port + i for i in range(self.shards)]

    @property
    def ring(self) -> dict[str, str]:
        """Shard name -> address: the ring every decoder and the gateway use."""
        return {f"shard{i}": f"{self.host}:{p}" for i, p in enumerate(self.retmem_ports)}

    @property
    def decoder_addresses(self) -> dict[str, str]:
        return {f"decoder{i}": f"{self.host}:{p}" for i, p in enumerate(self.decoder_ports)}

    @property
    def gateway_address(self) -> str:
        return f"{self.host}:{self.gateway_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def to_json(self) -> str:
        out = asdict(self)
        out["data_dir"] = str(self.data_dir)
        return json.dumps(out, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RayAppConfig:
        data = json.loads(text)
        data["data_dir"] = Path(data["data_dir"])
        data["api_keys"] = tuple(tuple(kv) for kv in data.get("api_keys", ()))
        return cls(**data)
