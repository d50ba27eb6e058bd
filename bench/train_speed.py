"""Stage-2 training speed: every layer run on each step (before) vs the frozen lower stack read from
its cache (after), on the same tokens, same settings, same steps.

    nice -n 10 .venv/bin/python bench/train_speed.py --threads 1

The packaged SmolLM2-135M in the paper layout at the served reading settings (window 1024, 4 sinks,
chunk 128, top-8, memory layer 15 read by 15/19/23/27), LoRA r16 as `memlong train` attaches it, one
optimiser step per 128-token block. The first Shakespeare training play (seed-0 order) is read from its
start for `--tokens`; tokens/s are counted over the blocks that read memory (after window + chunk),
which is what the rest of a long document costs. One-time costs are measured too: building the lower
stack's cache (layers 0..14 and the retriever, per document) and the per-layer-memory teacher's top-k.
Writes bench/results/train_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens read from the play's start")
    ap.add_argument("--teacher-tokens", type=int, default=2048, help="tokens the teacher is timed on")
    ap.add_argument("--out", default=str(RESULTS / "train_speed"))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from memlong.data import shakespeare_plays
    from memlong.eval.common import Stack, machine_info, markdown_table, write_json
    from memlong.model import MemLongConfig
    from memlong.train import Document, TrainConfig, Trainer
    from memlong.train_cli import shakespeare_split
    from memlong.training.cache import FrozenCache
    from memlong.training.teacher import per_layer_teacher

    mcfg = MemLongConfig(layout="paper")
    stack = Stack.load(mcfg, None)
    name = shakespeare_split(0)[0][0]
    tokens = stack.encode(shakespeare_plays()[name])[: args.tokens + 1]
    c, w = mcfg.chunk, mcfg.local_window
    rows: list[dict] = []

    t0 = time.perf_counter()
    teacher_tokens = tokens[: args.teacher_tokens]
    per_layer_teacher(stack.model, stack.retriever, stack.tokenizer, teacher_tokens, k=16)
    teacher_s = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        cache = FrozenCache(
            stack.model, stack.retriever.embed, stack.tokenizer, Path(tmp), "all-MiniLM-L6-v2"
        )
        t0 = time.perf_counter()
        frozen = cache.get(tokens)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        cache.get(tokens)
        load_s = time.perf_counter() - t0

    state = {n: p.detach().clone() for n, p in stack.model.hf.state_dict().items()}
    for mode in ("every layer (before)", "cached lower stack (after)"):
        stack.model.hf.load_state_dict(state)  # undo the previous mode's LoRA steps (norms trained)
        doc = Document(name, tokens, chunk_emb=frozen.emb.numpy())
        if mode.startswith("cached"):
            doc = Document(name, tokens, frozen=frozen)
        torch.manual_seed(0)
        cfg = TrainConfig(max_steps=10_000, eval_at_start=False, warmup_steps=1)
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer(stack.model, cfg, [doc], [], Path(tmp))
            recs = []
            while (rec := trainer.train_step()) is not None:
                recs.append(rec)
        _unwrap_lora(stack.model)
        timed = [r for r in recs if r["position"] >= w + c]
        seconds = sum(r["tokens"] / r["tok_s"] for r in timed)
        n = sum(r["tokens"] for r in timed)
        rows.append(
            {
                "mode": mode,
                "timed_tokens": n,
                "train_tok_s": n / seconds,
                "first_losses": [round(r["loss"], 4) for r in recs[:3]],
            }
        )
    rows[1]["speedup"] = rows[1]["train_tok_s"] / rows[0]["train_tok_s"]
    once = {
        "lower_cache_build_tok_s": len(tokens) / build_s,
        "lower_cache_load_s": load_s,
        "lower_cache_bytes_per_token": (
            frozen.hidden[0].nbytes + frozen.kv[:, :, 0].nbytes + frozen.emb[0].nbytes / c
        ),
        "per_layer_teacher_tok_s": len(teacher_tokens) / teacher_s,
    }
    payload = {
        "meta": {
            "document": name,
            "tokens_read": len(tokens),
            "timed_from_position": w + c,
            "memlong": mcfg.describe(),
            "lora": "r 16, alpha 32, q/o of layer 15, q/k/v/o of 16..29, norms",
            "step": "one AdamW step per 128-token block",
            "nice": os.nice(0),
            "threads": args.threads,
            "command": "nice -n 10 .venv/bin/python bench/train_speed.py --threads 1",
        },
        "machine": machine_info(),
        "rows": rows,
        "once_per_document": once,
    }
    out = Path(args.out)
    write_json(out.with_suffix(".json"), payload)
    table = markdown_table(
        [{**r, "speedup": r.get("speedup", 1.0)} for r in rows],
        ["mode", "timed_tokens", "train_tok_s", "speedup"],
    )
    once_table = markdown_table([{k: v for k, v in once.items()}], list(once))
    out.with_suffix(".md").write_text(
        f"Stage-2 training speed, {machine_info()['cpu']}, {args.threads} thread(s), nice {os.nice(0)} "
        f"(another job busy on the other core). {mcfg.describe()}. Document: {name}, tokens "
        f"{w + c}..{len(tokens) - 1} timed (blocks that read memory).\n\n{table}\n\n"
        f"Once per document (reused by every later step, epoch and run):\n\n{once_table}\n"
    )
    print(out.with_suffix(".md").read_text())
    return 0


def _unwrap_lora(model) -> None:
    """Remove the injected LoRA modules so the next mode starts from the same base model."""
    from peft.tuners.lora import LoraModel  # noqa: F401  (peft's layers are what we unwrap)

    for name, module in list(model.hf.named_modules()):
        base = getattr(module, "base_layer", None)
        if base is not None and hasattr(module, "lora_A"):
            parent = model.hf.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], base)
    model._hook_k_proj()


if __name__ == "__main__":
    raise SystemExit(main())
