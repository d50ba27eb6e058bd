"""OpenAI's response shapes, and the text a client sees of a generation.

Pure functions and one small class; no I/O. The `memlong` key of a response is the memory extension:
which session was read, whether memory was used, what was retrieved, and whether the exchange was
remembered.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Sequence
from typing import Any

from memlong.api.decoder.v1 import decoder_pb2 as dpb
from memlong.api.gateway.v1 import gateway_pb2 as pb


class TextOut:
    """Generated text in, what the client may see out: cut before the first stop string (OpenAI never
    returns the stop sequence; the decoder never sends a stop token's text, such as the model's end of
    sequence), and text that may be the start of one held back until the next piece shows it is not."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text = ""  # everything generated so far
        self.sent = 0  # characters of `text` handed out
        self.stopped = False  # a stop string was found: nothing more is handed out

    def push(self, piece: str) -> str:
        """Add generated text; return what may be sent now."""
        if self.stopped:
            return ""
        self.text += piece
        start = max(0, self.sent - self.longest)
        cuts = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if cuts:
            self.stopped = True
            return self._release(min(cuts))
        return self._release(len(self.text) - self._held())

    def finish(self) -> str:
        """The generation ended: what was held back goes out."""
        return "" if self.stopped else self._release(len(self.text))

    @property
    def visible(self) -> str:
        return self.text[: self.sent]

    def _held(self) -> int:
        """Length of the longest tail of `text` that starts some stop string."""
        for k in range(min(self.longest - 1, len(self.text) - self.sent), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def _release(self, end: int) -> str:
        end = max(end, self.sent)
        out, self.sent = self.text[self.sent : end], end
        return out


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def sse(obj: Any) -> str:
    """One server-sent event carrying `obj` as JSON."""
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def finish_reason(out: TextOut, last: dpb.GenerateResponse | None) -> str:
    if out.stopped or last is None or last.finish_reason == dpb.FINISH_REASON_STOP:
        return "stop"
    return "length"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def memory_info(session_id: str | None, report: dpb.MemoryReport | None) -> dict[str, Any]:
    """The `memlong` extension of a reply: the session read and what memory did."""
    info: dict[str, Any] = {"session_id": session_id}
    if report is not None:
        info.update(
            memory_used=report.memory_used,
            note=report.note,
            retrievals=report.retrievals,
            retrieved_chunks=len(report.retrieved_ids),
            query=report.query,
        )
    return info


class Shape:
    """Builds the objects of one response (chat.completion or text_completion) with one id."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.model = model
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def full(self, text: str, finish: str, use: dict[str, int], info: dict[str, Any], logprobs: Any = None):
        """The whole (non-streamed) response."""
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
                "logprobs": None,
            }
            return self._envelope("chat.completion", [choice], usage=use, memlong=info)
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs}
        return self._envelope("text_completion", [choice], usage=use, memlong=info)

    def chunk(self, text: str | None = None, *, finish: str | None = None, role: bool = False, **extra: Any):
        """One streamed chunk: a text delta, the opening role (chat), or the closing finish reason."""
        if self.chat:
            delta: dict[str, Any] = {}
            if role:
                delta = {"role": "assistant", "content": ""}
            elif text is not None:
                delta = {"content": text}
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return self._envelope("chat.completion.chunk", [choice], **extra)
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return self._envelope("text_completion", [choice], **extra)

    def usage_chunk(self, use: dict[str, int]) -> dict[str, Any]:
        """The extra last chunk when the client asked for stream_options.include_usage."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._envelope(obj, [], usage=use)


def session_obj(s: pb.Session) -> dict[str, Any]:
    """A session as the HTTP API shows it."""
    return {
        "id": s.session_id,
        "object": "session",
        "name": s.name,
        "created_at": int(s.created_at),
        "text_bytes": s.text_bytes,
        "tokens": s.tokens,
        "chunks": s.chunks,
        "retrieval": s.retrieval,
    }


def progress_obj(p: pb.AppendProgress) -> dict[str, Any]:
    return {
        "object": "session.document.progress",
        "bytes_done": p.bytes_done,
        "bytes_total": p.bytes_total,
        "tokens_done": p.tokens_done,
        "done": p.done,
        "text_bytes": p.text_bytes,
    }


def score_logprobs(r: pb.ScoreResponse) -> dict[str, Any]:
    """OpenAI's completion logprobs object for a scored prompt. Tokens are named by id
    ("token_id:N", as vLLM does): the front has no tokenizer; the first token has no log-prob."""
    values = [None if i == 0 else float(x) for i, x in enumerate(r.logprobs)]
    return {
        "tokens": [f"token_id:{t}" for t in r.token_ids],
        "token_logprobs": values,
        "top_logprobs": None,
        "text_offset": None,
    }
