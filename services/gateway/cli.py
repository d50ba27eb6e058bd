"""`memlong up` (the embedded default) and `memlong gateway serve`."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from memlong.rpc.tls import process_tls
from services.httpapi.config import add_arguments as add_http_arguments
from services.httpapi.config import config_from_args as http_config

from .config import add_arguments, config_from_args
from .server import GatewayServer


def register(subparsers: argparse._SubParsersAction) -> None:
    from memlong.flags import add_model_args

    up = subparsers.add_parser("up", help="start ret-mem, decoder and gateway on loopback (embedded default)")
    up.add_argument(
        "--data-dir", type=Path, default=None, help="default: $MEMLONG_DATA or ~/.local/share/memlong"
    )
    up.add_argument("--port", type=int, default=50051, help="gateway port (ret-mem and decoder: free ports)")
    add_http_arguments(up, default_port=8080)
    add_model_args(up)
    up.set_defaults(func=up_command)

    gw = subparsers.add_parser("gateway", help="the public API service")
    sub = gw.add_subparsers(dest="gateway_command", required=True)
    serve = sub.add_parser("serve", help="serve the Gateway API over gRPC (and, with --http-port, HTTP)")
    add_arguments(serve)
    add_http_arguments(serve, default_port=-1, standalone=True)
    serve.add_argument(
        "--http-model",
        default=os.environ.get("MEMLONG_HTTP_MODEL"),
        help="checkpoint dir the decoders serve: its chat template and name (default: the packaged SmolLM2)",
    )
    serve.set_defaults(func=serve_command)


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def up_command(args: argparse.Namespace) -> int:
    from memlong.flags import memlong_config, set_threads

    from .embedded import EmbeddedStack, default_data_dir

    set_threads(args)
    data_dir = args.data_dir or default_data_dir()
    sys.stdout.write("memlong: loading the model and starting ret-mem, decoder, gateway ...\n")
    sys.stdout.flush()
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
    sys.stdout.write(
        f"gateway  {where['gateway']}   (public API)\n"
        f"{http}"
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
    config = config_from_args(args)
    server = GatewayServer(config)
    port = server.start()
    sys.stdout.write(f"GATEWAY_PORT={port}\n")
    http = None
    hcfg = http_config(args, config.host, port, args.http_model, config.tls or process_tls())
    if hcfg is not None:
        from services.httpapi.server import HttpServer
        from services.httpapi.template import ChatTemplate

        http = HttpServer(hcfg, ChatTemplate.load(args.http_model))
        sys.stdout.write(f"HTTP_PORT={http.start()}\n")
    sys.stdout.flush()
    _wait_for_signal()
    if http is not None:  # the front first: its calls need the gateway to finish
        http.stop()
    server.stop()
    return 0
