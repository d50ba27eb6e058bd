"""MemLong: memory-augmented retrieval for long text modeling, as a memory service.

`memlong.Client` is the Python client of the gateway (imported lazily: the core does not need grpc).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from memlong.client import Client

__all__ = ["Client"]


def __getattr__(name: str):
    if name == "Client":
        from memlong.client import Client

        return Client
    raise AttributeError(f"module 'memlong' has no attribute {name!r}")
