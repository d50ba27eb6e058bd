"""What every service command shares: parsing a single service's command line without the whole
`memlong` CLI (which loads torch and transformers: seconds of start-up a ret-mem shard or the Ray
controller does not need), and serving until a signal."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable


def run(register: Callable[[argparse._SubParsersAction], None], argv: list[str] | None = None) -> int:
    """Parse `argv` with the sub-commands that `register` adds and run the chosen one."""
    parser = argparse.ArgumentParser(prog="memlong")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def say(text: str) -> None:
    """One line on stdout, flushed (a parent process reads `NAME_PORT=...` lines as they come)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def stop_signal() -> threading.Event:
    """An event that SIGTERM or SIGINT sets (this process's handlers are replaced). Called before the
    port is announced, so that a signal sent as soon as it is known still stops gracefully."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop
