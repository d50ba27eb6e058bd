"""Perplexity on a long book: full attention vs sliding window vs memory, on the same tokens.

For every context length L and every window end E (several, spread over the book), a window holds
book[E-L : E]. Every method scores the SAME final `score_tokens` of each window:

- full:      one causal forward over the whole window (only where L <= full_max).
- sliding:   the chunk loop with no memory: local window and the text's first tokens as sinks.
- per_layer: the chunk loop with per-layer memory (every layer stores and reads back its own K/V).
- paper:     MemLong's paper layout on the loaded weights (layer `mem_layer`'s K/V read by the
             retrieval layers; needs a trained adapter to help).
- memlong:   the loaded settings as they are (whatever layout the command line chose).

Every method reads the whole window from its first token (the corrected protocol: every layer has its
true sinks and a warm window). Memory depends on what each method retrieved, so nothing is
shared between methods; memory is fresh per window. The paper layout ingests cheaply (layers 0..mem_layer
after the first chunk), then reads the last `local_window` tokens before the scored span with every layer.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from memlong.eval.common import (
    PeakRSS,
    Stack,
    full_attention_logprobs,
    machine_info,
    markdown_table,
    merge_rows,
    plot_lines,
    write_json,
)

METHODS = ("full", "sliding", "per_layer", "paper")
LAYOUT_METHODS = {"per_layer": {"layout": "per_layer"}, "paper": {"layout": "paper", "reader": "stream"}}


@dataclass(frozen=True)
class PPLSettings:
    book: str = "kjv"
    lengths: tuple[int, ...] = (4096, 8192, 16384, 32768, 65536, 131072)
    windows: int = 4
    score_tokens: int = 256
    methods: tuple[str, ...] = METHODS
    full_max: int = 8192
    start: int = 0  # first token of the book region the windows are drawn from
    # With one window: where it ends (0: start + the longest length). Scores the tokens a run with
    # longer lengths scored, e.g. end=131072 reproduces the 8k..128k table's tokens with 8k alone.
    end: int = 0
    # Extra MemLong readings on the same ingest and tokens: (method name, ((setting, value), ...)).
    variants: tuple[tuple[str, tuple[tuple[str, object], ...]], ...] = ()


def window_ends(n_tokens: int, settings: PPLSettings) -> list[int]:
    """Window ends spread evenly over the book so that the longest window fits before the first."""
    first = settings.start + max(settings.lengths)
    if settings.end:
        if settings.windows != 1 or settings.end < first:
            raise ValueError("end needs windows=1 and end >= start + the longest length")
        first = settings.end
    if first > n_tokens:
        raise ValueError(f"book has {n_tokens} tokens; the longest window needs {first}")
    span = n_tokens - first
    return [first + span * i // max(1, settings.windows) for i in range(settings.windows)]


def run_ppl(stack: Stack, settings: PPLSettings, label_suffix: str = "") -> tuple[list[dict], list[dict]]:
    """Returns (ppl records, speed records)."""
    cfg = stack.model.config
    tokens = stack.encode_book(settings.book)
    ends = window_ends(len(tokens), settings)
    w, s = cfg.local_window, settings.score_tokens
    if (w + s) % cfg.chunk or any(length % cfg.chunk for length in settings.lengths):
        raise ValueError("local_window + score_tokens and every length must be multiples of the chunk size")
    nll: dict[tuple[str, int], list[float]] = {}
    speed: dict[tuple[str, int], dict] = {}
    jobs = [(length, end) for length in settings.lengths for end in ends]
    for length, end in tqdm(jobs, desc="ppl windows", unit="window"):
        window = tokens[end - length : end]
        prefix, tail = window[: length - w - s], window[length - w - s :]
        if "full" in settings.methods and length <= settings.full_max:
            with PeakRSS() as rss:
                t0 = time.perf_counter()
                lp = full_attention_logprobs(stack.model, window, s)
                dt = time.perf_counter() - t0
            _add(
                nll,
                speed,
                ("full", length),
                lp,
                {"score_tok_s": length / dt, "peak_rss_mb": rss.peak / 2**20},
            )
        want = [m for m in settings.methods if m != "full"] + [v[0] for v in settings.variants]
        for method in want:
            with PeakRSS() as rss, stack.model.configured(**_overrides(settings, method)):
                r = stack.reader(with_memory=method != "sliding")
                t0 = time.perf_counter()
                r.ingest(prefix)
                ingest_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                lp = r.score(tail)[-s:]
                dt = time.perf_counter() - t0
            run = {
                "ingest_tok_s": len(prefix) / ingest_s if prefix else None,
                "score_tok_s": len(tail) / dt,
                "peak_rss_mb": rss.peak / 2**20,
                "retrievals": r.stats.retrievals,
                "retrieval_s": r.stats.retrieval_s,
            }
            _add(nll, speed, (method, length), lp, run)
    records, speeds = [], []
    for (method, length), values in nll.items():
        with stack.model.configured(**_overrides(settings, method)) as mcfg:
            records.append(
                _record(
                    settings, mcfg, method + label_suffix, length, values, len(ends), stack.model.n_layers
                )
            )
        speeds.append(
            {
                "method": method + label_suffix,
                "context_tokens": length,
                **_mean(speed[(method, length)]["runs"]),
            }
        )
    return records, speeds


def _overrides(settings: PPLSettings, method: str) -> dict:
    return {**LAYOUT_METHODS.get(method, {}), **dict(dict(settings.variants).get(method, ()))}


def _record(
    settings: PPLSettings, cfg, method: str, length: int, values: list[float], n_windows: int, n_layers: int
) -> dict:
    memory = not method.startswith(("full", "sliding"))
    return {
        "book": settings.book,
        "method": method,
        "context_tokens": length,
        "scored_tokens": len(values),
        "windows": n_windows,
        "local_window": length if method.startswith("full") else cfg.local_window,
        "top_k": cfg.top_k if memory else 0,
        "chunk": cfg.chunk,
        "query": (cfg.query if cfg.retrieval == "text" else f"{cfg.query} {cfg.retrieval_label(n_layers)}")
        if memory
        else "none",
        "layout": cfg.layout if memory else "none",
        "memory_layers": _memory_layers(cfg) if memory else "",
        "sink_tokens": cfg.sink_tokens,
        "mem_position": cfg.mem_position if memory else "none",
        "reader": cfg.reading_label() if memory else "none",
        "ppl": math.exp(sum(values) / len(values)),
    }


def _memory_layers(cfg) -> str:
    if cfg.layout == "paper":
        return f"{cfg.mem_layer} -> {','.join(map(str, cfg.ret_attn_layers))}"
    return ",".join(map(str, cfg.mem_layers)) if cfg.mem_layers else "all"


def _add(nll, speed, key, logp: torch.Tensor, stats: dict) -> None:
    if torch.isnan(logp).any():
        raise RuntimeError(f"{key}: unscored tokens in the scored span")
    nll.setdefault(key, []).extend((-logp).tolist())
    speed.setdefault(key, {"runs": []})["runs"].append(stats)


def _mean(runs: list[dict]) -> dict:
    out = {}
    for k in runs[0]:
        vals = [r[k] for r in runs if r[k] is not None]
        out[k] = max(vals) if k == "peak_rss_mb" else (sum(vals) / len(vals) if vals else None)
    return out


_SAME_TOKENS = ("book", "windows", "score_tokens", "start", "max_length")


def _span(settings: PPLSettings) -> int:
    """The longest window the run's windows are placed for: the first window ends at start + this
    (with `end`, the span it implies), so runs that score the same tokens compare equal."""
    return settings.end - settings.start if settings.end else max(settings.lengths)


def write_ppl(
    out_dir: Path, settings: PPLSettings, records: list[dict], speeds: list[dict], extra: dict
) -> None:
    """Files named by book: ppl_<book>.json / .md / .png, ppl_<book>_meta.json, ppl_<book>_timing.*"""
    stem = f"ppl_{Path(settings.book).stem}"
    # Rows of an earlier run on the same tokens (same book, windows, ends, scored span) are kept unless
    # this run redid them with the same settings: a method or a setting can be added to a sweep.
    records = merge_rows(
        out_dir / f"{stem}.json",
        out_dir / f"{stem}_meta.json",
        {**asdict(settings), "max_length": _span(settings)},
        _SAME_TOKENS,
        records,
        ("method", "context_tokens", "layout", "mem_position", "top_k", "memory_layers"),
    )
    meta = {
        "settings": {**asdict(settings), "max_length": _span(settings)},
        "machine": machine_info(),
        **extra,
    }
    write_json(out_dir / f"{stem}.json", records)
    write_json(out_dir / f"{stem}_meta.json", meta)
    # Timings taken while the evaluation runs (machine possibly busy); bench/speed_bench.py measures speed.
    write_json(out_dir / f"{stem}_timing.json", {"meta": meta, "records": speeds})
    (out_dir / f"{stem}.md").write_text(markdown_table(sorted(records, key=_order), ["book", *PPL_COLUMNS]))
    scols = ["method", "context_tokens", "ingest_tok_s", "score_tok_s", "peak_rss_mb"]
    (out_dir / f"{stem}_timing.md").write_text(markdown_table(sorted(speeds, key=_order), scols))
    plot_ppl(out_dir / f"{stem}.png", records)


# Every setting that changes a perplexity, beside it in the tables.
PPL_COLUMNS = [
    "method",
    "context_tokens",
    "scored_tokens",
    "local_window",
    "top_k",
    "chunk",
    "query",
    "layout",
    "memory_layers",
    "sink_tokens",
    "mem_position",
    "reader",
    "ppl",
]


def _order(r: dict) -> tuple:
    return (r["method"], r["context_tokens"])


def plot_ppl(path: Path, records: list[dict]) -> None:
    plot_lines(path, records, "context_tokens", "ppl", "perplexity (same scored tokens)")
