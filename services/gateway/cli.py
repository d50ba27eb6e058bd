"""`memlong gateway serve`: the public API service (and, with --http-port, the HTTP API beside it)."""

from __future__ import annotations

import argparse
import logging
import os

from memlong.rpc.tls import process_tls
from memlong.services.common.cli import say, stop_signal
from memlong.services.httpapi.config import add_arguments as add_http_arguments
from memlong.services.httpapi.config import config_from_args as http_config

from .config import add_arguments, config_from_args
from .server import GatewayServer


def register(subparsers: argparse._SubParsersAction) -> None:
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


def serve_command(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = config_from_args(args)
    server = GatewayServer(config)
    stop = stop_signal()
    port = server.start()
    say(f"GATEWAY_PORT={port}")
    http = None
    hcfg = http_config(args, config.host, port, args.http_model, config.tls or process_tls())
    if hcfg is not None:
        from memlong.services.httpapi.server import HttpServer
        from memlong.services.httpapi.template import ChatTemplate

        http = HttpServer(hcfg, ChatTemplate.load(args.http_model))
        say(f"HTTP_PORT={http.start()}")
    stop.wait()
    if http is not None:  # the front first: its calls need the gateway to finish
        http.stop()
    server.stop()
    return 0
