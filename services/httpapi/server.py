"""The HTTP front as a server: uvicorn on its own thread and event loop, beside a gateway.

    front = HttpServer(HttpConfig(gateway="127.0.0.1:50051", port=0), ChatTemplate.load())
    port = front.start()          # listening when it returns
    ...
    front.stop()                  # in-flight requests get grace_s

The port follows the public TLS policy (as the gateway's gRPC port does): cert and key from
`config.tls`, else MEMLONG_TLS_*; with client_auth, clients need a certificate from the CA.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading

import uvicorn

from memlong.rpc.tls import TlsConfig, process_tls

from .app import create_app
from .config import HttpConfig
from .template import ChatTemplate
from .upstream import Upstream

log = logging.getLogger(__name__)


def _tls_options(tls: TlsConfig) -> dict:
    if tls.cert is None:
        return {}
    options = {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key)}
    if tls.client_auth:
        options.update(ssl_ca_certs=str(tls.ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
    return options


class _Server(uvicorn.Server):
    """uvicorn's server that says when it listens, and never touches signal handlers (not the main thread)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()


class HttpServer:
    """One HTTP front: an app over the gateway's stubs, served on `config.host:config.port`."""

    def __init__(
        self, config: HttpConfig, template: ChatTemplate | None, upstream: Upstream | None = None
    ) -> None:
        self.config = config
        self.app = create_app(config, template, upstream)
        self.tls = config.tls if config.tls is not None else process_tls()
        self.port = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls.cert is not None else "http"

    def start(self) -> int:
        """Bind, start serving on a thread, return the port once it listens."""
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.config.host, self.config.port))
        self.port = sock.getsockname()[1]
        uv_config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=self.config.grace_s,  # type: ignore[arg-type] - a float works
            **_tls_options(self.tls),
        )
        server = _Server(uv_config)
        failed: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(server.serve(sockets=[sock]))
            except BaseException as exc:  # noqa: BLE001 - reported to start()
                failed.append(exc)
                server.ready.set()

        self._server = server
        self._thread = threading.Thread(target=run, name=f"http-{self.port}", daemon=True)
        self._thread.start()
        server.ready.wait()
        if failed or not server.started:
            sock.close()
            raise RuntimeError(f"the HTTP API did not start on port {self.port}") from (failed or [None])[0]
        return self.port

    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def url(self) -> str:
        host = self.config.host if self.config.host not in ("0.0.0.0", "::") else "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        return f"{self.scheme}://{host}:{self.port}"

    def stop(self, grace_s: float | None = None) -> None:
        """Stop listening; requests in flight get `grace_s` (default config.grace_s) to finish."""
        if self._server is None or self._thread is None:
            return
        if grace_s is not None:
            self._server.config.timeout_graceful_shutdown = max(0.0, grace_s)  # type: ignore[assignment]
        self._server.should_exit = True
        self._thread.join(timeout=(grace_s if grace_s is not None else self.config.grace_s) + 5)
        self._server = self._thread = None
