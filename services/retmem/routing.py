"""Consistent hashing of session ids over shard names (virtual nodes smooth the split).

Clients and servers build the same ring from the same shard list, so both agree on a session's
owner without asking anyone; adding or removing one shard moves only ~1/N of the sessions.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Mapping, Sequence

from memlong.errors import FailedPrecondition, InvalidArgument
from memlong.ids import check_session_id

DEFAULT_VNODES = 128


def _hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class Ring:
    """A hash ring over shard names with `vnodes` points per shard."""

    def __init__(self, shards: Sequence[str], vnodes: int = DEFAULT_VNODES) -> None:
        if not shards or len(set(shards)) != len(shards):
            raise InvalidArgument("shards", f"need distinct shard names, got {list(shards)}")
        points = sorted((_hash(f"{name}#{i}"), name) for name in shards for i in range(vnodes))
        self._keys = [h for h, _ in points]
        self._names = [n for _, n in points]
        self.shards = tuple(sorted(shards))

    def owner(self, session_id: str) -> str:
        """The shard that owns `session_id`."""
        i = bisect.bisect(self._keys, _hash(check_session_id(session_id))) % len(self._keys)
        return self._names[i]


def parse_addresses(text: str) -> dict[str, str]:
    """ "a=host:port,b=host:port" -> {"a": "host:port", "b": "host:port"}."""
    out: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, sep, addr = item.partition("=")
        if not sep or not name or not addr:
            raise InvalidArgument("all_shards", f"expected name=host:port, got {item!r}")
        out[name] = addr
    return out


class Placement:
    """Which of the ring's shards this process hosts; refuses sessions owned elsewhere."""

    def __init__(self, hosted: Sequence[str], addresses: Mapping[str, str] | None = None) -> None:
        addresses = dict(addresses or {})
        names = sorted(set(hosted) | set(addresses))
        self.ring = Ring(names)
        self.hosted = frozenset(hosted)
        self.addresses = addresses

    def local_owner(self, session_id: str) -> str:
        """Owner of `session_id` if hosted here, else FailedPrecondition naming the owner."""
        owner = self.ring.owner(session_id)
        if owner not in self.hosted:
            where = self.addresses.get(owner, "unknown address")
            raise FailedPrecondition(
                f"session {session_id!r} belongs to shard {owner!r} at {where}, not to this server"
            )
        return owner
