"""An adapter's card: what it was trained on, how, and what it measured, beside the adapter itself.

`write_card(dest, meta, metrics)` writes `CARD.md` and `metrics.jsonl` (the run's log, copied) into the
adapter directory, so an exported or shipped adapter carries its own evidence. Every number on the card
comes from the run's metrics log (held-out evaluations on the same tokens at every point).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _curve(metrics: list[dict]) -> list[dict]:
    """Held-out evaluations in order: (step, tokens trained, loss, perplexity, reading)."""
    rows = []
    for m in metrics:
        for name, reading in (("eval", "as trained"), ("eval_sliding", "no memory (sliding), base")):
            if f"{name}_loss" in m:
                rows.append(
                    {
                        "step": m["step"],
                        "tokens_trained": m.get("tokens_trained", 0),
                        "reading": reading,
                        "loss": m[f"{name}_loss"],
                        "ppl": math.exp(m[f"{name}_loss"]),
                        "eval_tokens": m["eval_tokens"],
                    }
                )
    return rows


def write_card(dest: Path, meta: dict, metrics_path: Path, command: str) -> None:
    """CARD.md + metrics.jsonl in the adapter directory `dest` (adapter.json's metadata as `meta`)."""
    dest.mkdir(parents=True, exist_ok=True)
    metrics = read_metrics(metrics_path)
    if metrics_path.is_file():
        shutil.copyfile(metrics_path, dest / "metrics.jsonl")
    training = meta.get("training", {})
    steps = [m for m in metrics if "tok_s" in m]
    stop = next((m for m in reversed(metrics) if "stopped" in m), {})
    curve = _curve(metrics)
    mem = meta.get("memlong", {})
    lines = [
        f"# {meta.get('method', '?')} adapter ({training.get('preset') or 'custom'} recipe)",
        "",
        f"Base model: {meta.get('base_model_source', '?')} "
        f"(fingerprint {meta.get('base_model', {}).get('fingerprint', '?')}).",
        "",
        "## Data",
        "",
        f"- corpus: {meta.get('corpus', '?')}",
        f"- tokens trained: **{training.get('tokens_trained', 0):,}** in {training.get('steps', 0)} optimiser "
        f"steps, {training.get('max_doc_tokens') or 'all'} tokens per document",
        f"- documents read whole: {', '.join(training.get('documents_done', [])) or 'none'}; "
        f"stopped in: {training.get('document_current') or '-'}",
        f"- held out (never trained on): {', '.join(meta.get('heldout_documents', []))}; evaluated on "
        f"{', '.join(training.get('eval_documents', []))}, tokens {mem.get('local_window', 0) + mem.get('chunk', 0)}"
        f"..{training.get('eval_tokens')} of each (the tokens that can have memory)",
        "",
        "## Settings",
        "",
        f"- reading: layout {mem.get('layout')}, mem_layer {mem.get('mem_layer')}, retrieval layers "
        f"{mem.get('ret_attn_layers')}, chunk {mem.get('chunk')}, top-k {mem.get('top_k')}, local window "
        f"{mem.get('local_window')}, {mem.get('sink_tokens')} sinks, query {mem.get('query')}, memory keys at "
        f"{mem.get('mem_position')}, kv {mem.get('kv_dtype')}",
        f"- LoRA r {meta.get('r')}, alpha {meta.get('alpha')}, {len(meta.get('lora_targets', []))} modules, "
        f"{len(meta.get('norms', []))} norms",
        f"- optimiser: AdamW lr {training.get('lr')}, warmup {training.get('warmup_steps')}, cosine to "
        f"{training.get('min_lr_ratio')} x, {training.get('accum_blocks')} blocks of "
        f"{training.get('block_chunks', 1) * mem.get('chunk', 0)} tokens per step, clip {training.get('grad_clip')}",
        "- distillation: "
        + (
            f"teacher {training.get('teacher')} top-{training.get('teacher_k')}, KL weight {training.get('kd_weight')}"
            if training.get("kd_weight")
            else "none (LM loss only)"
        ),
        f"- lower stack (layers 0..{mem.get('mem_layer', 0) - 1}) read from its cache: "
        f"{training.get('lower_cache', False)}; device {training.get('device')}, bf16 {training.get('bf16')}",
        f"- budget: max_steps {training.get('max_steps')}, max_minutes {training.get('max_minutes')}; "
        f"stopped by: {stop.get('stopped', '?')}; {training.get('train_seconds', 0):.0f} s of steps"
        + (
            f", {sum(m['tokens'] for m in steps) / sum(m['tokens'] / m['tok_s'] for m in steps):.1f} tok/s"
            if steps
            else ""
        ),
        f"- machine: {json.dumps(meta.get('machine', {}))}",
        "",
        "## Results (held-out loss, same tokens at every point)",
        "",
        "| step | tokens trained | reading | loss | perplexity |",
        "|---|---|---|---|---|",
        *[
            f"| {r['step']} | {r['tokens_trained']:,} | {r['reading']} | {r['loss']:.4f} | {r['ppl']:.3f} |"
            for r in curve
        ],
        "",
        "## Reproduce",
        "",
        "```",
        command,
        "```",
        "",
    ]
    (dest / "CARD.md").write_text("\n".join(lines))
