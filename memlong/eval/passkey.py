"""Passkey retrieval: a random key planted at a random depth of a book haystack, asked for at the end.

Every trial of a context length uses the same haystack (a book slice) with the key planted at its own
random, chunk-aligned depth, always before the last local window (so a local-window-only reader cannot
see it). Trials are read in order of depth by one base reader that ingests the haystack prefix once; each
trial forks it (local state and memory copied), ingests the needle and the rest, then reads the last
local window plus the question with every layer and generates greedily. `sliding` forks the same state
without memory, so both methods see the same tokens.
"""

from __future__ import annotations

import dataclasses
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from memlong.chunkloop import Reader, SamplingParams
from memlong.data import PASSKEY_QUESTION, passkey_needle
from memlong.eval.common import Stack, machine_info, markdown_table, write_json
from memlong.memory import SessionMemory


@dataclass(frozen=True)
class PasskeySettings:
    book: str = "kjv"
    lengths: tuple[int, ...] = (4096, 8192, 16384, 32768, 65536)
    trials: int = 20
    seed: int = 0
    methods: tuple[str, ...] = ("sliding", "memlong")
    digits: int = 5
    # Extra MemLong readings on the same trials: (method name, ((setting, value), ...)).
    variants: tuple[tuple[str, tuple[tuple[str, object], ...]], ...] = ()


def _copy_memory(mem: SessionMemory | None) -> SessionMemory | None:
    return None if mem is None else SessionMemory.from_state(mem.export_state())


def run_passkey(stack: Stack, settings: PasskeySettings) -> list[dict]:
    cfg = stack.model.config
    c, w = cfg.chunk, cfg.local_window
    book = stack.encode_book(settings.book)
    question = stack.encode(PASSKEY_QUESTION)
    records = []
    for length in settings.lengths:
        rng = random.Random(f"{settings.seed}:{length}")
        offset = rng.randrange(0, len(book) - length)
        hay = book[offset : offset + length]
        needles = [passkey_needle(rng, settings.digits) for _ in range(settings.trials)]
        n_needle = max(len(stack.encode(text)) for _, text in needles)
        # Haystack tokens kept so that needle + haystack + question is `length` tokens.
        n_hay = length - n_needle - len(question)
        last_depth = (n_hay - w - c) // c  # in chunks: the needle must end before the last local window
        depths = sorted(rng.randrange(0, last_depth + 1) * c for _ in range(settings.trials))
        methods = list(settings.methods) + [name for name, _ in settings.variants]
        overrides = {name: dict(items) for name, items in settings.variants}
        correct = {m: 0 for m in methods}
        base = stack.reader(with_memory=methods != ["sliding"])
        done = 0
        for (key, text), depth in tqdm(
            list(zip(needles, depths, strict=True)), desc=f"passkey {length}", unit="trial"
        ):
            base.ingest(hay[done:depth])
            done = depth
            seq = stack.encode(text) + hay[depth:n_hay] + question
            trial = base.fork(_copy_memory(base.memory))
            split = (len(seq) - len(question) - w) // c * c  # the tail starts on a chunk boundary
            trial.ingest(seq[:split])
            for method in methods:
                # Forks share the trial's memory: chunks added while reading the tail are identical replays.
                reader: Reader = trial.fork(None if method == "sliding" else trial.memory)
                with stack.model.configured(**overrides.get(method, {})):
                    out = list(
                        reader.generate(seq[split:], SamplingParams(max_new_tokens=settings.digits + 3))
                    )
                answer = stack.tokenizer.decode(out)
                correct[method] += int(re.sub(r"\D", "", answer)[: settings.digits] == key)
        for method in methods:
            mcfg = dataclasses.replace(cfg, **overrides.get(method, {}))
            records.append(
                {
                    "method": method,
                    "context_tokens": length,
                    "trials": settings.trials,
                    "correct": correct[method],
                    "accuracy": correct[method] / settings.trials,
                    "local_window": w,
                    "top_k": mcfg.top_k if method != "sliding" else 0,
                    "chunk": c,
                    "query": mcfg.query if method != "sliding" else "none",
                    "mem_position": mcfg.mem_position if method != "sliding" else "none",
                    "ret_attn_layers": list(mcfg.ret_attn_layers) if method != "sliding" else [],
                }
            )
    return records


def write_passkey(out_dir: Path, settings: PasskeySettings, records: list[dict], extra: dict) -> None:
    write_json(out_dir / "passkey.json", records)
    write_json(
        out_dir / "passkey_meta.json",
        {
            "settings": asdict(settings),
            "machine": machine_info(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **extra,
        },
    )
    cols = ["method", "context_tokens", "trials", "correct", "accuracy", "local_window", "top_k", "query"]
    (out_dir / "passkey.md").write_text(markdown_table(records, cols))
