"""Sessions and tenants: who owns what, where it lives, how much text it holds. No gRPC here.

A session belongs to one tenant. A lookup by another tenant raises the same NotFound as a session
that never existed, so a tenant cannot learn of others' sessions. The table is small and is written
as one JSON file (temp -> fsync -> rename -> fsync(dir)) after every change.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from memlong.atomic import write_atomic
from memlong.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, shown
from memlong.ids import check_session_id

from .config import Quotas

FORMAT = 1


@dataclass(frozen=True)
class SessionRecord:
    session_id: str  # also the ret-mem session id (globally unique, never reused)
    tenant: str
    name: str
    decoder: str  # replica the session sticks to
    created_at: float
    text_bytes: int = 0  # committed text: the next Append's offset
    tokens: int = 0
    next_chunk_id: int = 0  # first chunk id no call has used yet
    # Set while an append runs or after it failed: chunk ids from here to next_chunk_id may hold chunks
    # of uncommitted text, to be rolled back before the session is read or appended to again.
    dirty_from: int | None = None
    # "text" | "keys": what the session's chunks are found by, fixed at creation; "" in a table written
    # before records kept it (GetSession reads it from ret-mem).
    retrieval: str = ""


def not_found(session_id: str) -> NotFound:
    return NotFound(f"session {shown(session_id)} not found")


class SessionTable:
    """Tenant-scoped sessions with quotas and per-session write locks."""

    def __init__(self, path: Path | None, quotas: Quotas) -> None:
        self.path = path
        self.quotas = quotas
        self._lock = threading.Lock()
        self._sessions: dict[str, SessionRecord] = {}
        self._writing: set[str] = set()
        self._inflight: dict[str, int] = {}
        if path is not None and path.is_file():
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT:
                raise InvalidArgument("sessions", f"unknown session table format in {path}")
            self._sessions = {r["session_id"]: SessionRecord(**r) for r in data["sessions"]}

    # -- persistence --------------------------------------------------------------------------------

    def _save(self) -> None:
        if self.path is None:
            return
        payload = {"format": FORMAT, "sessions": [asdict(r) for r in self._sessions.values()]}
        write_atomic(self.path, json.dumps(payload), mode=0o600)  # tenants' session ids: private

    # -- queries ------------------------------------------------------------------------------------

    def get(self, tenant: str, session_id: str) -> SessionRecord:
        check_session_id(session_id)
        with self._lock:
            rec = self._sessions.get(session_id)
        if rec is None or rec.tenant != tenant:
            raise not_found(session_id)
        return rec

    def list(self, tenant: str) -> list[SessionRecord]:
        with self._lock:
            return sorted(
                (r for r in self._sessions.values() if r.tenant == tenant), key=lambda r: r.created_at
            )

    def tenant_bytes(self, tenant: str) -> int:
        with self._lock:
            return sum(r.text_bytes for r in self._sessions.values() if r.tenant == tenant)

    # -- changes ------------------------------------------------------------------------------------

    def new_record(self, tenant: str, name: str, decoder_for) -> SessionRecord:
        """A fresh record (not yet added: the caller creates the memory first)."""
        if len(name) > 128:
            raise InvalidArgument("name", "at most 128 characters")
        if len(self.list(tenant)) >= self.quotas.max_sessions:
            raise ResourceExhausted(f"tenant quota: at most {self.quotas.max_sessions} sessions")
        session_id = "s" + secrets.token_hex(12)
        return SessionRecord(session_id, tenant, name, decoder_for(session_id), time.time())

    def add(self, rec: SessionRecord) -> None:
        with self._lock:
            self._sessions[rec.session_id] = rec
            self._save()

    def update(self, session_id: str, **changes) -> SessionRecord:
        with self._lock:
            rec = replace(self._sessions[session_id], **changes)
            self._sessions[session_id] = rec
            self._save()
            return rec

    def remove(self, tenant: str, session_id: str) -> SessionRecord:
        with self._lock:
            rec = self._sessions.get(session_id)
            if rec is None or rec.tenant != tenant:
                raise not_found(session_id)
            if session_id in self._writing:
                raise FailedPrecondition(f"session {shown(session_id)} has an append in progress")
            del self._sessions[session_id]
            self._save()
            return rec

    def is_writing(self, session_id: str) -> bool:
        with self._lock:
            return session_id in self._writing

    @contextlib.contextmanager
    def writing(self, session_id: str) -> Iterator[None]:
        """One writer per session: a second concurrent append is refused, not queued."""
        with self._lock:
            if session_id in self._writing:
                raise FailedPrecondition(f"session {shown(session_id)} has an append in progress")
            self._writing.add(session_id)
        try:
            yield
        finally:
            with self._lock:
                self._writing.discard(session_id)

    @contextlib.contextmanager
    def admitted(self, tenant: str, global_limit: int) -> Iterator[None]:
        """Per-tenant and global in-flight limits: refuse at once (backpressure), never park."""
        with self._lock:
            mine, total = self._inflight.get(tenant, 0), sum(self._inflight.values())
            if mine >= self.quotas.max_inflight:
                raise ResourceExhausted(
                    f"tenant quota: {self.quotas.max_inflight} calls in flight; retry later"
                )
            if total >= global_limit:
                # No count: how many calls are in flight would tell a tenant that others are active.
                raise ResourceExhausted("gateway busy; retry later")
            self._inflight[tenant] = mine + 1
        try:
            yield
        finally:
            with self._lock:
                self._inflight[tenant] -= 1
