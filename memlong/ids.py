"""The session-id rule, one for every service and client (retmem.proto states it in words)."""

from __future__ import annotations

import re
from typing import Any

from memlong.errors import InvalidArgument

# 1-128 chars of [A-Za-z0-9._:-], starting with a letter or digit (so never "..", "-rf" or a hidden name).
SESSION_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


def check_session_id(session_id: Any, field: str = "session_id") -> str:
    """`session_id` if it follows SESSION_ID_RE, else InvalidArgument(field)."""
    if not isinstance(session_id, str) or not SESSION_ID_RE.fullmatch(session_id):
        shown = repr(session_id)[:40]
        raise InvalidArgument(field, f"must match {SESSION_ID_RE.pattern}, got {shown}")
    return session_id
