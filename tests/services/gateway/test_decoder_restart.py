"""A decoder replica restarted in another process is reached by the gateway as soon as it serves."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from memlong.errors import Unavailable
from memlong.services.common import server as common_server
from memlong.services.decoder.server import DecoderServer
from tests.services.stack import start_stack


def test_score_and_generate_reach_a_restarted_decoder_at_once(tmp_path, monkeypatch) -> None:
    """The gateway's channel to the decoder failed to connect while it was down (so it sits in its
    reconnect backoff); the decoder comes back at the same address in another process (here: without
    this process forgetting its channels, as a server elsewhere cannot). The first score and the first
    generation after it serves are answered, as before the restart."""
    stack = start_stack(tmp_path)
    try:
        client = stack.client()
        sid = client.create_session("s").session_id
        client.append(sid, "alpha beta gamma delta " * 8)
        before = client.score(sid, "alpha beta")
        tokens = [t.token_id for t in client.generate(sid, "alpha", max_new_tokens=3)]
        port = stack.decoder.port
        stack.decoder.stop(0)
        for _ in range(8):  # failed connects push the channel's reconnect backoff to its maximum (1 s)
            with pytest.raises(Unavailable):
                client.score(sid, "alpha beta")
            threading.Event().wait(0.2)
        monkeypatch.setattr(common_server, "forget_channels", lambda targets: None)
        config = dataclasses.replace(stack.decoder.config, port=port)
        stack.decoder = DecoderServer.from_components(stack.model, stack.tokenizer, stack.retriever, config)
        stack.decoder.start()
        assert client.score(sid, "alpha beta").token_ids == before.token_ids
        assert [t.token_id for t in client.generate(sid, "alpha", max_new_tokens=3)] == tokens
    finally:
        stack.stop()
