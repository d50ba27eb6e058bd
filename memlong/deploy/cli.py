"""`memlong up`: the embedded default (ret-mem, decoder, gateway and the HTTP API on loopback)."""

from __future__ import annotations

import argparse
from pathlib import Path

from memlong.flags import add_model_args, memlong_config, set_threads
from memlong.services.common.cli import say, stop_signal
from memlong.services.httpapi.config import add_arguments as add_http_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    up = subparsers.add_parser("up", help="start ret-mem, decoder and gateway on loopback (embedded default)")
    up.add_argument(
        "--data-dir", type=Path, default=None, help="default: $MEMLONG_DATA or ~/.local/share/memlong"
    )
    up.add_argument("--port", type=int, default=50051, help="gateway port (ret-mem and decoder: free ports)")
    add_http_arguments(up, default_port=8080)
    add_model_args(up)
    up.set_defaults(func=up_command)


def up_command(args: argparse.Namespace) -> int:
    from .stack import EmbeddedStack, default_data_dir

    set_threads(args)
    data_dir = args.data_dir or default_data_dir()
    say("memlong: loading the model and starting ret-mem, decoder, gateway ...")
    stop = stop_signal()
    stack = EmbeddedStack.start(
        data_dir,
        memlong_config(args),
        model=args.model,
        adapter=args.adapter,
        ports=(0, 0, args.port),
        http_port=args.http_port if args.http_port >= 0 else None,
    )
    where = stack.describe()
    key_file = Path(where["data_dir"]) / "api_keys.json"
    http = (
        f"http     {where['http']}/v1   (OpenAI-compatible API: header 'Authorization: Bearer KEY')\n"
        if "http" in where
        else ""
    )
    say(
        f"gateway  {where['gateway']}   (public API)\n"
        f"{http}"
        f"decoder  {where['decoder']}\n"
        f"ret-mem  {where['retmem']}\n"
        f"data     {where['data_dir']}\n"
        f"auth     every call sends metadata 'x-api-key: KEY' (or 'authorization: Bearer KEY');\n"
        f'         the local tenant\'s KEY is in {key_file} (owner-only), under "keys"\n'
        f"python   memlong.Client({where['gateway']!r}, KEY)\n"
        "try: memlong session create --name demo   |   Ctrl-C stops"
    )
    stop.wait()
    say("memlong: stopping ...")
    stack.stop()
    return 0
