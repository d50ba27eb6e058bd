"""Domain exceptions of the pure core.

The core raises these; each service edge maps them to a gRPC status in one table
(`memlong/rpc/status.py`). A client mistake is never INTERNAL or UNKNOWN.
"""

from __future__ import annotations

from collections.abc import Iterable


class MemLongError(Exception):
    """Base class of every error the core raises on purpose."""


class InvalidArgument(MemLongError):
    """The caller sent something malformed. `field` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFound(MemLongError):
    """The named object does not exist (or is not visible to the caller)."""


class AlreadyExists(MemLongError):
    """A create or a write conflicts with something already stored."""


class ResourceExhausted(MemLongError):
    """A size limit, quota or capacity would be exceeded."""


class TooLarge(ResourceExhausted):
    """One request, text or stream is over a size limit (HTTP 413). Other ResourceExhausted are quotas
    and load (HTTP 429); both are RESOURCE_EXHAUSTED over gRPC, and the gateway names this one in the
    trailing metadata `memlong-reason`."""

    reason = "too_large"


class FailedPrecondition(MemLongError):
    """The object is in a state that does not allow the operation."""


class Unavailable(MemLongError):
    """A dependency (ret-mem shard, decoder) cannot be reached right now."""


class DeadlineExceeded(MemLongError):
    """The caller's time ran out, or what is left cannot cover the next downstream call.

    Not `Unavailable`: nothing is down, and retrying with the same budget fails the same way.
    """


class DataLoss(MemLongError):
    """Stored data could not be recovered intact; the damaged files are kept for an operator."""


class ModelUnavailable(MemLongError):
    """Model weights or the retriever are missing; the message says what to install."""


SHOWN_CHARS = 64  # at most this much of a client's value is quoted back in an error message


def shown(value: str) -> str:
    """`value` quoted for an error message, cut to SHOWN_CHARS characters + "…": a message that echoed a
    64 KiB id whole would be too large a status for the client to receive."""
    if len(value) <= SHOWN_CHARS:
        return repr(value)
    return repr(value[:SHOWN_CHARS]) + "…"


def check_positive(settings: object, names: Iterable[str], prefix: str = "") -> None:
    """InvalidArgument naming (after `prefix`) the first field of `settings` in `names` that is not > 0."""
    for name in names:
        value = getattr(settings, name)
        if not value > 0:
            raise InvalidArgument(prefix + name, f"must be positive, got {value}")


def check_port(port: int, field: str = "port") -> None:
    """InvalidArgument unless `port` is a TCP port number (0: any free port)."""
    if not 0 <= port < 65536:
        raise InvalidArgument(field, f"out of range: {port}")
