"""Why the local window keeps attention sinks: one KJV span scored four ways (same 512 tokens).

.venv/bin/python bench/sink_check.py   # writes bench/results/sink_check.json
"""

from __future__ import annotations

import dataclasses
import math

import torch

from memlong.eval.common import Stack, full_attention_logprobs, machine_info, write_json
from memlong.model import MemLongConfig

END, SCORED = 400_000, 512


def main() -> None:
    torch.set_num_threads(1)
    stack = Stack.load(MemLongConfig())
    tokens = stack.encode_book("kjv")
    rows = []
    for ctx in (2048, 1536, 1024):
        lp = full_attention_logprobs(stack.model, tokens[END - ctx : END], SCORED)
        rows.append(
            {"method": f"full attention over the last {ctx} tokens", "ppl": math.exp(-lp.mean().item())}
        )
    window = tokens[END - 2048 : END]
    for sinks in (0, 4):
        stack.model.config = dataclasses.replace(stack.model.config, sink_tokens=sinks)
        lp = stack.reader(with_memory=False).score(window)[-SCORED:]
        rows.append(
            {"method": f"sliding window 1024, {sinks} sink tokens", "ppl": math.exp(-lp.mean().item())}
        )
    write_json(
        stack_out(), {"end_token": END, "scored_tokens": SCORED, "rows": rows, "machine": machine_info()}
    )
    for r in rows:
        print(f"{r['ppl']:8.2f}  {r['method']}")


def stack_out():
    from pathlib import Path

    return Path(__file__).resolve().parent / "results" / "sink_check.json"


if __name__ == "__main__":
    main()
