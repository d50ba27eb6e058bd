"""`memlong decoder serve ...`: one decoder replica (loads the model, calls ret-mem).

Prints `DECODER_PORT=<port>` once listening; stops gracefully on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import logging

from memlong.services.common.cli import say, stop_signal

from .config import add_arguments, config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `decoder` command group to a parent CLI."""
    from memlong.flags import add_model_args

    decoder = subparsers.add_parser("decoder", help="the decoder service (owns the model)")
    sub = decoder.add_subparsers(dest="decoder_command", required=True)
    serve = sub.add_parser("serve", help="serve the Decoder API over gRPC")
    add_arguments(serve)
    add_model_args(serve)
    serve.set_defaults(func=serve_command)


def serve_command(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from .server import DecoderServer  # loads torch and transformers: only when serving

    server = DecoderServer.load(config_from_args(args))
    stop = stop_signal()
    say(f"DECODER_PORT={server.start()}")
    stop.wait()
    server.stop()
    return 0
