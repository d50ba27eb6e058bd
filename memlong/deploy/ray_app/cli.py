"""`memlong ray up | down | status`: the application on a local (or given) Ray cluster.

    memlong ray up --data-dir ~/.local/share/memlong/ray --shards 2     # starts Ray if none runs
    memlong ray status
    memlong ray down                                                   # --keep-ray leaves Ray up

`up` prints the gateway address, the HTTP API's URL and the local tenant's API key; a plain gRPC
client (memlong.Client) connects to the first, the `openai` client to the second (+ "/v1"). `down` deletes the application (graceful stop, data kept on disk), then
stops the Ray instance that `up` started.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from memlong.packages import ADAPTERS_DIR
from memlong.services.common.cli import run

from ..installation import default_data_dir, local_api_key
from .config import RayAppConfig

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `ray` command group to a parent CLI."""
    group = subparsers.add_parser("ray", help="run MemLong as a Ray Serve application")
    sub = group.add_subparsers(dest="ray_command", required=True)

    up = sub.add_parser("up", help="start Ray if needed and deploy gateway, decoders and shards")
    up.add_argument(
        "--address", default="auto", help="Ray cluster address; 'auto' starts a local one if none runs"
    )
    up.add_argument("--data-dir", type=Path, default=None, help="default: $MEMLONG_DATA/ray")
    up.add_argument("--host", default="127.0.0.1", help="address the gRPC servers listen on")
    up.add_argument("--shards", type=int, default=2)
    up.add_argument("--decoders", type=int, default=1)
    up.add_argument("--gateway-port", type=int, default=50051)
    up.add_argument("--decoder-port", type=int, default=50071, help="first decoder's port")
    up.add_argument("--retmem-port", type=int, default=50061, help="first shard's port")
    up.add_argument(
        "--http-port", type=int, default=8000, help="the OpenAI-compatible HTTP API (Serve's proxy)"
    )
    up.add_argument("--model", default=None, help="HF checkpoint dir (default: the packaged SmolLM2)")
    up.add_argument(
        "--adapter",
        default=None,
        help="MemLong LoRA adapter dir (from memlong train), readable on every node",
    )
    up.add_argument("--memlong-json", default="", help='MemLongConfig overrides, e.g. {"top_k": 4}')
    up.add_argument("--threads", type=int, default=0, help="torch threads per decoder (0: default)")
    up.add_argument("--components", default=None, help="module:function giving (model, tokenizer, retriever)")
    up.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of a Ray instance started here")
    up.set_defaults(func=up_command)

    down = sub.add_parser("down", help="delete the application; stop the Ray instance")
    down.add_argument("--address", default="auto")
    down.add_argument("--keep-ray", action="store_true", help="leave the Ray instance running")
    down.set_defaults(func=down_command)

    status = sub.add_parser("status", help="addresses and health of the deployed services")
    status.add_argument("--address", default="auto")
    status.set_defaults(func=status_command)


def _ray_cli() -> str:
    exe = Path(sys.executable).with_name("ray")
    return str(exe) if exe.exists() else (shutil.which("ray") or "ray")


# Ray resolves "127.0.0.1" to the machine's interface address unless it runs as a single-node
# instance; this variable (read when ray is imported) is how Ray itself is told so.
SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Serve kills its HTTP proxy when the proxy is not ready within this many seconds (Ray's default: 5),
# which a busy small machine misses; read by the Serve controller from the Ray processes' environment,
# so it holds for a Ray instance this command starts (set it on `ray start` for one started elsewhere).
PROXY_READY_ENV = ("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")


def _stay_local(address: str) -> None:
    """For a local Ray ('auto', or a loopback address) keep every Ray address on 127.0.0.1.

    Must run before ray is imported; a remote cluster's address leaves Ray's own choice alone."""
    host = address.rsplit(":", 1)[0].removeprefix("ray://")
    if address == "auto" or host in ("127.0.0.1", "localhost"):
        if "ray" in sys.modules and os.environ.get(SINGLE_NODE_ENV) != "0":
            log.warning("ray was imported before the loopback setting; its node address may not be 127.0.0.1")
        os.environ.setdefault(SINGLE_NODE_ENV, "0")


def _connect(address: str, num_cpus: int | None = None) -> None:
    """Connect to Ray at `address`; with 'auto' and nothing running, start a local head first (on
    127.0.0.1: node address, GCS and every worker stay on loopback)."""
    _stay_local(address)
    os.environ.setdefault(*PROXY_READY_ENV)
    import ray

    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        return
    except ConnectionError:
        if address != "auto" or num_cpus is None:
            raise
    _start_head(num_cpus)
    ray.init(address="auto", logging_level=logging.WARNING, log_to_driver=False)


# What Ray says when its raylet does not register within the 30 s it waits (a constant in
# ray/_private/node.py); a busy small machine can miss it, and a second start then succeeds.
NODE_STARTUP_TIMEOUT = "timed out during startup"


def _start_head(num_cpus: int) -> None:
    """`ray start --head` on 127.0.0.1; after Ray's node start-up timeout, `ray stop` and once more."""
    start = [
        _ray_cli(),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={num_cpus}",
        "--include-dashboard=false",
        "--disable-usage-stats",
    ]
    for attempt in (1, 2):
        done = subprocess.run(start, capture_output=True, text=True, timeout=300)
        if done.returncode == 0:
            return
        said = done.stdout + done.stderr
        if attempt == 2 or NODE_STARTUP_TIMEOUT not in said:
            raise RuntimeError(f"ray start --head failed (exit {done.returncode}):\n{said.strip()}")
        log.warning("Ray's node start-up timed out; stopping what started and starting once more")
        subprocess.run([_ray_cli(), "stop"], check=False, capture_output=True, timeout=300)


def config_from_args(args: argparse.Namespace) -> RayAppConfig:
    return RayAppConfig(
        data_dir=(args.data_dir or default_data_dir() / "ray").resolve(),
        host=args.host,
        gateway_port=args.gateway_port,
        decoder_port=args.decoder_port,
        retmem_port=args.retmem_port,
        http_port=args.http_port,
        shards=args.shards,
        decoders=args.decoders,
        memlong=_memlong_overrides(args),
        model=args.model,
        adapter=_adapter(args.adapter),
        threads=args.threads,
        components=args.components,
    )


def _adapter(adapter: str | None) -> str | None:
    """An adapter directory as an absolute path (replicas run elsewhere); `default` and the names of
    shipped adapters as given (they resolve inside the installed package)."""
    if adapter is None or adapter == "default" or ("/" not in adapter and (ADAPTERS_DIR / adapter).is_dir()):
        return adapter
    return str(Path(adapter).resolve())


def _memlong_overrides(args: argparse.Namespace) -> dict:
    """MemLongConfig overrides; an adapter is trained for the paper layout, so it is the default there."""
    overrides = json.loads(args.memlong_json) if args.memlong_json else {}
    if args.adapter:
        overrides.setdefault("layout", "paper")
    return overrides


def up_command(args: argparse.Namespace) -> int:
    _stay_local(args.address)
    from .app import deploy

    config = config_from_args(args)
    _connect(args.address, args.num_cpus)
    deploy(config)
    key = local_api_key(config.data_dir)
    sys.stdout.write(
        f"MEMLONG_GATEWAY={config.gateway_address}\nMEMLONG_HTTP={config.http_url}\nMEMLONG_API_KEY={key}\n"
    )
    return 0


def down_command(args: argparse.Namespace) -> int:
    _stay_local(args.address)
    import ray
    from ray import serve

    try:
        _connect(args.address)
    except ConnectionError:
        sys.stdout.write("no Ray instance running\n")
        return 0
    serve.shutdown()  # deletes every application: graceful stop of each replica
    ray.shutdown()
    if not args.keep_ray:
        subprocess.run([_ray_cli(), "stop"], check=False, capture_output=True, timeout=300)
    return 0


def status_command(args: argparse.Namespace) -> int:
    _stay_local(args.address)
    from ray import serve

    _connect(args.address)
    handle = serve.get_app_handle("memlong")
    sys.stdout.write(json.dumps(handle.describe.remote().result(), indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(register, argv)


if __name__ == "__main__":
    sys.exit(main())
