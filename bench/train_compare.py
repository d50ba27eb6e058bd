"""Held-out curves of stage-2 training runs side by side, from their metrics logs.

    .venv/bin/python bench/train_compare.py --runs memlong=/tmp/ev17/memlong,control=/tmp/ev17/control \
        --out bench/results/train_short

Every run must have evaluated the same held-out tokens (the same eval documents and eval_tokens, checked
through eval_tokens); rows are (run, tokens trained, held-out loss, perplexity), plus the base model read
without memory (sliding) where a run logged it. Writes OUT.json, OUT.md and OUT.png (the curves).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", required=True, help="name=run_dir,... (each with metrics.jsonl)")
    ap.add_argument("--out", required=True, help="output path without suffix")
    args = ap.parse_args()

    from memlong.eval.common import markdown_table, plot_lines, write_json
    from memlong.training.card import read_metrics

    rows, runs, scored = [], {}, set()
    for item in args.runs.split(","):
        name, path = item.split("=", 1)
        metrics = read_metrics(Path(path) / "metrics.jsonl")
        meta_path = Path(path) / "adapter" / "adapter.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        training = meta.get("training", {})
        runs[name] = {
            "dir": path,
            "method": meta.get("method"),
            "steps": training.get("steps"),
            "tokens_trained": training.get("tokens_trained"),
            "kd_weight": training.get("kd_weight"),
            "teacher": meta.get("training_recipe", {}).get("teacher"),
            "train_seconds": training.get("train_seconds"),
        }
        for m in metrics:
            for key, reading in (("eval", name), ("eval_sliding", "sliding (base, no memory)")):
                if f"{key}_loss" in m:
                    scored.add(m["eval_tokens"])
                    rows.append(
                        {
                            "run": reading,
                            "tokens_trained": m.get("tokens_trained", 0),
                            "loss": m[f"{key}_loss"],
                            "ppl": math.exp(m[f"{key}_loss"]),
                            "scored_tokens": m["eval_tokens"],
                        }
                    )
    if len(scored) != 1:
        raise SystemExit(f"runs scored different held-out tokens: {sorted(scored)}")
    seen, unique = set(), []
    for r in rows:  # the sliding baseline is logged by every memory run: keep it once
        key = (r["run"], r["tokens_trained"], round(r["loss"], 9))
        if key not in seen:
            seen.add(key)
            unique.append(r)
    unique.sort(key=lambda r: (r["tokens_trained"], r["run"]))
    out = Path(args.out)
    write_json(out.with_suffix(".json"), {"runs": runs, "rows": unique})
    out.with_suffix(".md").write_text(
        f"Held-out loss of stage-2 runs on the same {scored.pop()} scored tokens "
        f"(`bench/train_compare.py --runs {args.runs}`).\n\n"
        + markdown_table(unique, ["run", "tokens_trained", "loss", "ppl"])
    )
    plot_lines(
        out.with_suffix(".png"), unique, "tokens_trained", "ppl", "held-out perplexity", "run", log_x=False
    )
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
