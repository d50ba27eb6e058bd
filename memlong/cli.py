"""The `memlong` command line."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

from memlong.errors import MemLongError
from memlong.flags import add_model_args, ints, memlong_config, names, set_threads
from memlong.packages import ICL_DATA_DIR

# Sub-command groups contributed by other modules: each exposes register(subparsers).
PLUGINS = (
    "memlong.services.retmem.cli",
    "memlong.services.decoder.cli",
    "memlong.services.gateway.cli",
    "memlong.deploy.cli",
    "memlong.deploy.ray_app.cli",
    "memlong.client_cli",
    "memlong.train_cli",
)


def _variant(text: str) -> tuple[str, tuple[tuple[str, object], ...]]:
    """'memlong_l15:ret_attn_layers=15;top_k=4' -> ('memlong_l15', (('ret_attn_layers', (15,)), ('top_k', 4)))."""
    name, _, spec = text.partition(":")
    items = []
    for part in filter(None, spec.split(";")):
        key, _, value = part.partition("=")
        if key in ("ret_attn_layers", "mem_layers", "key_layers"):
            items.append((key, tuple(int(x) for x in value.split(",") if x)))
        elif key in (
            "top_k",
            "chunk",
            "local_window",
            "mem_layer",
            "key_query_tokens",
            "prompt_query_tokens",
            "prompt_top_k",
        ):
            items.append((key, int(value)))
        elif key == "key_query_center":
            items.append((key, float(value)))
        elif key in ("prompt_window", "prompt_insert", "ingest_memory"):
            items.append((key, value.lower() in ("1", "true", "yes")))
        else:
            items.append((key, value))
    return name, tuple(items)


def _eval_stack(args: argparse.Namespace):
    """(stack, out, meta) for an evaluation: threads set, model and adapter loaded, the results folder
    (--out), what was loaded recorded."""
    from memlong.eval.common import Stack

    set_threads(args)
    config = memlong_config(args)
    stack = Stack.load(config, args.model, args.adapter)
    return (
        stack,
        Path(args.out),
        {"model": stack.source, "adapter": stack.adapter, "memlong": config.__dict__},
    )


def _print_report(path: Path) -> int:
    """Print the report an evaluation wrote; 0, the command's exit status."""
    print(path.read_text())
    return 0


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    from memlong.eval.ppl import PPLSettings, run_ppl, write_ppl

    settings = PPLSettings(
        book=args.book,
        lengths=ints(args.lengths),
        windows=args.windows,
        score_tokens=args.score_tokens,
        methods=names(args.methods),
        full_max=args.full_max,
        variants=tuple(_variant(v) for v in args.variant),
        end=args.end,
    )
    stack, out, meta = _eval_stack(args)
    records, speeds = run_ppl(stack, settings)
    write_ppl(out, settings, records, speeds, meta)
    return _print_report(out / f"ppl_{Path(settings.book).stem}.md")


def cmd_eval_icl(args: argparse.Namespace) -> int:
    from memlong.eval.icl import ICLSettings, run_icl, write_icl

    settings = ICLSettings(
        data_dir=args.data,
        tasks=tuple(args.tasks.split(",")),
        seeds=ints(args.seeds),
        local_demos=args.local_demos,
        memory_demos=args.memory_demos,
        test_examples=args.test_examples,
        methods=tuple(m for m in args.methods.split(",") if m),
    )
    stack, out, meta = _eval_stack(args)
    run_icl(stack, settings, on_task=lambda rows: write_icl(out, settings, rows, meta))
    return _print_report(out / "icl.md")


def cmd_eval_passkey(args: argparse.Namespace) -> int:
    from memlong.eval.passkey import PasskeySettings, run_passkey, write_passkey

    settings = PasskeySettings(
        book=args.book,
        lengths=ints(args.lengths),
        trials=args.trials,
        seed=args.seed,
        methods=names(args.methods),
        variants=tuple(_variant(v) for v in args.variant),
    )
    stack, out, meta = _eval_stack(args)
    run_passkey(stack, settings, on_length=lambda rows: write_passkey(out, settings, rows, meta))
    return _print_report(out / "passkey.md")


def cmd_eval_chapterbreak(args: argparse.Namespace) -> int:
    from memlong.eval.chapterbreak import ChapterBreakSettings, run_chapterbreak, write_chapterbreak

    settings = ChapterBreakSettings(
        book=args.book,
        context=args.context,
        candidate_tokens=args.candidate_tokens,
        distractors=args.distractors,
        cases=args.cases,
        seed=args.seed,
        methods=names(args.methods),
    )
    stack, out, meta = _eval_stack(args)
    run_chapterbreak(
        stack, settings, on_progress=lambda rows, cases: write_chapterbreak(out, settings, rows, meta, cases)
    )
    return _print_report(out / f"chapterbreak_{settings.book}_{settings.context}.md")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memlong", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("eval", help="quality evaluations").add_subparsers(dest="eval", required=True)
    ppl = ev.add_parser("ppl", help="perplexity: full vs sliding vs memlong on the same tokens")
    ppl.add_argument("--book", default="kjv", help="kjv, shakespeare or a path to a UTF-8 text file")
    ppl.add_argument("--lengths", default="4k,8k,16k,32k,64k,128k")
    ppl.add_argument("--windows", type=int, default=4)
    ppl.add_argument("--score-tokens", type=int, default=256, help="scored tokens at the end of each window")
    ppl.add_argument(
        "--methods", default="full,sliding,per_layer,paper", help="full, sliding, per_layer, paper, memlong"
    )
    ppl.add_argument("--full-max", type=int, default=8192, help="longest context for full attention")
    ppl.add_argument(
        "--end",
        type=int,
        default=0,
        help="with --windows 1: the token the window ends at (default: the longest length)",
    )
    ppl.add_argument(
        "--variant",
        action="append",
        default=[],
        help="extra MemLong reading on the same tokens: NAME:ret_attn_layers=15;mem_position=prefix",
    )
    ppl.add_argument("--out", default="bench/results")
    add_model_args(ppl)
    ppl.set_defaults(func=cmd_eval_ppl)

    pk = ev.add_parser("passkey", help="passkey retrieval accuracy")
    pk.add_argument("--book", default="kjv")
    pk.add_argument("--lengths", default="4k,8k,16k,32k,64k")
    pk.add_argument("--trials", type=int, default=20)
    pk.add_argument("--seed", type=int, default=0)
    pk.add_argument("--methods", default="full,sliding,memlong", help="full runs up to 8192 tokens only")
    pk.add_argument("--variant", action="append", default=[], help="as for eval ppl")
    pk.add_argument("--out", default="bench/results")
    add_model_args(pk)
    pk.set_defaults(func=cmd_eval_passkey)

    cb = ev.add_parser(
        "chapterbreak", help="ChapterBreak-style: rank the true next section after a long prefix"
    )
    cb.add_argument("--book", default="shakespeare", help="shakespeare (scenes) or kjv (chapters)")
    cb.add_argument("--context", type=int, default=4096, help="prefix tokens before the section break")
    cb.add_argument("--candidate-tokens", type=int, default=64)
    cb.add_argument("--distractors", type=int, default=5)
    cb.add_argument("--cases", type=int, default=40)
    cb.add_argument("--seed", type=int, default=0)
    cb.add_argument("--methods", default="full,sliding,per_layer")
    cb.add_argument("--out", default="bench/results")
    add_model_args(cb)
    cb.set_defaults(func=cmd_eval_chapterbreak)

    icl = ev.add_parser("icl", help="in-context learning: demonstrations in memory vs none")
    icl.add_argument(
        "--data",
        default=os.environ.get("MEMLONG_ICL_DATA", str(ICL_DATA_DIR)),
        help="folder with sst-2/, mr/, sst-5/, subj/ (default: $MEMLONG_ICL_DATA, else the copy shipped "
        "in the package, memlong/eval/icl_data)",
    )
    icl.add_argument("--tasks", default="sst-2,mr,sst-5,subj")
    icl.add_argument("--seeds", default="0,1,2")
    icl.add_argument("--local-demos", type=int, default=4)
    icl.add_argument("--memory-demos", type=int, default=200)
    icl.add_argument("--test-examples", type=int, default=60)
    icl.add_argument(
        "--methods", default="none,memory", help="none (no memory), memory; one alone to compare readings"
    )
    icl.add_argument("--out", default="bench/results")
    add_model_args(icl)
    icl.set_defaults(func=cmd_eval_icl)

    for name in PLUGINS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue  # that part of the system is not built into this checkout
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except MemLongError as exc:
        print(f"memlong: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"memlong: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
