"""A failed append is rolled back: the chunks it stored leave ret-mem, so the client's retry of the same
text is stored once (appends are idempotent), also when the gateway restarts before it can roll back."""

from __future__ import annotations

import json

import numpy as np
import pytest

from memlong.errors import Unavailable
from memlong.services.gateway.server import GatewayServer
from tests.factories import RecordingRetriever
from tests.services.stack import start_stack

FIRST = "alpha beta gamma delta " * 3  # 69 bytes: 18 chunks of 4 byte-tokens
SECOND = "eps zeta eta theta " * 5  # 95 bytes: 24 chunks; with a failed copy left over, 18 + 24 + 24 < 64


class FailingRetriever(RecordingRetriever):
    """Embeds normally; once armed with fail_after=n, the (n+1)-th embed from then on raises (once)."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_after: int | None = None
        self.on_fail = lambda: None

    def embed(self, texts):
        if self.fail_after is not None:
            if self.fail_after == 0:
                self.fail_after = None
                self.on_fail()
                raise RuntimeError("injected embedding failure")
            self.fail_after -= 1
        return super().embed(texts)


def _chunks(stack, sid: str) -> int:
    return stack.gateway.retmem.info(sid).num_chunks


@pytest.fixture
def failing(tmp_path):
    retriever = FailingRetriever()
    stack = start_stack(tmp_path, retriever=retriever)
    yield stack, retriever
    stack.stop()


def _reference(stack) -> tuple[int, np.ndarray]:
    """Chunks and log-probs of a session that got FIRST + SECOND without any failure."""
    client = stack.client()
    sid = client.create_session().session_id
    client.append(sid, FIRST)
    client.append(sid, SECOND, offset=len(FIRST))
    return _chunks(stack, sid), np.array(client.score(sid, "alpha eps theta").logprobs)


def _session_with_first(stack):
    """(client, session id, chunks stored) of a session that holds FIRST."""
    client = stack.client()
    sid = client.create_session().session_id
    client.append(sid, FIRST)
    return client, sid, _chunks(stack, sid)


def _retry_is_stored_once(stack, client, sid, want_chunks, want_logprobs) -> None:
    client.append(sid, SECOND, offset=len(FIRST))  # the client's retry from the committed offset
    assert _chunks(stack, sid) == want_chunks
    np.testing.assert_array_equal(np.array(client.score(sid, "alpha eps theta").logprobs), want_logprobs)


def test_a_retried_append_after_a_failure_part_way_is_stored_once(failing):
    stack, retriever = failing
    want_chunks, want_logprobs = _reference(stack)
    client, sid, before = _session_with_first(stack)
    retriever.fail_after = 12  # some of SECOND's chunks reach ret-mem, then the call fails
    with pytest.raises(Exception, match="internal error"):  # the decoder hides the cause from callers
        client.append(sid, SECOND, offset=len(FIRST))
    assert retriever.fail_after is None, "the failure was not injected"
    assert _chunks(stack, sid) == before  # the failed call's chunks are gone, the committed ones kept
    assert client.get_session(sid).text_bytes == len(FIRST)
    _retry_is_stored_once(stack, client, sid, want_chunks, want_logprobs)


def test_a_roll_back_that_cannot_run_is_done_before_the_next_read_even_after_a_gateway_restart(failing):
    stack, retriever = failing
    want_chunks, want_logprobs = _reference(stack)
    client, sid, before = _session_with_first(stack)
    retriever.on_fail = stack.retmem.stop  # ret-mem goes down with the failure: no roll-back possible now
    retriever.fail_after = 12
    with pytest.raises(Exception):  # noqa: B017 - UNAVAILABLE or the injected error, whichever lands first
        client.append(sid, SECOND, offset=len(FIRST))
    sessions = json.loads((stack.gateway.config.data_dir / "sessions.json").read_text())["sessions"]
    assert [r["dirty_from"] for r in sessions if r["session_id"] == sid] != [None]  # recorded on disk
    with pytest.raises(Unavailable):  # memory is required and cannot be made consistent now
        client.score(sid, "alpha")
    for mode in ("if_available", "off"):  # reads that may go without memory still answer
        assert not client.score(sid, "alpha", memory=mode).memory.memory_used

    stack.gateway.stop(0)
    stack.retmem.start()
    stack.gateway = GatewayServer(stack.gateway.config)  # a new gateway process on the same table
    stack.gateway.start()
    assert _chunks(stack, sid) > before  # the failed call's chunks are still in ret-mem ...
    client = stack.client()
    client.score(sid, "alpha")  # ... until the session is next used
    assert _chunks(stack, sid) == before
    _retry_is_stored_once(stack, client, sid, want_chunks, want_logprobs)
