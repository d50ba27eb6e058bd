"""The one channel factory, and deadlines derived from the caller's remaining time.

Channels are cached per (target, options) and shared: a channel multiplexes many calls and is
expensive to build. Retries live in the service config and cover only the methods a caller declares
idempotent; they fire on UNAVAILABLE only (the request never reached a handler or the server was
going away).

Channels use TLS when `options.tls` (else the process default of the channel's policy: internal,
`tls.internal_tls()`, for channels to the decoder and ret-mem; public, `tls.process_tls()`, for
clients of the gateway) says so: they verify the server against its CA and, for mTLS, present this
process's certificate. Every channel is wrapped with `tracing.ClientTelemetry`, which carries the
trace context to the server in metadata.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc

from memlong.errors import DeadlineExceeded

from . import internal, tracing
from .tls import TlsConfig, internal_tls, process_tls

T = TypeVar("T")
MiB = 1 << 20
# The message size limit both ends of every channel and server use unless configured otherwise.
DEFAULT_MAX_MESSAGE_BYTES = 64 * MiB


@dataclass(frozen=True)
class ChannelOptions:
    """What makes two channels different; hashable so channels can be cached by it."""

    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # (full service name, method name) pairs safe to retry.
    idempotent_methods: tuple[tuple[str, str], ...] = ()
    max_attempts: int = 4
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 1.0
    tls: TlsConfig | None = None  # None: the process default of the policy below; tls.PLAINTEXT: off
    internal: bool = False  # to an internal service (decoder, ret-mem): the internal TLS policy
    telemetry: bool = True  # client spans + trace context in metadata
    internal_token: str | None = None  # sent to internal services (memlong.rpc.internal)
    # Reconnect backoff after a failed connect. gRPC's default grows to 120 s, so a caller would
    # keep failing fast long after a restarted shard is back; cap it so it reconnects within ~1 s.
    initial_reconnect_backoff_ms: int = 100
    max_reconnect_backoff_ms: int = 1000

    def service_config(self) -> str:
        config: dict = {"methodConfig": []}
        if self.idempotent_methods:
            config["methodConfig"].append(
                {
                    "name": [{"service": s, "method": m} for s, m in self.idempotent_methods],
                    "retryPolicy": {
                        "maxAttempts": self.max_attempts,
                        "initialBackoff": f"{self.initial_backoff_s}s",
                        "maxBackoff": f"{self.max_backoff_s}s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            )
        return json.dumps(config)

    def grpc_options(self) -> list[tuple[str, object]]:
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.enable_retries", 1),
            # Requests larger than the retry buffer are never retried; K/V batches are MBs.
            ("grpc.per_rpc_retry_buffer_size", self.max_message_bytes),
            ("grpc.retry_buffer_size", 4 * self.max_message_bytes),
            ("grpc.service_config", self.service_config()),
            ("grpc.initial_reconnect_backoff_ms", self.initial_reconnect_backoff_ms),
            ("grpc.min_reconnect_backoff_ms", self.initial_reconnect_backoff_ms),
            ("grpc.max_reconnect_backoff_ms", self.max_reconnect_backoff_ms),
            # Subchannels (connections and their reconnect backoff) belong to this channel, not to a
            # process-wide pool: a new channel (`forget_channels`) starts with a fresh connection.
            ("grpc.use_local_subchannel_pool", 1),
        ]


_channels: dict[tuple[str, ChannelOptions], grpc.Channel] = {}
_lock = threading.Lock()


def get_channel(target: str, options: ChannelOptions | None = None) -> grpc.Channel:
    """A shared channel to `target` ("host:port"), created on first use (TLS as configured)."""
    options = options or ChannelOptions()
    if options.tls is None:  # resolve now, so a changed process default never reuses a stale channel
        options = dataclasses.replace(options, tls=internal_tls() if options.internal else process_tls())
    key = (target, options)
    with _lock:
        channel = _channels.get(key)
        if channel is None:
            channel = _new_channel(target, options)
            _channels[key] = channel
        return channel


def _new_channel(target: str, options: ChannelOptions) -> grpc.Channel:
    tls = options.tls or process_tls()
    grpc_options = options.grpc_options()
    if tls.enabled:
        if tls.server_name:
            grpc_options.append(("grpc.ssl_target_name_override", tls.server_name))
        channel = grpc.secure_channel(target, tls.channel_credentials(), options=grpc_options)
    else:
        channel = grpc.insecure_channel(target, options=grpc_options)
    if options.internal_token:
        channel = grpc.intercept_channel(channel, internal.SendToken(options.internal_token))
    if options.telemetry:
        tracing.ensure_telemetry()
        channel = grpc.intercept_channel(channel, tracing.ClientTelemetry())
    return channel


def forget_channels(targets: Sequence[str]) -> None:
    """Drop the cached channels to `targets` from the cache without closing them: a server has just
    started listening there in this process, so they were connected to an earlier one, and a channel
    still in its reconnect backoff fails calls fast ("connection refused") for up to
    `max_reconnect_backoff_ms` after the new server is up. The next `get_channel` builds a fresh one;
    callers that hold an old one keep it until they let go (it reconnects after its backoff)."""
    with _lock:
        for key in [k for k in _channels if k[0] in targets]:
            del _channels[key]


_NO_CONNECTION = "failed to connect to all addresses"


def never_sent(err: grpc.RpcError) -> bool:
    """The call failed because no connection to the server could be made: it never left this process."""
    return err.code() == grpc.StatusCode.UNAVAILABLE and _NO_CONNECTION in (err.details() or "").lower()


def reconnecting(target: str, attempt: Callable[[], T]) -> T:
    """`attempt()`, made once more on a fresh channel to `target` when no connection could be made.

    A cached channel whose connect failed (its server was down) fails every call at once until its
    reconnect backoff runs out, up to `max_reconnect_backoff_ms`, even when the server is back by then
    (a restarted replica in another process: `forget_channels` is not called here). The failed call never
    reached a server, so making it again is safe for any method; when the server is still down, the
    second attempt fails as fast as the first. `attempt` must get its channel from `get_channel`.
    """
    try:
        return attempt()
    except grpc.RpcError as err:
        if not never_sent(err):
            raise
    forget_channels([target])
    return attempt()


def close_channels(targets: Sequence[str] | None = None) -> None:
    """Close cached channels (all, or those to the given targets)."""
    with _lock:
        for key in list(_channels):
            if targets is None or key[0] in targets:
                _channels.pop(key).close()


class Deadline:
    """An absolute deadline on the monotonic clock; hands out timeouts for downstream calls."""

    def __init__(self, expires_at: float) -> None:
        self.expires_at = expires_at

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    @classmethod
    def from_context(cls, context: grpc.ServicerContext, default_s: float) -> Deadline:
        """The deadline of the call being served (or `default_s` from now when it has none)."""
        remaining = context.time_remaining()
        return cls.after(default_s if remaining is None else remaining)

    def remaining(self) -> float:
        return self.expires_at - time.monotonic()

    def downstream(self) -> Deadline:
        """The deadline to hand a downstream call: ours, less a margin that survives gRPC's rounding.

        gRPC sends timeouts with about three significant digits, rounded up (20.04 s arrives as ~20.1 s),
        so a downstream call given exactly our remaining time may see more than we have. 1 % + 50 ms is
        enough for the downstream deadline to be strictly earlier than ours, always
        (tests/services/test_deadlines.py).
        """
        left = self.remaining()
        return Deadline.after(left - 0.05 - 0.01 * max(left, 0.0))

    def timeout(self, cap_s: float | None = None, margin_s: float = 0.0) -> float:
        """Timeout for a downstream call: never past this deadline (minus `margin_s`), at most `cap_s`.

        Raises DeadlineExceeded when no time is left, so that no call is ever made without a deadline
        (not Unavailable: nothing is down, and a retry with the same budget cannot do better).
        """
        left = self.remaining() - margin_s
        if left <= 0:
            raise DeadlineExceeded("deadline exceeded: no time left for a downstream call")
        return left if cap_s is None else min(left, cap_s)


class CancelledBeforeStart(grpc.RpcError):
    """A call not made because its CallScope was cancelled: reads as a cancelled gRPC call."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.CANCELLED

    def details(self) -> str:
        return "cancelled before it started"


class CallScope:
    """The gRPC calls made for one piece of work, cancelled together (e.g. a search started ahead
    whose answer is no longer wanted). A call added after `cancel` is cancelled at once. Thread-safe:
    calls are added on the thread doing the work and cancelled from the thread that gave it up."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: list[grpc.Future] = []
        self.cancelled = False

    def add(self, call: grpc.Future) -> grpc.Future:
        """Track `call` (a unary call's future or a streaming call: anything with `cancel()`)."""
        with self._lock:
            if not self.cancelled:
                self._calls.append(call)
                return call
        call.cancel()
        return call

    def start(self, make: Callable[[], grpc.Future]) -> grpc.Future:
        """Make a call (`make` starts it without waiting for it) and track it; once the scope is
        cancelled, none is made: CancelledBeforeStart (code CANCELLED). Unlike `add` of a call that was
        started already, this never lets a call that finishes fast slip through after `cancel`."""
        with self._lock:
            if self.cancelled:
                raise CancelledBeforeStart()
            call = make()
            self._calls.append(call)
            return call

    def cancel(self) -> None:
        """Cancel every call added (finished ones are unaffected) and every one added from now on."""
        with self._lock:
            self.cancelled = True
            calls, self._calls = self._calls, []
        for call in calls:
            call.cancel()
