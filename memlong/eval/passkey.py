"""Passkey retrieval: a random key planted at a random depth of a book haystack, asked for at the end.

Every trial of a context length uses the same haystack (a book slice) with the key planted at its own
random, chunk-aligned depth, always before the last local window (so a local-window-only reader cannot
see it). Each reading method has its own base reader (with per-layer memory what a reader stores depends
on what it retrieved, so methods share nothing); trials are read in order of depth, the base ingesting
the haystack up to each depth once; each trial forks it (local state and a copy of memory), ingests the
needle and the rest, then reads the last local window plus the question with every layer and generates
greedily; the question's last chunk and the answer read what a retrieval with the question's own text
found (it is given: no look-ahead). `sliding` reads with
no memory at all. `full` (up to the model's native positions) reads the whole sequence with plain full
attention: the model's own ceiling on the format. Beside accuracy, how often the needle's chunk was among
the chunks retrieved while answering.
"""

from __future__ import annotations

import dataclasses
import random
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from memlong.chunkloop import SamplingParams
from memlong.data import PASSKEY_QUESTION, passkey_needle
from memlong.eval.common import (
    Stack,
    machine_info,
    markdown_table,
    merge_rows,
    stock_attention,
    write_json,
)
from memlong.memory import SessionMemory
from memlong.model import MemLongConfig


@dataclass(frozen=True)
class PasskeySettings:
    book: str = "kjv"
    lengths: tuple[int, ...] = (4096, 8192, 16384, 32768, 65536)
    trials: int = 20
    seed: int = 0
    methods: tuple[str, ...] = ("full", "sliding", "per_layer")
    digits: int = 5
    full_max: int = 8192  # full attention only up to the model's native positions
    # Extra MemLong readings on the same trials: (method name, ((setting, value), ...)).
    variants: tuple[tuple[str, tuple[tuple[str, object], ...]], ...] = ()


_METHOD_ORDER = {"full": 0, "sliding": 1, "per_layer": 2, "paper": 3}
LAYOUT_METHODS = {
    "sliding": {"layout": "per_layer"},
    "per_layer": {"layout": "per_layer"},
    "paper": {"layout": "paper", "reader": "stream"},
}


class _Recording:
    """A memory that remembers the ids its last search returned, best score first."""

    def __init__(self, memory: SessionMemory) -> None:
        self.memory, self.last = memory, []

    def append(self, *args) -> int:
        return self.memory.append(*args)

    def search(self, queries, top_k):
        res = self.memory.search(queries, top_k)
        order = np.argsort(-res.scores[0], kind="stable")  # the rows are in id order
        self.last = [int(i) for i in res.ids[0][order] if i >= 0]
        return res


def _copy_memory(mem: SessionMemory | None) -> SessionMemory | None:
    return None if mem is None else SessionMemory.from_state(mem.export_state())


def _is_correct(answer: str, key: str) -> bool:
    return re.sub(r"\D", "", answer)[: len(key)] == key


def _full_answer(stack: Stack, seq: list[int], digits: int) -> str:
    """Greedy answer under plain full attention over the whole sequence."""
    with stock_attention(stack.model), torch.no_grad():
        out = stack.model.hf.generate(torch.tensor([seq]), max_new_tokens=digits + 3, do_sample=False)
    return stack.tokenizer.decode(out[0, len(seq) :])


def passkey_layout(
    stack: Stack, book: list[int], settings: PasskeySettings, length: int
) -> tuple[list[int], int, list[tuple[str, str]], list[int]]:
    """The trials of one length: (haystack tokens, haystack tokens used, (key, needle text) per trial,
    needle depth in tokens per trial, ascending). Trial i reads needle i + hay[depth_i:n_hay] + the
    question, after hay[:depth_i]: `length` tokens in all."""
    c, w = stack.model.config.chunk, stack.model.config.local_window
    rng = random.Random(f"{settings.seed}:{length}")
    offset = rng.randrange(0, len(book) - length)
    hay = book[offset : offset + length]
    needles = [passkey_needle(rng, settings.digits) for _ in range(settings.trials)]
    n_needle = max(len(stack.encode(text)) for _, text in needles)
    n_hay = length - n_needle - len(stack.encode(PASSKEY_QUESTION))
    last_depth = (n_hay - w - c) // c  # in chunks: the needle must end before the last local window
    depths = sorted(rng.randrange(0, last_depth + 1) * c for _ in range(settings.trials))
    return hay, n_hay, needles, depths


def run_passkey(
    stack: Stack, settings: PasskeySettings, on_length: Callable[[list[dict]], None] | None = None
) -> list[dict]:
    """Accuracy per (method, length); on_length(records so far) runs after every length."""
    cfg = stack.model.config
    c, w = cfg.chunk, cfg.local_window
    book = stack.encode_book(settings.book)
    question = stack.encode(PASSKEY_QUESTION)
    overrides = {name: dict(items) for name, items in settings.variants}
    records: list[dict] = []
    for length in settings.lengths:
        hay, n_hay, needles, depths = passkey_layout(stack, book, settings, length)
        trials = list(zip(needles, depths, strict=True))
        methods = [m for m in settings.methods if m != "full" or length <= settings.full_max]
        methods += list(overrides)
        correct = dict.fromkeys(methods, 0)
        found = dict.fromkeys(methods, 0)
        detail: dict[str, list[dict]] = {m: [] for m in methods}
        for method in methods:
            settings_for = {**LAYOUT_METHODS.get(method, {}), **overrides.get(method, {})}
            with stack.model.configured(**settings_for):
                base = stack.reader(with_memory=method not in ("sliding", "full"))
                done = 0
                bar = tqdm(trials, desc=f"passkey {length} {method}", unit="trial")
                for (key, text), depth in bar:
                    seq = stack.encode(text) + hay[depth:n_hay] + question
                    if method == "full":
                        answer = _full_answer(stack, seq, settings.digits)
                        correct["full"] += _is_correct(answer, key)
                        detail["full"].append({"depth": depth, "key": key, "answer": answer})
                        continue
                    base.ingest(hay[done:depth])
                    done = depth
                    memory = None if base.memory is None else _Recording(_copy_memory(base.memory))
                    trial = base.fork(memory, writable=True)
                    split = (len(seq) - len(question) - w) // c * c  # the tail starts on a chunk boundary
                    trial.ingest(seq[:split])
                    trial.read_prompt(seq[split:])  # the last block reads memory found by the question
                    hit = memory is not None and depth // c in memory.last
                    found[method] += hit
                    params = SamplingParams(max_new_tokens=settings.digits + 3)
                    answer = stack.tokenizer.decode(list(trial.generate([], params)))
                    correct[method] += _is_correct(answer, key)
                    row = {"depth": depth, "key": key, "answer": answer}
                    if memory is not None:
                        row["needle_retrieved"] = hit
                    detail[method].append(row)
                    bar.set_postfix(correct=correct[method], needle_retrieved=found[method])
        for method in methods:
            records.append(
                _record(
                    method,
                    length,
                    settings,
                    correct[method],
                    found[method],
                    detail[method],
                    dataclasses.replace(
                        cfg, **{**LAYOUT_METHODS.get(method, {}), **overrides.get(method, {})}
                    ),
                    stack.model.n_layers,
                )
            )
        if on_length is not None:
            on_length(records)
    return records


def _record(
    method: str,
    length: int,
    settings: PasskeySettings,
    correct: int,
    found: int,
    detail: list[dict],
    cfg: MemLongConfig,
    n_layers: int,
) -> dict:
    memory = method not in ("sliding", "full")
    return {
        "method": method,
        "context_tokens": length,
        "trials": settings.trials,
        "correct": correct,
        "accuracy": correct / settings.trials,
        "needle_retrieved": found / settings.trials if memory else None,
        "layout": cfg.layout if memory else "none",
        "local_window": length if method == "full" else cfg.local_window,
        "top_k": cfg.top_k if memory else 0,
        "chunk": cfg.chunk,
        "mem_position": cfg.mem_position if memory else "none",
        "kv_codec": cfg.kv_codec if memory else "none",
        "query": _query_label(cfg, n_layers) if memory else "none",
        "prompt": cfg.prompt_label() if memory else "none",
        "reader": cfg.reading_label() if memory else "none",
        # Per trial, in order of depth: needle depth (tokens), key, the model's answer, and whether the
        # needle's chunk was retrieved for it.
        "per_trial": detail,
    }


def _query_label(cfg: MemLongConfig, n_layers: int) -> str:
    if cfg.retrieval != "text":
        return f"question {cfg.retrieval_label(n_layers)}"
    return (
        f"question text, last {cfg.prompt_query_tokens} tokens"
        if cfg.prompt_query_tokens
        else "question text"
    )


_SAME_RUN = ("book", "trials", "seed", "digits")
# Every setting that changes an accuracy, beside it in the tables.
PASSKEY_COLUMNS = [
    "method",
    "context_tokens",
    "trials",
    "correct",
    "accuracy",
    "needle_retrieved",
    "layout",
    "local_window",
    "top_k",
    "query",
    "mem_position",
    "kv_codec",
    "prompt",
    "reader",
]


def write_passkey(out_dir: Path, settings: PasskeySettings, records: list[dict], extra: dict) -> None:
    """Write this run's rows merged with the compatible rows of an earlier run in out_dir."""
    merged = merge_rows(
        out_dir / "passkey.json",
        out_dir / "passkey_meta.json",
        asdict(settings),
        _SAME_RUN,
        records,
        ("method", "context_tokens"),
    )
    rows = sorted(
        merged,
        key=lambda r: (r["context_tokens"], _METHOD_ORDER.get(r["method"], len(_METHOD_ORDER)), r["method"]),
    )
    write_json(out_dir / "passkey.json", rows)
    meta = {
        "settings": {**asdict(settings), "lengths": sorted({r["context_tokens"] for r in rows})},
        "machine": machine_info(),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_json(out_dir / "passkey_meta.json", {**meta, **extra})
    (out_dir / "passkey.md").write_text(markdown_table(rows, PASSKEY_COLUMNS))
