"""`memlong retmem serve ...` (and `python -m memlong.services.retmem serve ...`).

Prints `RETMEM_PORT=<port>` on stdout once listening (useful with --port 0), recovers, serves until
SIGTERM or SIGINT, then stops gracefully (health first, in-flight calls finish).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from memlong.rpc.internal import token_from_env
from memlong.services.common.cli import run, say, stop_signal

from .routing import parse_addresses
from .server import RetMemConfig, RetMemServer


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `retmem` command group to a parent CLI."""
    retmem = subparsers.add_parser("retmem", help="the ret-mem memory service")
    sub = retmem.add_subparsers(dest="retmem_command", required=True)
    serve = sub.add_parser("serve", help="serve shards over gRPC")
    serve.add_argument("--port", type=int, default=50061, help="0 picks a free port")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--data-dir", type=Path, required=True)
    serve.add_argument("--shards", default="shard0", help="comma-separated shard names hosted here")
    serve.add_argument("--all-shards", default="", help="name=host:port,... of every shard in the ring")
    serve.add_argument("--fsync", choices=("per-append", "grouped"), default="grouped")
    serve.add_argument("--max-message-mb", type=int, default=64)
    serve.add_argument("--checkpoint-mb", type=int, default=1024, help="log bytes between snapshots")
    serve.add_argument("--grace-s", type=float, default=10.0, help="wait for in-flight calls at stop")
    serve.add_argument("--drain-s", type=float, default=1.0, help="NOT_SERVING before the listener closes")
    serve.add_argument(
        "--faiss-gpu",
        type=int,
        default=int(gpu) if (gpu := os.environ.get("MEMLONG_RETMEM_FAISS_GPU")) else None,
        metavar="GPU",
        help="keep the search indexes on this GPU (needs memlong[gpu]; env MEMLONG_RETMEM_FAISS_GPU); default: RAM",
    )
    serve.set_defaults(func=serve_command)


def config_from_args(args: argparse.Namespace) -> RetMemConfig:
    return RetMemConfig(
        internal_token=token_from_env(),
        data_dir=args.data_dir,
        shards=tuple(s for s in args.shards.split(",") if s),
        host=args.host,
        port=args.port,
        all_shards=parse_addresses(args.all_shards),
        fsync=args.fsync,
        max_message_bytes=args.max_message_mb << 20,
        checkpoint_bytes=args.checkpoint_mb << 20,
        grace_s=args.grace_s,
        drain_s=args.drain_s,
        faiss_gpu=args.faiss_gpu,
    )


def serve_command(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    server = RetMemServer(config_from_args(args))
    stop = stop_signal()
    say(f"RETMEM_PORT={server.start(recover_in_background=True)}")
    stop.wait()
    server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(register, argv)
