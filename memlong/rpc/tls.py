"""TLS and mutual TLS for every service and every channel, under two policies: public and internal.

    tls = TlsConfig(cert=Path("tls.crt"), key=Path("tls.key"), ca=Path("ca.crt"), client_auth=True)
    create_server(addr, services, ServerOptions(tls=tls))        # serves TLS, requires client certs
    get_channel(target, ChannelOptions(tls=tls))                 # verifies the server, presents cert

The **public** policy covers the gateway's listening port and the clients that call it. The
**internal** policy covers the decoder's and ret-mem's ports and the channels gateway -> decoder,
gateway -> ret-mem and decoder -> ret-mem. They are separate so that internal hops can require
client certificates (mTLS) while the public port takes any TLS client with an API key.

A process has one default per policy, read once from the environment the first time a server or
channel needs it, so every service picks up TLS with no code of its own (`ServerOptions.internal`
and `ChannelOptions.internal` say which policy applies):

    MEMLONG_TLS_CERT, MEMLONG_TLS_KEY   public: PEM chain and key of this process (server identity,
                                        and the client identity it presents under mTLS)
    MEMLONG_TLS_CA                      PEM roots: clients verify servers with them; servers with
                                        MEMLONG_TLS_CLIENT_AUTH=require verify client certificates
    MEMLONG_TLS_SERVER_NAME             name clients expect in server certificates (default: host)
    MEMLONG_INTERNAL_TLS_{CERT,KEY,CA,CLIENT_AUTH,SERVER_NAME}
                                        internal: the same settings for internal hops
    MEMLONG_INTERNAL_TLS=off            internal hops in plaintext whatever the public policy is
                                        (they still carry the installation secret, see internal.py)

No MEMLONG_TLS_* means a plaintext public port. With no MEMLONG_INTERNAL_TLS* set, the internal
policy is the public one: a deployment that turns TLS on keeps every hop encrypted (each process of a
Kubernetes or multi-host deployment reads the same variables), and setting MEMLONG_INTERNAL_TLS_* is
how it adds client certificates inside without asking clients for them at the edge. The exception is
the embedded default (`memlong up`), whose internal ports are on loopback inside one process: there
an unset internal policy means plaintext plus the installation secret (a public certificate rarely
names 127.0.0.1), and MEMLONG_INTERNAL_TLS_* turns internal (m)TLS on. `PLAINTEXT` turns TLS off for
one server or channel whatever the process default is (the kubelet's health-only port, tests).
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
INTERNAL_ENV_PREFIX = "MEMLONG_INTERNAL_TLS_"
INTERNAL_SWITCH = "MEMLONG_INTERNAL_TLS"  # "off": internal hops in plaintext


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
    def from_env(cls, env: Mapping[str, str], prefix: str = ENV_PREFIX) -> TlsConfig:
        """Build from `prefix`* variables (MEMLONG_TLS_*; unknown names under the prefix are errors)."""
        known = {"CERT", "KEY", "CA", "CLIENT_AUTH", "SERVER_NAME"}
        unknown = {k for k in env if k.startswith(prefix) and k[len(prefix) :] not in known}
        if unknown:
            raise InvalidArgument("tls", f"unknown settings {sorted(unknown)}; known: {sorted(known)}")

        def path(name: str) -> Path | None:
            value = env.get(prefix + name, "")
            return Path(value) if value else None

        auth = env.get(prefix + "CLIENT_AUTH", "none").lower()
        if auth not in ("none", "require"):
            raise InvalidArgument("tls.client_auth", f"must be none or require, got {auth!r}")
        return cls(
            cert=path("CERT"),
            key=path("KEY"),
            ca=path("CA"),
            client_auth=auth == "require",
            server_name=env.get(prefix + "SERVER_NAME") or None,
        )

    @classmethod
    def internal_from_env(cls, env: Mapping[str, str]) -> TlsConfig | None:
        """The internal policy set in the environment; None when nothing is set (inherit).

        MEMLONG_INTERNAL_TLS=off gives PLAINTEXT; any MEMLONG_INTERNAL_TLS_* builds the policy from
        those variables alone (nothing is mixed in from the public ones)."""
        switch = env.get(INTERNAL_SWITCH, "").lower()
        own = any(k.startswith(INTERNAL_ENV_PREFIX) for k in env)
        if switch not in ("", "off"):
            raise InvalidArgument("tls.internal", f"{INTERNAL_SWITCH} must be off or unset, got {switch!r}")
        if switch == "off":
            if own:
                raise InvalidArgument(
                    "tls.internal", f"{INTERNAL_SWITCH}=off with {INTERNAL_ENV_PREFIX}* set"
                )
            return PLAINTEXT
        return cls.from_env(env, INTERNAL_ENV_PREFIX) if own else None


PLAINTEXT = TlsConfig()

_lock = threading.Lock()
_process: TlsConfig | None = None
_internal: TlsConfig | None = None
_internal_read = False  # whether _internal reflects the environment or a configure_internal call


def process_tls() -> TlsConfig:
    """The public policy's process default, read from the environment on first use (PLAINTEXT when
    nothing is set)."""
    global _process
    with _lock:
        if _process is None:
            _process = TlsConfig.from_env(os.environ)
        return _process


def configured_internal_tls() -> TlsConfig | None:
    """The internal policy set for this process (environment or `configure_internal`); None: unset."""
    global _internal, _internal_read
    with _lock:
        if not _internal_read:
            _internal, _internal_read = TlsConfig.internal_from_env(os.environ), True
        return _internal


def internal_tls() -> TlsConfig:
    """The internal policy's process default: the one set for internal hops, else the public one."""
    own = configured_internal_tls()
    return own if own is not None else process_tls()


def configure(tls: TlsConfig | None) -> TlsConfig | None:
    """Set the public process default (None: re-read the environment on next use); returns the
    previous one. For entry points that take TLS settings from flags, and for tests.
    """
    global _process
    with _lock:
        previous, _process = _process, tls
        return previous


def configure_internal(tls: TlsConfig | None) -> TlsConfig | None:
    """Set the internal process default (None: re-read the environment on next use, where an unset
    internal policy inherits the public one); returns the previous one."""
    global _internal, _internal_read
    with _lock:
        previous = _internal if _internal_read else None
        _internal, _internal_read = tls, tls is not None
        return previous


def _read(path: Path) -> bytes:
    return Path(path).read_bytes()
