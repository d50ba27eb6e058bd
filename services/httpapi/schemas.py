"""Request bodies of the HTTP API: OpenAI's shapes plus the memory extension.

Fields OpenAI defines and this server cannot honour (n > 1, tools, penalties, logprobs of generated
tokens, ...) are refused with 400 naming the field (`unsupported()`), never silently ignored. Fields
nobody defines are ignored, as OpenAI's server does. The extension, in the body (the `openai` client's
`extra_body`):

    session_id   read this session's memory (also the header X-Session-Id)
    memory       "required" (default with a session) | "if_available" | "off"
    remember     append the exchange to the session's memory after the answer
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import ApiError


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def for_template(self) -> dict[str, str]:
        """The message as chat templates take it ("developer" is OpenAI's newer name for system)."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class StreamOptions(_Body):
    include_usage: bool = False


class _Generation(_Body):
    """What chat and text completions share: model, decoding, streaming, the memory extension."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # vLLM's extension
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # -- the memory extension --
    session_id: str | None = None
    memory: Literal["required", "if_available", "off"] | None = None
    remember: bool = False

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop: at most 4 non-empty strings", param="stop")
        return stops

    def unsupported(self) -> None:
        """400 for OpenAI fields set to something this server does not do."""
        if self.n not in (None, 1):
            _refuse("n", "only n=1 is supported")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                _refuse(name, "penalties are not supported")
        if self.logit_bias:
            _refuse("logit_bias", "not supported")


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> None:
        super().unsupported()
        if self.logprobs:
            _refuse("logprobs", "log-probs of chat replies are not supported (score with /v1/completions)")
        for name in ("tools", "functions"):
            if getattr(self, name):
                _refuse(name, "tool calls are not supported")
        if self.tool_choice not in (None, "none"):
            _refuse("tool_choice", "tool calls are not supported")
        if self.response_format and self.response_format.get("type", "text") != "text":
            _refuse("response_format", "only type 'text' is supported")
        if self.max_tokens == 0:
            _refuse("max_tokens", "must be >= 1")


class CompletionRequest(_Generation):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    suffix: str | None = None
    best_of: int | None = None

    def text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            _refuse("prompt", "exactly one prompt per request")
        return self.prompt[0]

    def scoring(self) -> bool:
        """max_tokens 0 with echo: the prompt's own log-probs (how OpenAI's API scores a text)."""
        return self.max_tokens == 0

    def unsupported(self) -> None:
        super().unsupported()
        if self.suffix:
            _refuse("suffix", "not supported")
        if self.best_of not in (None, 1):
            _refuse("best_of", "not supported")
        if self.max_tokens == 0 and not self.echo:
            _refuse("max_tokens", "0 only with echo=true (scoring the prompt)")
        if self.logprobs is not None and not self.scoring():
            _refuse("logprobs", "only for the prompt (max_tokens=0, echo=true); not for generated tokens")
        if self.echo and not self.scoring():
            _refuse("echo", "only with max_tokens=0 (scoring the prompt)")
        if self.scoring() and (self.stream or self.remember):
            _refuse("stream" if self.stream else "remember", "not with max_tokens=0 (scoring)")


class SessionCreateRequest(_Body):
    name: str = Field("", max_length=128)
    # "text" | "keys": what the session's chunks are found by; None: the decoder's default. The gateway
    # checks the value (a 400 naming `retrieval`), so the sources are listed in one place.
    retrieval: str | None = None


def _refuse(param: str, message: str) -> None:
    raise ApiError(400, f"{param}: {message}", param=param, code="unsupported")
