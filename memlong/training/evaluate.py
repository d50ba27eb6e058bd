"""Held-out perplexity of the base model, the lora_no_memory control and the trained MemLong adapter.

Every variant runs `memlong.eval.ppl.run_ppl` on the same held-out plays with the same settings, so all
methods score the same tokens (the last `score_tokens` of each window). Methods:
- full / sliding / memlong: the base model (full attention only up to 8k);
- lora_no_memory: the control adapter, local window only (what it was trained with);
- memlong_trained: the trained adapter with memory; sliding_trained: the same adapter without memory
  (does the adapter's gain come from memory or from the books?).
Results: per play and pooled over plays (token-weighted), in train_eval.json / train_eval.md.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path

from memlong.data import shakespeare_plays
from memlong.eval.common import Stack, machine_info, markdown_table, write_json
from memlong.eval.ppl import PPLSettings, run_ppl
from memlong.model import MemLongConfig
from memlong.weights import default_cache_dir


def _play_file(name: str) -> Path:
    path = default_cache_dir() / "heldout" / f"{name}.txt"
    text = shakespeare_plays()[name]
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return path


def run_train_eval(
    config: MemLongConfig,
    *,
    model_path: str | None,
    trained: Path,
    control: Path | None,
    plays: tuple[str, ...],
    lengths: tuple[int, ...],
    windows: int,
    score_tokens: int,
    out_dir: Path,
) -> list[dict]:
    variants: list[tuple[Path | None, tuple[str, ...], dict[str, str]]] = [
        (None, ("full", "sliding", "memlong"), {}),
        (trained, ("sliding", "memlong"), {"memlong": "memlong_trained", "sliding": "sliding_trained"}),
    ]
    if control is not None:
        variants.append((control, ("sliding",), {"sliding": "lora_no_memory"}))
    records: list[dict] = []
    adapters: dict[str, dict] = {}
    for adapter, methods, rename in variants:
        stack = Stack.load(config, model_path, adapter=str(adapter) if adapter else None)
        if stack.adapter is not None:
            meta = stack.adapter
            adapters[str(adapter)] = {
                "method": meta.get("method"),
                "steps": meta.get("training", {}).get("steps"),
            }
        for play in plays:
            settings = PPLSettings(
                book=str(_play_file(play)),
                lengths=lengths,
                windows=windows,
                score_tokens=score_tokens,
                methods=methods,
                full_max=8192,
            )
            recs, _ = run_ppl(stack, settings)
            for r in recs:
                r["book"] = play
                r["method"] = rename.get(r["method"], r["method"])
                r["adapter"] = str(adapter) if adapter else None
            records.extend(recs)
    pooled = _pool(records)
    payload = {
        "meta": {
            "plays": list(plays),
            "settings": {"lengths": list(lengths), "windows": windows, "score_tokens": score_tokens},
            "memlong": {**asdict(config), "ret_attn_layers": list(config.ret_attn_layers)},
            "adapters": adapters,
            "machine": machine_info(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
        "pooled": pooled,
        "per_play": records,
    }
    write_json(out_dir / "train_eval.json", payload)
    cols = ["method", "context_tokens", "scored_tokens", "local_window", "top_k", "chunk", "query", "ppl"]
    order = ["full", "sliding", "memlong", "lora_no_memory", "sliding_trained", "memlong_trained"]
    pooled.sort(key=lambda r: (r["context_tokens"], order.index(r["method"]) if r["method"] in order else 99))
    (out_dir / "train_eval.md").write_text(
        f"Held-out plays: {', '.join(plays)}; windows per play and length: {windows}; "
        f"the same {score_tokens} scored tokens per window for every method.\n\n"
        + markdown_table(pooled, cols)
    )
    return pooled


def _pool(records: list[dict]) -> list[dict]:
    """Token-weighted perplexity over plays for each (method, context length)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in records:
        groups.setdefault((r["method"], r["context_tokens"]), []).append(r)
    out = []
    for rs in groups.values():
        n = sum(r["scored_tokens"] for r in rs)
        nll = sum(math.log(r["ppl"]) * r["scored_tokens"] for r in rs)
        out.append(
            {
                **{k: v for k, v in rs[0].items() if k not in ("book", "ppl")},
                "scored_tokens": n,
                "ppl": math.exp(nll / n),
            }
        )
    return out
