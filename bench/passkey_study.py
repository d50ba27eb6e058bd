"""The command line and setup the passkey studies under bench/ share (`passkey_query_study`,
`passkey_read_study`, `passkey_oracle`): the trials are those of `memlong eval passkey`. Scripts import
it as `from passkey_study import study_setup`: a script's own folder is first on sys.path.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from memlong.eval.common import Stack
from memlong.eval.passkey import PasskeySettings
from memlong.flags import ints
from memlong.memory import set_faiss_threads
from memlong.model import MemLongConfig


def study_setup(
    description: str,
    lengths: str,
    out: Path,
    add_args: Callable[[argparse.ArgumentParser], None] | None = None,
) -> tuple[argparse.Namespace, PasskeySettings, Stack]:
    """Parse --book, --lengths, --trials, --seed, --threads (torch and FAISS), --out (a Path) and what
    `add_args` adds; return them, the trials' settings and the stack loaded with the served MemLong
    settings."""
    ap = argparse.ArgumentParser(description=description)
    if add_args is not None:
        add_args(ap)
    ap.add_argument("--book", default="kjv")
    ap.add_argument("--lengths", default=lengths)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=out)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    set_faiss_threads(args.threads)
    settings = PasskeySettings(book=args.book, lengths=ints(args.lengths), trials=args.trials, seed=args.seed)
    return args, settings, Stack.load(MemLongConfig())
