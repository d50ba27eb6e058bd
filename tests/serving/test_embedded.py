"""The embedded default (ret-mem + decoder + gateway in one process) with a tiny model, and the CLI verbs."""

from __future__ import annotations

from memlong.cli import main
from memlong.client import Client
from services.gateway.embedded import EmbeddedStack, local_api_key
from tests.factories import RecordingRetriever
from tests.serving.conftest import ByteTokenizer, tiny_model


def test_embedded_stack_serves_and_stops(tmp_path, capsys):
    model = tiny_model()
    stack = EmbeddedStack.start(
        tmp_path, model.config, components=(model, ByteTokenizer(), RecordingRetriever())
    )
    try:
        assert local_api_key(tmp_path) == stack.api_key  # the key file is reused, not regenerated
        client = Client(stack.gateway_address, stack.api_key, timeout_s=30)
        sid = client.create_session("x").session_id
        client.append(sid, "alpha beta gamma delta " * 5)
        assert client.score(sid, "alpha beta gamma").memory.memory_used
        book = tmp_path / "book.txt"
        book.write_text("epsilon zeta eta theta " * 3)
        conn = ["--gateway", stack.gateway_address, "--data-dir", str(tmp_path)]
        assert main(["ingest", str(book), "--session", sid, "--quiet", *conn]) == 0
        assert main(["score", "--text", "alpha beta", "--session", sid, *conn]) == 0
        assert main(["ask", "alpha", "--session", sid, "--max-new-tokens", "3", *conn]) == 0
        assert main(["session", "list", *conn]) == 0
        out = capsys.readouterr().out
        assert "perplexity" in out and sid in out
        assert main(["session", "delete", sid, *conn]) == 0
    finally:
        stack.stop(0)
