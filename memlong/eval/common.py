"""Shared pieces of the evaluations: the loaded stack, fresh memories, RSS sampling, result files."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import platform
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from memlong.atomic import write_atomic
from memlong.chunkloop import Reader
from memlong.data import book_text
from memlong.dtypes import record_bytes
from memlong.loading import LoadedModel, load_model
from memlong.memory import MemoryConfig, SessionMemory
from memlong.model import MemLongConfig, MemLongModel
from memlong.weights import default_cache_dir


@dataclass
class Stack(LoadedModel):
    """The loaded model of an evaluation run, with fresh memories and readers over it."""

    @classmethod
    def load(cls, config: MemLongConfig, model_path: str | None = None, adapter: str | None = None) -> Stack:
        """See memlong.loading.load_model."""
        return cls(**vars(load_model(config, model_path, adapter)))

    def fresh_memory(self) -> SessionMemory:
        cfg = self.model.config
        rec = record_bytes(self.model.kv_record_shape, cfg.kv_dtype, cfg.kv_codec)
        return SessionMemory(
            MemoryConfig(
                dim=self.model.retrieval_dim(self.retriever.dim),
                record_bytes=rec,
                memory_size=self.model.config.memory_chunks,
            )
        )

    def reader(self, with_memory: bool = True) -> Reader:
        return Reader(
            self.model, self.retriever, self.tokenizer, self.fresh_memory() if with_memory else None
        )

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_book(self, name: str) -> list[int]:
        """Token ids of a whole book, cached on disk (tokenising a 1M-token book takes a minute)."""
        text = book_text(name)
        key = hashlib.sha256(text.encode() + self.source.encode()).hexdigest()[:16]
        path = default_cache_dir() / "tokens" / f"{Path(name).name}-{key}.npy"
        if path.is_file():
            return np.load(path, allow_pickle=False).tolist()
        ids = self.encode(text)
        buf = io.BytesIO()
        np.save(buf, np.asarray(ids, dtype=np.int32), allow_pickle=False)
        write_atomic(path, buf.getvalue())
        return ids


@contextlib.contextmanager
def stock_attention(model: MemLongModel) -> Iterator[None]:
    """Run the wrapped HF model with its stock SDPA attention (the full-attention baseline)."""
    cfg = model.hf.config
    saved = cfg._attn_implementation
    cfg._attn_implementation = "sdpa"
    try:
        yield
    finally:
        cfg._attn_implementation = saved


@torch.no_grad()
def full_attention_logprobs(model: MemLongModel, tokens: list[int], last: int) -> torch.Tensor:
    """log p of the last `last` tokens under plain full causal attention over all of `tokens`."""
    with stock_attention(model):
        hidden = model.base(torch.tensor([tokens])).last_hidden_state[0, -last - 1 : -1]  # (last, hidden)
    logp = torch.log_softmax(model.logits(hidden).float(), dim=-1)
    return logp.gather(1, torch.tensor(tokens[-last:])[:, None])[:, 0]


def merge_rows(
    rows_path: Path,
    meta_path: Path,
    settings: dict,
    same_run: tuple[str, ...],
    records: list[dict],
    key: tuple[str, ...],
) -> list[dict]:
    """This run's records plus the rows of an earlier run at rows_path that scored the same tokens (its
    settings agree on every `same_run` name) and that this run did not redo (by the `key` fields).

    Re-running one length, or one method, then updates those rows and keeps the others.
    """
    try:
        old_rows = json.loads(rows_path.read_text())
        old_settings = json.loads(meta_path.read_text())["settings"]
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return list(records)
    if "lengths" in old_settings:  # files written before max_length was recorded
        old_settings.setdefault("max_length", max(old_settings["lengths"]))
    if any(old_settings.get(k) != settings.get(k) for k in same_run):
        return list(records)
    redone = {tuple(r.get(k) for k in key) for r in records}
    return [r for r in old_rows if tuple(r.get(k) for k in key) not in redone] + list(records)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples resident memory every 5 ms in a thread; `peak` is the maximum seen inside the block."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = 0

    def __enter__(self) -> PeakRSS:
        self._stop = threading.Event()
        self.peak = rss_bytes()

        def run() -> None:
            while not self._stop.wait(self.interval):
                self.peak = max(self.peak, rss_bytes())

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def machine_info() -> dict:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "loadavg": [round(x, 2) for x in os.getloadavg()],  # a shared machine: what else was running
    }


def write_json(path: Path, payload: object) -> None:
    write_atomic(path, json.dumps(payload, indent=1) + "\n")


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    body = "".join("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |\n" for r in rows)
    return head + body


def _fmt(x: object) -> str:
    if isinstance(x, float):
        return f"{x:.3f}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def plot_lines(
    path: Path, rows: list[dict], x: str, y: str, ylabel: str, group: str = "method", log_x: bool = True
) -> None:
    """One line per `group` value of y against x (log2 x axis unless log_x is False), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in sorted({r[group] for r in rows}):
        pts = sorted((r[x], r[y]) for r in rows if r[group] == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    if log_x:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
