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

import json
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


VARIANTS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    # per_layer: every layer reads back its own K/V on the base weights (training-free), the reading the
    # trained paper layout is measured against.
    "base": (("full", "sliding", "memlong", "per_layer"), {}),
    "trained": (("sliding", "memlong"), {"memlong": "memlong_trained", "sliding": "sliding_trained"}),
    # The control's LoRA also read with per-layer memory: per-layer memory on weights tuned to the same
    # books, what the trained paper layout competes with once both have seen the training data.
    "control": (
        ("sliding", "per_layer"),
        {"sliding": "lora_no_memory", "per_layer": "lora_no_memory_per_layer"},
    ),
}
_ORDER = [
    "full",
    "sliding",
    "memlong",
    "per_layer",
    "lora_no_memory",
    "lora_no_memory_per_layer",
    "sliding_trained",
    "memlong_trained",
]


def run_train_eval(
    config: MemLongConfig,
    *,
    variant: str,
    adapter: Path | None,
    model_path: str | None,
    plays: tuple[str, ...],
    lengths: tuple[int, ...],
    windows: int,
    score_tokens: int,
    out_dir: Path,
) -> list[dict]:
    """Evaluate one variant (base / trained / control) and write train_eval_parts/<variant>.json, then
    rebuild train_eval.json/.md from every part run with the same settings. Variants can run as separate
    processes (in parallel) and be added later."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; one of {sorted(VARIANTS)}")
    if (variant == "base") != (adapter is None):
        raise ValueError("the base variant takes no adapter; the others need one")
    methods, rename = VARIANTS[variant]
    stack = Stack.load(config, model_path, adapter=str(adapter) if adapter else None)
    records: list[dict] = []
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
    key = {
        "plays": list(plays),
        "lengths": list(lengths),
        "windows": windows,
        "score_tokens": score_tokens,
        "memlong": {**asdict(config), "ret_attn_layers": list(config.ret_attn_layers)},
    }
    adapter_meta = None
    if stack.adapter is not None:
        training = stack.adapter.get("training", {})
        adapter_meta = {
            "path": str(adapter),
            "method": stack.adapter.get("method"),
            "steps": training.get("steps"),
            "tokens_trained": training.get("tokens_trained"),
        }
    part = {
        "variant": variant,
        "settings": key,
        "adapter": adapter_meta,
        "machine": machine_info(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "records": records,
    }
    write_json(out_dir / "train_eval_parts" / f"{variant}.json", part)
    return assemble(out_dir, key)


def assemble(out_dir: Path, key: dict) -> list[dict]:
    """train_eval.json/.md from the parts whose settings equal `key` (the same scored tokens)."""
    key = json.loads(json.dumps(key))  # as a part file reads back (tuples become lists)
    parts = []
    for path in sorted((out_dir / "train_eval_parts").glob("*.json")):
        part = json.loads(path.read_text())
        if part["settings"] == key:
            parts.append(part)
    records = [r for p in parts for r in p["records"]]
    pooled = _pool(records)
    pooled.sort(
        key=lambda r: (r["context_tokens"], _ORDER.index(r["method"]) if r["method"] in _ORDER else 99)
    )
    payload = {
        "meta": {
            **key,
            "variants": {p["variant"]: {"adapter": p["adapter"], "finished": p["finished"]} for p in parts},
        },
        "machine": parts[-1]["machine"] if parts else None,
        "pooled": pooled,
        "per_play": records,
    }
    write_json(out_dir / "train_eval.json", payload)
    cols = ["method", "context_tokens", "scored_tokens", "local_window", "top_k", "chunk", "query", "ppl"]
    (out_dir / "train_eval.md").write_text(
        f"Held-out plays: {', '.join(key['plays'])}; windows per play and length: {key['windows']}; "
        f"the same {key['score_tokens']} scored tokens per window for every method.\n\n"
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
