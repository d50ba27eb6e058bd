"""The Ray Serve application: one deployment per ret-mem shard, per decoder replica, and the gateway.

    app = build_app(RayAppConfig(data_dir=Path("/var/lib/memlong"), shards=2))
    deploy(config)        # gRPC clients call the gateway's port; HTTP clients Serve's proxy

Each replica hosts the service's own gRPC server (the same code as the embedded default and
Kubernetes), so routing, deadlines, TLS and tracing behave identically; Serve supplies placement,
health checking and restarts. The gateway deployment is the application's HTTP ingress: Serve's
proxy hands HTTP requests to the OpenAI-compatible API (services/httpapi), which calls the replica's
own gRPC gateway, as it does beside `memlong up`. A shard's data lives in `<data_dir>/retmem/<shard>`: when Serve replaces
a failed replica, the new one recovers from the same write-ahead log and snapshots, so an acknowledged
append survives the restart. A single-node Ray (this machine) keeps every address stable; on several
nodes pin each shard to its node (custom resources) so its address and disk stay with it.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ray import serve

from memlong.rpc.channel import ChannelOptions, get_channel
from memlong.rpc.internal import installation_token

from .config import RayAppConfig

log = logging.getLogger(__name__)

# Replicas wait on gRPC and the model, not on Ray's CPU accounting: reserve none, so a small
# machine can host the whole application (the decoder's torch threads are set by `threads`).
ACTOR_OPTIONS = {"num_cpus": 0}


def _check_serving(address: str, service: str) -> None:
    """Raise unless the gRPC health service at `address` says SERVING (Serve then restarts us)."""
    stub = health_pb2_grpc.HealthStub(get_channel(address, ChannelOptions()))
    try:
        status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
    except grpc.RpcError as err:
        raise RuntimeError(f"{address}: health check failed: {err.code().name}") from err
    if status != health_pb2.HealthCheckResponse.SERVING:
        raise RuntimeError(f"{address}: {service} is not serving")


class _Replica:
    """What every replica shares: `server` (a started gRPC server), its `address` and `service` name.
    Serve's health check asks the server's own health service; a replica going away stops it."""

    server: Any = None
    address: str
    service: str

    def check_health(self) -> None:
        _check_serving(self.address, self.service)

    def __del__(self) -> None:
        if self.server is not None:
            self.server.stop(grace_s=5)


@serve.deployment(ray_actor_options=ACTOR_OPTIONS, health_check_period_s=5, graceful_shutdown_timeout_s=30)
class RetMemShard(_Replica):
    """One ret-mem shard, its data on the node's disk."""

    def __init__(self, config_json: str, index: int) -> None:
        from memlong.services.retmem.server import SERVICE_NAME

        from ..stack import start_retmem

        config = RayAppConfig.from_json(config_json)
        name = f"shard{index}"
        self.service = SERVICE_NAME
        self.server = start_retmem(  # recovers before the replica reports ready
            config.data_dir / "retmem" / name,
            shards=(name,),
            all_shards=config.ring,
            host=config.host,
            port=config.retmem_ports[index],
            internal_token=installation_token(config.data_dir),
        )
        self.address = self.server.address()

    def describe(self) -> dict[str, Any]:
        return {"address": self.address, "recovery": {k: str(v) for k, v in self.server.recovery.items()}}


@serve.deployment(ray_actor_options=ACTOR_OPTIONS, health_check_period_s=10, graceful_shutdown_timeout_s=30)
class DecoderReplica(_Replica):
    """One decoder (model) replica; retrieves from the shards over gRPC."""

    def __init__(self, config_json: str, index: int) -> None:
        from memlong.config import MemLongConfig
        from memlong.services.decoder.server import SERVICE_NAME

        from ..stack import start_decoder

        config = RayAppConfig.from_json(config_json)
        self.server = start_decoder(
            MemLongConfig.from_dict(config.memlong),
            config.ring,
            host=config.host,
            port=config.decoder_ports[index],
            internal_token=installation_token(config.data_dir),
            model=config.model,
            adapter=config.adapter,
            threads=config.threads,
            components=config.components,
        )
        self.service, self.address = SERVICE_NAME, self.server.address()

    def describe(self) -> dict[str, Any]:
        return {"address": self.address}


@serve.deployment(ray_actor_options=ACTOR_OPTIONS, health_check_period_s=5, graceful_shutdown_timeout_s=30)
@serve.ingress()  # the ASGI app comes from __serve_build_asgi_app__, once the gRPC gateway listens
class Gateway(_Replica):
    """The public gRPC API, and the application's HTTP ingress (the OpenAI-compatible API in front of
    it). Holds handles to the other deployments."""

    def __init__(self, config_json: str, decoders: list[Any], shards: list[Any]) -> None:
        from memlong.services.gateway.server import SERVICE_NAME

        from ..installation import key_hashes
        from ..stack import start_gateway

        config = RayAppConfig.from_json(config_json)
        given = ",".join(f"{k}={t}" for k, t in config.api_keys)
        self.server = start_gateway(
            config.data_dir / "gateway",
            config.decoder_addresses,
            config.ring,
            host=config.host,
            port=config.gateway_port,
            internal_token=installation_token(config.data_dir),
            keys=key_hashes(config.data_dir, given, local=not given),  # the local key file by default
        )
        self.service, self.address = SERVICE_NAME, self.server.address()
        self.decoders, self.shards = decoders, shards
        self.config = config

    def __serve_build_asgi_app__(self) -> Any:
        """The HTTP API over this replica's gateway; chat through the served model's template (none
        for test components, whose tokenizer has none: /v1/completions only)."""
        from memlong.services.httpapi.app import create_app
        from memlong.services.httpapi.config import HttpConfig, model_id_for
        from memlong.services.httpapi.template import ChatTemplate

        template = None if self.config.components else ChatTemplate.load(self.config.model)
        http = HttpConfig(gateway=self.address, model_id=model_id_for(self.config.model))
        return create_app(http, template)

    async def describe(self) -> dict[str, Any]:
        """Addresses of every service (the `memlong ray status` answer)."""
        return {
            "gateway": self.address,
            "http": self.config.http_url,
            "decoders": [await d.describe.remote() for d in self.decoders],
            "shards": [await s.describe.remote() for s in self.shards],
        }


def build_app(config: RayAppConfig) -> Any:
    """The bound application: gateway (ingress) -> decoder deployments -> shard deployments."""
    text = config.to_json()
    shards = [RetMemShard.options(name=f"retmem-shard{i}").bind(text, i) for i in range(config.shards)]
    decoders = [DecoderReplica.options(name=f"decoder{i}").bind(text, i) for i in range(config.decoders)]
    return Gateway.options(name="gateway").bind(text, decoders, shards)


def deploy(config: RayAppConfig, blocking: bool = False) -> Any:
    """Run the application on the connected Ray cluster, its HTTP API behind Serve's proxy on the head
    node (config.host:config.http_port); returns the ingress handle."""
    serve.start(proxy_location="HeadOnly", http_options={"host": config.host, "port": config.http_port})
    return serve.run(build_app(config), name=config.app_name, route_prefix="/", blocking=blocking)


def undeploy(app_name: str = "memlong") -> None:
    """Delete the application (replicas stop gracefully: health first, then drain)."""
    serve.delete(app_name)
