"""Entry points of single services that start without the whole `memlong` command line (which loads
torch and transformers: seconds of start-up a ret-mem shard or the Ray controller does not need)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def run(register: Callable[[argparse._SubParsersAction], None], argv: list[str] | None = None) -> int:
    """Parse `argv` with the sub-commands that `register` adds and run the chosen one."""
    parser = argparse.ArgumentParser(prog="memlong")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)
