"""The embedded default: ret-mem, one decoder and the gateway in one process, on loopback ports.

    stack = EmbeddedStack.start(data_dir, memlong_config)   # loads the packaged model
    client = memlong.Client(stack.gateway_address, stack.api_key)
    ...
    stack.stop()

The API key for the local tenant comes from MEMLONG_API_KEYS, or from `<data_dir>/api_keys.json`
(created with a random key on first start, readable only by its owner).

TLS: the gateway's port follows the public policy (`tls`, else MEMLONG_TLS_*); ret-mem, the decoder
and the channels between the three follow the internal one (`internal_tls`, else
MEMLONG_INTERNAL_TLS_*). Unset, the internal policy is plaintext on loopback (every internal call still
carries the installation secret) and the public one elsewhere (memlong.rpc.tls).
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from memlong.errors import InvalidArgument
from memlong.model import MemLongConfig
from memlong.rpc.internal import installation_token
from memlong.rpc.tls import PLAINTEXT, TlsConfig, configured_internal_tls, process_tls
from services.decoder.config import DecoderConfig
from services.decoder.server import DecoderServer
from services.retmem.server import RetMemConfig, RetMemServer

from .config import GatewayConfig, load_key_file, parse_keys
from .server import GatewayServer

if TYPE_CHECKING:
    from services.httpapi.server import HttpServer
    from services.httpapi.template import ChatTemplate

LOCAL_TENANT = "local"


def default_data_dir() -> Path:
    return Path(os.environ.get("MEMLONG_DATA", Path.home() / ".local" / "share" / "memlong"))


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


def local_api_key(data_dir: Path) -> str:
    """The local tenant's key, created on first use; InvalidArgument naming the file when it has none."""
    path = data_dir / "api_keys.json"
    if path.is_file():
        load_key_file(path)  # the file's shape, checked (InvalidArgument otherwise)
        keys = json.loads(path.read_text())["keys"]
        local = [k for k, t in keys.items() if t == LOCAL_TENANT]
        if not local:
            raise InvalidArgument(
                str(path),
                f"no key for the {LOCAL_TENANT!r} tenant, which `memlong up` and the client verbs use: "
                f'add one, as in {{"keys": {{"<key>": "{LOCAL_TENANT}"}}}}, or move the file away to '
                "have a new key made",
            )
        return str(local[0])
    data_dir.mkdir(parents=True, exist_ok=True)
    key = "ml-" + secrets.token_urlsafe(24)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"keys": {key: LOCAL_TENANT}}, f)
    os.replace(tmp, path)
    return key


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
        retmem = RetMemServer(
            RetMemConfig(
                data_dir=data_dir / "retmem",
                host=host,
                port=ports[0],
                internal_token=token,
                tls=internal_tls,
            )
        )
        retmem.start()
        rm = {"shard0": retmem.address()}
        dcfg = DecoderConfig(
            retmem=rm,
            memlong=memlong or MemLongConfig(),
            model=model,
            adapter=adapter,
            host=host,
            port=ports[1],
            threads=threads,
            prefetch=prefetch,
            internal_token=token,
            tls=internal_tls,
        )
        try:
            if components is not None:
                decoder = DecoderServer.from_components(*components, dcfg, source="given")
            else:
                decoder = DecoderServer.load(dcfg)
            decoder.start()
            keys = parse_keys(os.environ.get("MEMLONG_API_KEYS", ""))
            keys.update(load_key_file(data_dir / "api_keys.json"))
            gcfg = GatewayConfig(
                decoders={"decoder0": decoder.address()},
                retmem=rm,
                key_hashes=keys,
                data_dir=data_dir / "gateway",
                host=host,
                port=ports[2],
                internal_token=token,
                tls=public,
                internal_tls=internal_tls,
            )
            gateway = GatewayServer(gcfg)
            gateway.start()
            http = None
            if http_port is not None:
                from services.httpapi.config import HttpConfig, model_id_for
                from services.httpapi.server import HttpServer
                from services.httpapi.template import ChatTemplate

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
            retmem.stop(grace_s=0)
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
