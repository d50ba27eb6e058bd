"""The model's own chat template: chat messages -> the prompt text the model was tuned on.

SmolLM2-135M-Instruct's template is ChatML (`<|im_start|>role\\ncontent<|im_end|>\\n`, a default system
turn when the chat has none, `<|im_start|>assistant\\n` as the generation prompt; `<|im_end|>` is the
end-of-sequence token). The template is read from where the model's weights come from, never written
here: the packaged GGUF's metadata, a checkpoint directory's `chat_template.jinja` or
`tokenizer_config.json`, or a loaded tokenizer. It is rendered by transformers' own Jinja renderer
(the one `apply_chat_template` uses), in a sandbox.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memlong.errors import InvalidArgument, ModelUnavailable


def _token_text(value: Any) -> str:
    """A special token as tokenizer_config.json writes it: a string, or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content", "")
    return value if isinstance(value, str) else ""


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template and the special tokens it may refer to."""

    source: str
    bos_token: str = ""
    eos_token: str = ""  # also where generation stops; never part of a reply's text

    def __post_init__(self) -> None:
        if not self.source.strip():
            raise InvalidArgument("chat_template", "empty")

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt for `messages` ({"role", "content"} dicts); InvalidArgument when the template
        refuses them (some templates raise on roles that do not alternate)."""
        from jinja2 import TemplateError
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            rendered, _ = render_jinja_template(
                [list(messages)],
                chat_template=self.source,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except TemplateError as exc:
            raise InvalidArgument("messages", f"the model's chat template refused them: {exc}") from None
        return rendered[0]

    # -- where templates come from -------------------------------------------------------------------

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> ChatTemplate | None:
        """The template of a loaded (HF) tokenizer; None when it has none."""
        source = getattr(tokenizer, "chat_template", None)
        if not isinstance(source, str) or not source.strip():
            return None
        return cls(
            source,
            _token_text(getattr(tokenizer, "bos_token", "")),
            _token_text(getattr(tokenizer, "eos_token", "")),
        )

    @classmethod
    def from_model_dir(cls, directory: str | Path) -> ChatTemplate:
        """The template of a HF checkpoint directory (chat_template.jinja, else tokenizer_config.json)."""
        directory = Path(directory)
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        jinja = directory / "chat_template.jinja"
        source = jinja.read_text() if jinja.is_file() else config.get("chat_template")
        if isinstance(source, list):  # several named templates: the default one
            source = next((t.get("template") for t in source if t.get("name") == "default"), None)
        if not isinstance(source, str) or not source.strip():
            raise ModelUnavailable(
                f"{directory} has no chat template (chat_template.jinja, tokenizer_config.json)"
            )
        return cls(source, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")))

    @classmethod
    def from_gguf(cls, path: str | Path) -> ChatTemplate:
        """The template in a GGUF file's metadata (tokenizer.chat_template), with its bos/eos tokens."""
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        fields = reader.fields

        def value(name: str) -> Any:
            field = fields.get(name)
            return None if field is None else field.contents()

        source = value("tokenizer.chat_template")
        if not isinstance(source, str) or not source.strip():
            raise ModelUnavailable(f"{path} has no tokenizer.chat_template")
        tokens = fields.get("tokenizer.ggml.tokens")

        def token(name: str) -> str:
            index = value(name)
            if tokens is None or not isinstance(index, int):
                return ""
            return str(tokens.contents(index))

        return cls(source, token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id"))

    @classmethod
    def load(cls, model: str | Path | None = None) -> ChatTemplate:
        """The template of the model the decoders serve: a checkpoint dir, or None for the packaged
        SmolLM2: from the converted cache when a decoder on this machine made one, else from the GGUF
        (parsing its metadata takes seconds; no weights are converted or loaded)."""
        if model is not None:
            return cls.from_model_dir(model)
        from memlong.packages import package_dir
        from memlong.weights import DECODER_GGUF, DECODER_PACKAGE, INSTALL_DECODER, default_cache_dir

        cache = default_cache_dir() / "smollm2-135m-instruct"
        if (cache / "chat_template.jinja").is_file() and (cache / "tokenizer_config.json").is_file():
            return cls.from_model_dir(cache)
        return cls.from_gguf(package_dir(DECODER_PACKAGE, INSTALL_DECODER) / DECODER_GGUF)
