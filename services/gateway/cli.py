"""`memlong up` (the embedded default) and `memlong gateway serve`."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from .config import add_arguments, config_from_args
from .server import GatewayServer


def register(subparsers: argparse._SubParsersAction) -> None:
    from memlong.cli import _model_args

    up = subparsers.add_parser("up", help="start ret-mem, decoder and gateway on loopback (embedded default)")
    up.add_argument(
        "--data-dir", type=Path, default=None, help="default: $MEMLONG_DATA or ~/.local/share/memlong"
    )
    up.add_argument("--port", type=int, default=50051, help="gateway port (ret-mem and decoder: free ports)")
    _model_args(up)
    up.set_defaults(func=up_command)

    gw = subparsers.add_parser("gateway", help="the public API service")
    sub = gw.add_subparsers(dest="gateway_command", required=True)
    serve = sub.add_parser("serve", help="serve the Gateway API over gRPC")
    add_arguments(serve)
    serve.set_defaults(func=serve_command)


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def up_command(args: argparse.Namespace) -> int:
    from memlong.cli import _threads, memlong_config

    from .embedded import EmbeddedStack, default_data_dir

    _threads(args)
    data_dir = args.data_dir or default_data_dir()
    sys.stdout.write("memlong: loading the model and starting ret-mem, decoder, gateway ...\n")
    sys.stdout.flush()
    stack = EmbeddedStack.start(
        data_dir, memlong_config(args), model=args.model, adapter=args.adapter, ports=(0, 0, args.port)
    )
    where = stack.describe()
    key_file = Path(where["data_dir"]) / "api_keys.json"
    sys.stdout.write(
        f"gateway  {where['gateway']}   (public API)\n"
        f"decoder  {where['decoder']}\n"
        f"ret-mem  {where['retmem']}\n"
        f"data     {where['data_dir']}\n"
        f"auth     every call sends metadata 'x-api-key: KEY' (or 'authorization: Bearer KEY');\n"
        f'         the local tenant\'s KEY is in {key_file} (owner-only), under "keys"\n'
        f"python   memlong.Client({where['gateway']!r}, KEY)\n"
        "try: memlong session create --name demo   |   Ctrl-C stops\n"
    )
    sys.stdout.flush()
    _wait_for_signal()
    sys.stdout.write("memlong: stopping ...\n")
    stack.stop()
    return 0


def serve_command(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    server = GatewayServer(config_from_args(args))
    port = server.start()
    sys.stdout.write(f"GATEWAY_PORT={port}\n")
    sys.stdout.flush()
    _wait_for_signal()
    server.stop()
    return 0
