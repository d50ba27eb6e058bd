"""The OpenAI-compatible HTTP API, driven by the official `openai` client, unmodified, over the serving
tests' stack (ret-mem, a decoder on a tiny random LLaMA, the gateway, all on loopback ports).

The front holds no logic of the gateway's: the same answers as the gRPC client for the same session
(congruence), the gateway's statuses as HTTP statuses (one test per kind), and the README's curl example
runs as written."""

from __future__ import annotations

import json
import re
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import openai
import pytest

from memlong.api.gateway.v1 import gateway_pb2 as pb
from memlong.api.gateway.v1 import gateway_pb2_grpc as pb_grpc
from memlong.chunkloop import Reader
from memlong.rpc.channel import get_channel
from memlong.services.gateway.config import Quotas
from memlong.services.httpapi.config import DEFAULT_MODEL_ID, HttpConfig
from memlong.services.httpapi.server import HttpServer
from memlong.services.httpapi.template import ChatTemplate
from tests.services.stack import Paced, Stack, start_stack, until

REPO = Path(__file__).resolve().parents[3]
BOOK = "alpha beta gamma delta epsilon zeta eta theta iota kappa " * 6
MODEL = DEFAULT_MODEL_ID


@pytest.fixture(scope="module")
def template() -> ChatTemplate:
    """The packaged SmolLM2-135M-Instruct's own chat template (ChatML); the tiny model reads its bytes."""
    return ChatTemplate.load()


def serve_http(stack: Stack, template: ChatTemplate | None, **kw) -> HttpServer:
    server = HttpServer(HttpConfig(gateway=stack.gateway.address(), **kw), template)
    server.start()
    return server


def serve_http_alone(template: ChatTemplate | None, **kw) -> HttpServer:
    """A front whose gateway is nowhere (a closed port): for what the front answers by itself."""
    server = HttpServer(HttpConfig(gateway="127.0.0.1:9", **kw), template)
    server.start()
    return server


@pytest.fixture
def served(tmp_path: Path, template: ChatTemplate) -> Iterator[tuple[Stack, HttpServer]]:
    stack = start_stack(tmp_path, quotas=Quotas(max_sessions=3))
    http = serve_http(stack, template)
    yield stack, http
    http.stop(0)
    stack.stop()


def client(http: HttpServer, key: str = "key-a") -> openai.OpenAI:
    return openai.OpenAI(base_url=http.url() + "/v1", api_key=key, max_retries=0, timeout=60)


def upload(http: HttpServer, session_id: str, text: str, key: str = "key-a", stream: bool = False):
    """POST a document (plain HTTP: the openai client has no such call); the JSON or the events."""
    url = f"{http.url()}/v1/sessions/{session_id}/documents" + ("?stream=true" if stream else "")
    req = urllib.request.Request(url, data=text.encode(), headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        body = r.read().decode()
    if not stream:
        return json.loads(body)
    return [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: ")]


def new_session(c: openai.OpenAI, name: str = "s") -> str:
    return c.post("/sessions", body={"name": name}, cast_to=object)["id"]


# -- completions ------------------------------------------------------------------------------------


def test_chat_completion_reads_the_chat_template_and_matches_the_grpc_client(served, template) -> None:
    stack, http = served
    c = client(http)
    sid = new_session(c)
    upload(http, sid, BOOK)
    messages = [{"role": "user", "content": "Which letter comes after gamma?"}]
    reply = c.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, temperature=0, extra_body={"session_id": sid}
    )
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason == "length" and reply.usage.completion_tokens == 6
    prompt = template.render(messages)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert reply.usage.prompt_tokens == len(prompt.encode())  # the tiny tokenizer: one token per byte
    # The same prompt through the gRPC client on the same session: the same tokens (greedy).
    answer = stack.client().ask(sid, prompt, max_new_tokens=6, temperature=0.0)
    assert choice.message.content == answer.text
    assert reply.model_extra["memlong"]["memory_used"] is True  # the document was read from memory
    # The session named by the X-Session-Id header instead of the body: the same call.
    by_header = c.with_options(default_headers={"X-Session-Id": sid}).chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, temperature=0
    )
    assert by_header.choices[0].message.content == answer.text
    assert by_header.model_extra["memlong"]["memory_used"] is True


def test_streamed_chat_equals_the_whole_answer(served) -> None:
    _, http = served
    c = client(http)
    ask = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 5,
        "temperature": 0,
    }
    whole = c.chat.completions.create(**ask).choices[0].message.content
    chunks = list(c.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole and text
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5


def test_text_completion_streams_and_scoring_equals_grpc_score(served) -> None:
    stack, http = served
    c = client(http)
    sid = new_session(c)
    upload(http, sid, BOOK)
    extra = {"session_id": sid}
    streamed = c.completions.create(
        model=MODEL, prompt="alpha beta", max_tokens=4, temperature=0, stream=True
    )
    whole = c.completions.create(model=MODEL, prompt="alpha beta", max_tokens=4, temperature=0)
    assert "".join(ch.choices[0].text for ch in streamed) == whole.choices[0].text
    # max_tokens=0 + echo + logprobs: the prompt's own log-probs, as the gateway's Score gives them
    scored = c.completions.create(
        model=MODEL, prompt=BOOK[:80], max_tokens=0, echo=True, logprobs=0, extra_body=extra
    )
    grpc_score = stack.client().score(sid, BOOK[:80], return_logprobs=True)
    lp = scored.choices[0].logprobs
    assert lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(list(grpc_score.logprobs)[1:], abs=1e-6)
    assert lp.tokens == [f"token_id:{t}" for t in grpc_score.token_ids]
    assert scored.model_extra["memlong"]["perplexity"] == pytest.approx(grpc_score.perplexity)
    assert scored.choices[0].text == BOOK[:80] and scored.usage.prompt_tokens == len(BOOK[:80])


def test_a_client_leaving_a_stream_stops_the_decoder(served, monkeypatch) -> None:
    """Closing the HTTP stream cancels the gateway call, which stops the decoder's work (promise 7)."""
    stack, http = served
    pace = Paced()  # each decoding step waits for the test's go
    monkeypatch.setattr(Reader, "generate", pace.wrap(Reader.generate))
    for _ in range(3):
        pace.go.release()
    ask = {"model": MODEL, "prompt": "alpha", "max_tokens": 400, "temperature": 0}
    with client(http).completions.create(**ask, stream=True) as stream:
        next(iter(stream))  # the first token came: the call runs
    for _ in range(400):  # let a decoder that did not notice run on to the end
        pace.go.release()
    assert until(lambda: stack.decoder.engine.in_flight == 0), "the decoder slot was never freed"
    assert pace.steps < 400, "the decoder generated every token of an abandoned stream"
    assert client(http).completions.create(model=MODEL, prompt="beta", max_tokens=2).choices[0].text


def test_stop_strings_are_cut_from_the_answer(served) -> None:
    _, http = served
    c = client(http)
    ask = {"model": MODEL, "prompt": "alpha", "max_tokens": 12, "temperature": 0}
    full = c.completions.create(**ask).choices[0].text
    stop = full.split(" ")[2]  # the tiny tokenizer decodes ids as space-separated numbers
    cut = c.completions.create(**ask, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = c.completions.create(**ask, stop=[stop], stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == cut.choices[0].text


def test_the_end_of_sequence_ends_a_reply_and_is_no_part_of_it(served, monkeypatch) -> None:
    """The decoder never sends a stop token's text, so `<|im_end|>` reaches no reply, whole or streamed."""
    stack, http = served
    c = client(http)
    ask = {"model": MODEL, "prompt": "alpha", "max_tokens": 6, "temperature": 1.0, "seed": 7}
    ids = [int(t) for t in c.completions.create(**ask).choices[0].text.split()]
    end = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])
    eos = ids[end]
    monkeypatch.setattr(stack.decoder.engine, "eos_ids", (eos,))  # the tokenizer's end of sequence
    monkeypatch.setattr(
        stack.tokenizer, "decode", lambda out: " ".join("<|im_end|>" if i == eos else str(i) for i in out)
    )
    whole = c.completions.create(**ask)
    assert whole.choices[0].text == " ".join(map(str, ids[:end])) and whole.choices[0].finish_reason == "stop"
    streamed = list(c.completions.create(**ask, stream=True))
    assert "".join(ch.choices[0].text for ch in streamed) == whole.choices[0].text


# -- sessions and memory ----------------------------------------------------------------------------


def test_sessions_documents_and_remembered_chat(served, template) -> None:
    stack, http = served
    c = client(http)
    sid = new_session(c, "book")
    events = upload(http, sid, BOOK, stream=True)
    assert events[-1]["done"] is True and events[-1]["text_bytes"] == len(BOOK)
    assert all(e["object"] == "session.document.progress" for e in events)
    got = c.get(f"/sessions/{sid}", cast_to=object)
    assert got["text_bytes"] == len(BOOK) and got["name"] == "book" and got["chunks"] > 0
    assert [s["id"] for s in c.get("/sessions", cast_to=object)["data"]] == [sid]
    # remember: the exchange, as the template renders it, is appended to the session's memory
    messages = [{"role": "user", "content": "remember this"}]
    reply = c.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=3,
        temperature=0,
        extra_body={"session_id": sid, "remember": True},
    )
    turn = template.render(
        [*messages, {"role": "assistant", "content": reply.choices[0].message.content}], False
    )
    assert reply.model_extra["memlong"]["remembered"] is True
    assert c.get(f"/sessions/{sid}", cast_to=object)["text_bytes"] == len(BOOK) + len(turn.encode())
    # another tenant sees nothing of it; the owner deletes it
    with pytest.raises(openai.NotFoundError):
        client(http, "key-b").get(f"/sessions/{sid}", cast_to=object)
    assert c.delete(f"/sessions/{sid}", cast_to=object)["deleted"] is True
    with pytest.raises(openai.NotFoundError):
        c.get(f"/sessions/{sid}", cast_to=object)


def test_a_session_keeps_the_retrieval_source_it_was_created_with(served) -> None:
    """`retrieval` picks what a session's chunks are found by; absent, the decoder's default (text
    here); every session object reports it; a bad value is a 400 naming the field."""
    stack, http = served
    c = client(http)
    keys = c.post("/sessions", body={"name": "k", "retrieval": "keys"}, cast_to=object)
    default = c.post("/sessions", body={"name": "d"}, cast_to=object)
    assert keys["retrieval"] == "keys" and default["retrieval"] == "text"
    assert c.get(f"/sessions/{keys['id']}", cast_to=object)["retrieval"] == "keys"
    listed = {s["id"]: s["retrieval"] for s in c.get("/sessions", cast_to=object)["data"]}
    assert listed == {keys["id"]: "keys", default["id"]: "text"}
    assert stack.client().get_session(keys["id"]).retrieval == "keys"  # what the gateway holds
    for bad in ("vectors", 7):
        with pytest.raises(openai.BadRequestError) as info:
            c.post("/sessions", body={"name": "x", "retrieval": bad}, cast_to=object)
        err = error_body(info.value)
        assert err["param"] == "retrieval" and err["type"] == "invalid_request_error"
        assert err["message"].startswith("retrieval:")
    assert len(c.get("/sessions", cast_to=object)["data"]) == 2  # nothing made by the refused ones


def test_models_and_health(served) -> None:
    stack, http = served
    assert [m.id for m in client(http).models.list()] == [MODEL]
    for path in ("/healthz", "/readyz", "/health"):
        with urllib.request.urlopen(http.url() + path, timeout=10) as r:
            assert r.status == 200
    stack.gateway.stop(0)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(http.url() + "/readyz", timeout=10)
    assert info.value.code == 503
    with urllib.request.urlopen(http.url() + "/healthz", timeout=10) as r:  # the process itself lives
        assert r.status == 200


def test_a_call_without_a_session_reads_no_memory_and_cannot_require_it(served) -> None:
    """The gateway extension the front relies on: Score / Generate with no session_id."""
    stack, _ = served
    stub = pb_grpc.GatewayStub(get_channel(stack.gateway.address()))
    meta = (("x-api-key", "key-a"),)
    tokens = list(stub.Generate(pb.GenerateRequest(prompt=b"alpha"), timeout=30, metadata=meta))
    assert tokens and tokens[-1].token.memory.memory_used is False and tokens[-1].token.prompt_tokens == 5
    with pytest.raises(grpc.RpcError) as info:
        stub.Score(pb.ScoreRequest(text=b"alpha", memory_mode=1), timeout=30, metadata=meta)  # REQUIRED
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:
        stub.Score(pb.ScoreRequest(text=b"alpha"), timeout=30)  # no key: still refused
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED


# -- errors: one of each kind -----------------------------------------------------------------------


def error_body(exc: openai.APIStatusError) -> dict:
    body = exc.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_errors_of_each_kind_in_openai_shape(served) -> None:
    stack, http = served
    c = client(http)
    ask = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with pytest.raises(openai.BadRequestError) as bad:  # 400: the decoder's limit, named as OpenAI's field
        c.chat.completions.create(**{**ask, "max_tokens": 5000})
    assert error_body(bad.value)["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as bad:  # 400: refused by the front's schema
        c.chat.completions.create(**ask, n=2)
    assert error_body(bad.value)["param"] == "n"
    with pytest.raises(openai.AuthenticationError) as unauth:  # 401
        client(http, "wrong-key").chat.completions.create(**ask)
    assert error_body(unauth.value)["code"] == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as missing:  # 404: a session that never existed
        c.chat.completions.create(**ask, extra_body={"session_id": "s-never-was"})
    assert error_body(missing.value)["type"] == "not_found_error"
    with pytest.raises(openai.NotFoundError) as missing:  # 404: a model not served
        c.chat.completions.create(**{**ask, "model": "gpt-4"})
    assert error_body(missing.value)["code"] == "model_not_found"
    big = "x" * ((4 << 20) + 1)  # 413: over the gateway's limit on one prompt (RESOURCE_EXHAUSTED, too_large)
    with pytest.raises(openai.APIStatusError) as large:
        c.completions.create(model=MODEL, prompt=big, max_tokens=1)
    assert large.value.status_code == 413 and error_body(large.value)["code"] == "too_large"
    for _ in range(3):  # 429: the tenant's session quota (3 here)
        new_session(c)
    with pytest.raises(openai.RateLimitError) as quota:
        new_session(c)
    assert error_body(quota.value)["type"] == "rate_limit_error"
    with pytest.raises(openai.APIStatusError) as late:  # 504: the client's deadline reaches the gateway
        c.with_options(default_headers={"X-Request-Timeout": "0.001"}).chat.completions.create(**ask)
    assert late.value.status_code == 504
    sid = c.get("/sessions", cast_to=object)["data"][0]["id"]
    stack.retmem.stop()  # 503: the session's memory is unreachable
    with pytest.raises(openai.InternalServerError) as down:
        c.chat.completions.create(**ask, extra_body={"session_id": sid})
    assert down.value.status_code == 503 and error_body(down.value)["type"] == "service_unavailable_error"
    stack.retmem.start()


def test_body_limits_and_malformed_json_are_client_errors(tmp_path: Path, template) -> None:
    stack = start_stack(tmp_path)
    http = serve_http(stack, template, max_body_bytes=1000)
    try:
        c = client(http)
        with pytest.raises(openai.APIStatusError) as large:
            c.completions.create(model=MODEL, prompt="y" * 2000, max_tokens=1)
        assert large.value.status_code == 413 and error_body(large.value)["type"] == "invalid_request_error"
        chunked = urllib.request.Request(  # no Content-Length: refused once the body passes the limit
            http.url() + "/v1/completions",
            data=iter([b'{"model": "x", "prompt": "', b"z" * 900, b"z" * 900, b'"}']),
            headers={"Authorization": "Bearer key-a", "Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(chunked, timeout=10)
        assert info.value.code == 413 and json.loads(info.value.read())["error"]["code"] == "too_large"
        for data in (b"{not json", b'{"model": 1}', b"[]"):
            req = urllib.request.Request(
                http.url() + "/v1/chat/completions",
                data=data,
                headers={"Authorization": "Bearer key-a", "Content-Type": "application/json"},
            )
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(req, timeout=10)
            assert info.value.code == 400
            assert json.loads(info.value.read())["error"]["type"] == "invalid_request_error"
    finally:
        http.stop(0)
        stack.stop()


# -- the README's curl example ----------------------------------------------------------------------


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(r"<!-- http-example -->\s*```bash\n(.*?)```", text, re.S)
    assert match, "README.md: no bash block after <!-- http-example -->"
    return match.group(1)


def test_the_readme_curl_example_runs(served, tmp_path: Path) -> None:
    _, http = served
    (tmp_path / "book.txt").write_text(BOOK)
    env = {"PATH": "/usr/bin:/bin", "MEMLONG_HTTP": http.url(), "KEY": "key-a"}
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", readme_example()],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert '"done":true' in done.stdout and '"object":"chat.completion"' in done.stdout


# -- memlong up ---------------------------------------------------------------------------------------


def test_memlong_up_serves_the_http_api_beside_the_gateway(
    tmp_path: Path, capsys, monkeypatch, template
) -> None:
    """`memlong up` prints the HTTP address; the openai client talks to it with the local key."""
    from memlong.cli import main
    from memlong.deploy import cli as deploy_cli
    from memlong.deploy.stack import EmbeddedStack
    from tests.factories import RecordingRetriever
    from tests.services.stack import ByteTokenizer, tiny_model

    model = tiny_model()
    real_start = EmbeddedStack.start
    seen = {}

    def start(data_dir, memlong, **kw):  # the tiny model instead of the packaged one; the CLI's ports
        components = (model, ByteTokenizer(), RecordingRetriever())
        seen["stack"] = real_start(
            data_dir,
            model.config,
            components=components,
            chat_template=template,
            ports=kw["ports"],
            http_port=kw["http_port"],
        )
        return seen["stack"]

    def instead_of_waiting() -> None:
        out = capsys.readouterr().out
        url = re.search(r"^http +(\S+)", out, re.M).group(1)
        c = openai.OpenAI(base_url=url, api_key=seen["stack"].api_key, max_retries=0, timeout=60)
        reply = c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        seen["reply"] = reply.choices[0].message.content

    class NoSignal:  # `memlong up` waits on this for SIGTERM / SIGINT
        wait = staticmethod(instead_of_waiting)

    monkeypatch.setattr(EmbeddedStack, "start", start)
    monkeypatch.setattr(deploy_cli, "stop_signal", NoSignal)
    assert main(["up", "--data-dir", str(tmp_path), "--port", "0", "--http-port", "0"]) == 0
    assert seen["reply"]
    assert seen["stack"].http is not None and seen["stack"].http._server is None  # stopped with the stack


def test_gateway_serve_flags_build_the_front_config(tmp_path: Path) -> None:
    """`memlong gateway serve --http-port` (Kubernetes): the front calls its gateway on loopback, and
    under TLS expects the name the gateway's certificate carries."""
    from memlong.cli import build_parser
    from memlong.rpc.tls import PLAINTEXT, TlsConfig
    from memlong.services.httpapi.config import config_from_args
    from tests.rpc.certs import issue, make_ca

    args = build_parser().parse_args(["gateway", "serve", "--host", "0.0.0.0", "--port", "50051"])
    assert config_from_args(args, "0.0.0.0", 50051, None, PLAINTEXT) is None  # off by default
    args = build_parser().parse_args(
        ["gateway", "serve", "--host", "0.0.0.0", "--http-port", "8080", "--http-gateway-server-name", "gw"]
    )
    cfg = config_from_args(args, "0.0.0.0", 50051, None, PLAINTEXT)
    assert (cfg.gateway, cfg.host, cfg.port, cfg.model_id) == ("127.0.0.1:50051", "0.0.0.0", 8080, MODEL)
    ca = make_ca(tmp_path, "ca")
    cert, key = issue(ca, tmp_path, "gw")
    tls = TlsConfig(cert=cert, key=key, ca=ca.pem)
    cfg = config_from_args(args, "0.0.0.0", 50051, "/models/my-llama", tls)
    assert cfg.gateway_tls.server_name == "gw" and cfg.tls == tls and cfg.model_id == "my-llama"


def test_the_http_port_serves_tls_under_the_public_policy(tmp_path: Path, template) -> None:
    from memlong.rpc.tls import PLAINTEXT, TlsConfig
    from tests.rpc.certs import issue, make_ca

    ca = make_ca(tmp_path, "ca")
    cert, key = issue(ca, tmp_path, "front")
    stack = start_stack(tmp_path / "stack")
    http = serve_http(stack, template, tls=TlsConfig(cert=cert, key=key, ca=ca.pem), gateway_tls=PLAINTEXT)
    try:
        assert http.url().startswith("https://")
        verified = openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=str(ca.pem)))
        c = openai.OpenAI(base_url=http.url() + "/v1", api_key="key-a", max_retries=0, http_client=verified)
        assert c.completions.create(model=MODEL, prompt="alpha", max_tokens=2).choices[0].text
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # plaintext to the TLS port fails
            urllib.request.urlopen(http.url().replace("https", "http") + "/healthz", timeout=10)
    finally:
        http.stop(0)
        stack.stop()


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
def test_an_over_limit_body_still_arriving_gets_its_413_not_a_reset(template, framing: str) -> None:
    """The client is still sending when the front decides 413 on a request that asks to close after it
    (urllib's always do): the front reads the rest before it answers and closes, so the client reads the
    413 (a close while data arrives resets the connection, and a reset throws away the answer the client
    has not read yet). Chunked: decided on the first piece over the limit; sized: on the header."""
    http = serve_http_alone(template, max_body_bytes=1000)  # a 413 never reaches the gateway
    pieces = [b"z" * 1500] * 5
    if framing == "chunked":
        head, frame, end = (
            b"Transfer-Encoding: chunked",
            (lambda p: b"%x\r\n%s\r\n" % (len(p), p)),
            b"0\r\n\r\n",
        )
    else:
        head, frame, end = b"Content-Length: %d" % sum(map(len, pieces)), (lambda p: p), b""
    try:
        host, port = http.url().removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key-a\r\n"
                b"Content-Type: application/json\r\nConnection: close\r\n%s\r\n\r\n" % head
            )
            s.sendall(frame(pieces[0]))  # the front has decided by now
            time.sleep(0.5)  # ... and, without reading on, would have answered and closed by now
            for p in pieces[1:]:
                s.sendall(frame(p))
                time.sleep(0.05)
            s.sendall(end)
            answer = b""
            while b"too_large" not in answer and (part := s.recv(65536)):
                answer += part
        assert answer.startswith(b"HTTP/1.1 413") and b"too_large" in answer
    finally:
        http.stop(0)
