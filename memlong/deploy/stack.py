"""The one place the three services are built: ret-mem, decoder and gateway from one installation's
settings. `memlong up`, the demo and the Ray application all build them here.

    stack = EmbeddedStack.start(data_dir, memlong_config)   # all three in this process; loads the model
    client = memlong.Client(stack.gateway_address, stack.api_key)
    ...
    stack.stop()

A Ray replica builds one of them (`start_retmem`, `start_decoder`, `start_gateway`) with the same
settings. The API key for the local tenant comes from MEMLONG_API_KEYS, or from
`<data_dir>/api_keys.json` (created with a random key on first start, readable only by its owner).

TLS: the gateway's port follows the public policy (`tls`, else MEMLONG_TLS_*); ret-mem, the decoder
and the channels between the three follow the internal one (`internal_tls`, else
MEMLONG_INTERNAL_TLS_*). Unset, the embedded stack's internal policy is plaintext on loopback (every
internal call still carries the installation secret) and the public one elsewhere (memlong.rpc.tls).
"""

from __future__ import annotations

import importlib
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from memlong.model import MemLongConfig
from memlong.rpc.internal import installation_token
from memlong.rpc.tls import PLAINTEXT, TlsConfig, configured_internal_tls, process_tls
from memlong.services.decoder.config import DecoderConfig
from memlong.services.decoder.server import DecoderServer
from memlong.services.gateway.config import GatewayConfig
from memlong.services.gateway.server import GatewayServer
from memlong.services.retmem.server import RetMemConfig, RetMemServer

from .installation import default_data_dir, key_hashes, local_api_key

if TYPE_CHECKING:
    from memlong.services.httpapi.server import HttpServer
    from memlong.services.httpapi.template import ChatTemplate

__all__ = [
    "EmbeddedStack",
    "default_data_dir",
    "embedded_internal_tls",
    "local_api_key",
    "start_decoder",
    "start_gateway",
    "start_retmem",
]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def embedded_internal_tls(host: str, public: TlsConfig) -> TlsConfig:
    """The internal policy of an embedded stack on `host` when none is given: the one configured for
    the process, else plaintext on loopback (one process, the secret still required), else `public`."""
    configured = configured_internal_tls()
    if configured is not None:
        return configured
    return PLAINTEXT if is_loopback(host) else public


def components_from(spec: str) -> tuple:
    """(model, tokenizer, retriever) from "module:function" (tests and Ray give tiny models this way)."""
    module, _, fn = spec.partition(":")
    return getattr(importlib.import_module(module), fn)()


# -- one service each ------------------------------------------------------------------------------


def start_retmem(
    data_dir: Path,
    *,
    host: str,
    port: int,
    internal_token: str,
    shards: tuple[str, ...] = ("shard0",),
    all_shards: Mapping[str, str] | None = None,
    tls: TlsConfig | None = None,
) -> RetMemServer:
    """Ret-mem hosting `shards`, its data in `data_dir`; returns once recovered and serving."""
    server = RetMemServer(
        RetMemConfig(
            data_dir=data_dir,
            shards=shards,
            host=host,
            port=port,
            all_shards=dict(all_shards or {}),
            internal_token=internal_token,
            tls=tls,
        )
    )
    server.start()
    return server


def start_decoder(
    memlong: MemLongConfig,
    retmem: Mapping[str, str],
    *,
    host: str,
    port: int,
    internal_token: str,
    model: str | None = None,
    adapter: str | None = None,
    threads: int = 0,
    prefetch: bool = True,
    tls: TlsConfig | None = None,
    components: tuple | str | None = None,
) -> DecoderServer:
    """A decoder over the ret-mem ring `retmem`. `components`: (model, tokenizer, retriever) or
    "module:function" giving them, instead of loading `model` (the packaged SmolLM2 by default)."""
    config = DecoderConfig(
        retmem=dict(retmem),
        memlong=memlong,
        model=model,
        adapter=adapter,
        host=host,
        port=port,
        threads=threads,
        prefetch=prefetch,
        internal_token=internal_token,
        tls=tls,
    )
    if components is None:
        server = DecoderServer.load(config)
    else:
        source = components if isinstance(components, str) else "given"
        parts = components_from(components) if isinstance(components, str) else components
        config = replace(config, memlong=parts[0].config)  # the given model's own settings
        server = DecoderServer.from_components(*parts, config, source=source)
    server.start()
    return server


def start_gateway(
    data_dir: Path,
    decoders: Mapping[str, str],
    retmem: Mapping[str, str],
    *,
    host: str,
    port: int,
    internal_token: str,
    keys: Mapping[str, str],
    tls: TlsConfig | None = None,
    internal_tls: TlsConfig | None = None,
) -> GatewayServer:
    """The gateway over `decoders` and the ret-mem ring, its session table in `data_dir`; `keys` maps
    key hashes to tenants."""
    server = GatewayServer(
        GatewayConfig(
            decoders=dict(decoders),
            retmem=dict(retmem),
            key_hashes=dict(keys),
            data_dir=data_dir,
            host=host,
            port=port,
            internal_token=internal_token,
            tls=tls,
            internal_tls=internal_tls,
        )
    )
    server.start()
    return server


# -- all three in one process ----------------------------------------------------------------------


@dataclass
class EmbeddedStack:
    retmem: RetMemServer
    decoder: DecoderServer
    gateway: GatewayServer
    api_key: str
    data_dir: Path
    http: HttpServer | None = None  # the OpenAI-compatible HTTP API beside the gateway, when started

    @classmethod
    def start(
        cls,
        data_dir: Path,
        memlong: MemLongConfig | None = None,
        *,
        model: str | None = None,
        adapter: str | None = None,
        components: tuple | None = None,
        ports: tuple[int, int, int] = (0, 0, 0),
        host: str = "127.0.0.1",
        threads: int = 0,
        prefetch: bool = True,
        tls: TlsConfig | None = None,
        internal_tls: TlsConfig | None = None,
        http_port: int | None = None,
        chat_template: ChatTemplate | None = None,
    ) -> EmbeddedStack:
        """Start all three services. `components` = (model, tokenizer, retriever) skips loading (tests).

        `tls` is the gateway port's policy and `internal_tls` the internal one (None: see the module).
        `http_port` (0: a free one; None: none) adds the OpenAI-compatible HTTP API in front of the
        gateway, on the public policy; chat messages go through `chat_template`, by default the
        decoder's tokenizer's."""
        data_dir = Path(data_dir)
        public = tls if tls is not None else process_tls()
        if internal_tls is None:
            internal_tls = embedded_internal_tls(host, public)
        api_key = local_api_key(data_dir)  # before anything starts: a bad key file fails at once
        # Ret-mem and the decoder take calls only from this installation (their loopback ports are
        # open to every local process): a secret kept owner-only in the data directory.
        data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(data_dir, 0o700)  # session table, keys, logs and K/V: the owner's only
        token = installation_token(data_dir)
        internal = {"host": host, "internal_token": token}
        retmem = start_retmem(data_dir / "retmem", port=ports[0], tls=internal_tls, **internal)
        ring = {"shard0": retmem.address()}
        started: list = [retmem]
        try:
            decoder = start_decoder(
                memlong or MemLongConfig(),
                ring,
                port=ports[1],
                model=model,
                adapter=adapter,
                threads=threads,
                prefetch=prefetch,
                tls=internal_tls,
                components=components,
                **internal,
            )
            started.append(decoder)
            gateway = start_gateway(
                data_dir / "gateway",
                {"decoder0": decoder.address()},
                ring,
                port=ports[2],
                keys=key_hashes(data_dir, os.environ.get("MEMLONG_API_KEYS", "")),
                tls=public,
                internal_tls=internal_tls,
                **internal,
            )
            started.append(gateway)
            http = None
            if http_port is not None:
                from memlong.services.httpapi.config import HttpConfig, model_id_for
                from memlong.services.httpapi.server import HttpServer
                from memlong.services.httpapi.template import ChatTemplate

                if chat_template is None:
                    chat_template = ChatTemplate.from_tokenizer(decoder.engine.tokenizer)
                hcfg = HttpConfig(
                    gateway=gateway.address(),
                    host=host,
                    port=http_port,
                    model_id=model_id_for(model),
                    tls=public,
                    gateway_tls=public,
                )
                http = HttpServer(hcfg, chat_template)
                http.start()
        except BaseException:
            for server in reversed(started):
                server.stop(grace_s=0)
            raise
        return cls(retmem, decoder, gateway, api_key, data_dir, http)

    @property
    def gateway_address(self) -> str:
        return self.gateway.address()

    def describe(self) -> dict[str, str]:
        return {
            "gateway": self.gateway.address(),
            "decoder": self.decoder.address(),
            "retmem": self.retmem.address(),
            "data_dir": str(self.data_dir),
            **({"http": self.http.url()} if self.http is not None else {}),
        }

    def stop(self, grace_s: float = 2.0) -> None:
        """Front to back: the HTTP API and the gateway stop taking calls first, ret-mem last."""
        if self.http is not None:
            self.http.stop(grace_s)
        self.gateway.stop(grace_s)
        self.decoder.stop(grace_s)
        self.retmem.stop(grace_s)
