"""TLS and mutual TLS for every service and every channel, from one settings object.

    tls = TlsConfig(cert=Path("tls.crt"), key=Path("tls.key"), ca=Path("ca.crt"), client_auth=True)
    create_server(addr, services, ServerOptions(tls=tls))        # serves TLS, requires client certs
    get_channel(target, ChannelOptions(tls=tls))                 # verifies the server, presents cert

A process has one default (`process_tls()`), read once from the environment the first time a server
or channel needs it, so every service picks up TLS with no code of its own:

    MEMLONG_TLS_CERT, MEMLONG_TLS_KEY   PEM chain and key of this process (server identity, and the
                                        client identity it presents under mTLS)
    MEMLONG_TLS_CA                      PEM roots: clients verify servers with them; servers with
                                        MEMLONG_TLS_CLIENT_AUTH=require verify client certificates
    MEMLONG_TLS_SERVER_NAME             name clients expect in server certificates (default: host)

No variable set means plaintext (the embedded default on loopback). `PLAINTEXT` turns TLS off for one
server or channel whatever the process default is (the kubelet's health-only port, tests).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from memlong.errors import InvalidArgument

ENV_PREFIX = "MEMLONG_TLS_"


@dataclass(frozen=True)
class TlsConfig:
    """Where the PEM files are and whether servers require client certificates.

    Paths, not bytes, so the object is hashable (channels are cached by it) and rotated files are
    picked up by servers and channels created after the rotation.
    """

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    client_auth: bool = False
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise InvalidArgument("tls.cert", "cert and key are set together or not at all")
        if self.client_auth and (self.ca is None or self.cert is None):
            raise InvalidArgument("tls.client_auth", "mTLS needs ca (to verify clients) and cert/key")
        for name in ("cert", "key", "ca"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise InvalidArgument(f"tls.{name}", f"no such file: {path}")

    @property
    def enabled(self) -> bool:
        """True when servers listen with TLS / channels connect with TLS."""
        return self.cert is not None or self.ca is not None

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials for a listening port; requires a client certificate signed by `ca` under mTLS."""
        if self.cert is None or self.key is None:
            raise InvalidArgument("tls.cert", "a TLS server needs cert and key")
        return grpc.ssl_server_credentials(
            [(_read(self.key), _read(self.cert))],
            root_certificates=_read(self.ca) if self.client_auth and self.ca else None,
            require_client_auth=self.client_auth,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials for a channel: trust `ca` (system roots when unset), present cert/key if set."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca) if self.ca else None,
            private_key=_read(self.key) if self.key else None,
            certificate_chain=_read(self.cert) if self.cert else None,
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> TlsConfig:
        """Build from MEMLONG_TLS_* variables (unknown MEMLONG_TLS_* names are errors)."""
        known = {"CERT", "KEY", "CA", "CLIENT_AUTH", "SERVER_NAME"}
        unknown = {k for k in env if k.startswith(ENV_PREFIX) and k[len(ENV_PREFIX) :] not in known}
        if unknown:
            raise InvalidArgument("tls", f"unknown settings {sorted(unknown)}; known: {sorted(known)}")

        def path(name: str) -> Path | None:
            value = env.get(ENV_PREFIX + name, "")
            return Path(value) if value else None

        auth = env.get(ENV_PREFIX + "CLIENT_AUTH", "none").lower()
        if auth not in ("none", "require"):
            raise InvalidArgument("tls.client_auth", f"must be none or require, got {auth!r}")
        return cls(
            cert=path("CERT"),
            key=path("KEY"),
            ca=path("CA"),
            client_auth=auth == "require",
            server_name=env.get(ENV_PREFIX + "SERVER_NAME") or None,
        )


PLAINTEXT = TlsConfig()

_lock = threading.Lock()
_process: TlsConfig | None = None


def process_tls() -> TlsConfig:
    """The process default, read from the environment on first use (PLAINTEXT when nothing is set)."""
    global _process
    with _lock:
        if _process is None:
            _process = TlsConfig.from_env(os.environ)
        return _process


def configure(tls: TlsConfig | None) -> TlsConfig | None:
    """Set the process default (None: re-read the environment on next use); returns the previous one.

    For entry points that take TLS settings from flags, and for tests.
    """
    global _process
    with _lock:
        previous, _process = _process, tls
        return previous


def _read(path: Path) -> bytes:
    return Path(path).read_bytes()
