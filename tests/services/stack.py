"""The serving path for tests: ret-mem, a decoder on a tiny random LLaMA and the gateway, all over
real gRPC on loopback ports. Every server records the deadline of every call it serves
(tests/services/test_deadlines.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch

from memlong.client import Client
from memlong.model import MemLongConfig
from memlong.rpc import metrics
from memlong.rpc.channel import close_channels
from memlong.services.common.server import ServerOptions, Service, create_server
from memlong.services.decoder.config import DecoderConfig
from memlong.services.decoder.server import DecoderServer
from memlong.services.gateway.config import GatewayConfig, Quotas, parse_keys
from memlong.services.gateway.server import GatewayServer
from memlong.services.retmem.routing import Placement
from memlong.services.retmem.server import SERVICE_NAME as RETMEM_SERVICE
from memlong.services.retmem.server import RetMemServicer, add_servicer
from memlong.services.retmem.shard import Shard
from memlong.services.retmem.shm import SegmentTable, default_dir
from tests.factories import RecordingRetriever, TinyTokenizer, tiny_memlong

torch.set_num_threads(1)

KEYS = {"key-a": "tenant-a", "key-b": "tenant-b"}


class ByteTokenizer(TinyTokenizer):
    """encode: one token per UTF-8 byte (mod the tiny vocabulary); decode: ids as text (TinyTokenizer)."""

    eos_token_id = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [b % 97 for b in text.encode()]


@dataclass
class CallLog:
    """(server, method, seconds remaining at arrival or None) of every call a server saw; for calls with
    a deadline also (server, method, earliest, latest) bounds of that deadline on `time.monotonic()`.

    Remaining times of calls that arrive at different moments do not show whether a deadline was passed
    on with a margin or unchanged (time passes between the hops either way); the absolute deadlines do.
    """

    calls: list[tuple[str, str, float | None]] = field(default_factory=list)
    deadlines: list[tuple[str, str, float, float]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def clear(self) -> None:
        with self.lock:
            self.calls.clear()
            self.deadlines.clear()

    def interceptor(self, server: str) -> grpc.ServerInterceptor:
        log = self

        class Record(grpc.ServerInterceptor):
            def intercept_service(self, continuation, details):
                handler = continuation(details)
                if handler is None or "grpc.health" in details.method or "reflection" in details.method:
                    return handler
                method = details.method

                def record(context):
                    # The deadline is remaining + the moment gRPC read its clock, which lies between these.
                    before = time.monotonic()
                    remaining = context.time_remaining()
                    after = time.monotonic()
                    with log.lock:
                        log.calls.append((server, method, remaining))
                        if remaining is not None:
                            log.deadlines.append((server, method, before + remaining, after + remaining))

                from memlong.services.gateway.interceptors import _wrap

                return _wrap(handler, _around(record))

        return Record()


def _around(before: Callable[[grpc.ServicerContext], None]) -> Callable[[Callable, bool], Callable]:
    """Decorator factory: run `before(context)` at the start of the call, then the behavior."""

    def decorate(behavior: Callable, streams: bool) -> Callable:
        if streams:

            def stream(request, context):
                before(context)
                yield from behavior(request, context)

            return stream

        def unary(request, context):
            before(context)
            return behavior(request, context)

        return unary

    return decorate


def tiny_model():
    # chunk 4, window 8, top-k 2; 4 layers, memory layer 1, retrieval layers (1, 3); float32 K/V
    return tiny_memlong(chunk=4, window=8, top_k=2)


class RetMem:
    """A ret-mem shard served on a fixed loopback port; stop() and start() again to simulate outages."""

    def __init__(self, data_dir: Path, log: CallLog) -> None:
        self.data_dir, self.log, self.port = data_dir, log, 0
        self.start()

    def start(self) -> None:
        self.shard = Shard("shard0", self.data_dir)
        self.shard.open()
        # Shared memory on, as a ret-mem process has it: the decoder (loopback) moves K/V through it.
        segments = SegmentTable(default_dir())
        servicer = RetMemServicer({"shard0": self.shard}, Placement(["shard0"]), segments=segments)
        metrics.observe_memory(servicer)
        self.servicer = servicer
        options = ServerOptions(interceptors=(self.log.interceptor("retmem"),))
        services = [Service(RETMEM_SERVICE, add_servicer, servicer)]
        self.server, self.port = create_server(f"127.0.0.1:{self.port}", services, options)

    def stop(self) -> None:
        self.server.stop(0).wait()
        metrics.unobserve_memory(self.servicer)
        self.shard.close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class Stack:
    retmem: RetMem
    decoder: DecoderServer
    gateway: GatewayServer
    log: CallLog
    model: object
    retriever: RecordingRetriever
    tokenizer: ByteTokenizer

    def client(self, key: str = "key-a", timeout_s: float = 30.0) -> Client:
        return Client(self.gateway.address(), key, timeout_s=timeout_s)

    def stop(self) -> None:
        """Stop the three services and drop this process's cached channels to them.

        A cached channel outlives its server: when a later test's server is given the same port, the
        channel may still be in reconnect backoff and fail that test's first call as UNAVAILABLE.
        """
        addresses = [self.gateway.address(), self.decoder.address(), self.retmem.address]
        self.gateway.stop(0)
        self.decoder.stop(0)
        self.retmem.stop()
        close_channels(addresses)


def start_stack(
    tmp_path: Path, *, retriever=None, quotas: Quotas | None = None, max_inflight: int = 4
) -> Stack:
    log = CallLog()
    retmem = RetMem(tmp_path / "retmem", log)
    model, tokenizer = tiny_model(), ByteTokenizer()
    retriever = retriever or RecordingRetriever()
    dcfg = DecoderConfig(
        retmem={"shard0": retmem.address},
        memlong=model.config,
        max_inflight=max_inflight,
        ingest_progress_tokens=64,
        retmem_timeout_s=5.0,
    )
    decoder = DecoderServer.from_components(model, tokenizer, retriever, dcfg)
    decoder.start((log.interceptor("decoder"),))
    gcfg = GatewayConfig(
        decoders={"decoder0": decoder.address()},
        retmem={"shard0": retmem.address},
        key_hashes=parse_keys(",".join(f"{k}={t}" for k, t in KEYS.items())),
        data_dir=tmp_path / "gateway",
        quotas=quotas or Quotas(),
        default_timeout_s=60.0,
    )
    gateway = GatewayServer(gcfg)
    gateway.start((log.interceptor("gateway"),))
    return Stack(retmem, decoder, gateway, log, model, retriever, tokenizer)


def until(condition, timeout_s: float = 60.0) -> bool:
    """Wait for `condition()` on a condition variable's clock, not a fixed sleep; False at timeout."""
    done = threading.Event()
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        done.wait(0.01)
    return True


class Paced:
    """Counts the steps a wrapped generator takes and holds each one until the test lets it go on."""

    def __init__(self) -> None:
        self.steps = 0
        self.go = threading.Semaphore(0)

    def wrap(self, real):
        pace = self

        def generate(reader, *args, **kw):
            for token in real(reader, *args, **kw):
                pace.steps += 1
                pace.go.acquire(timeout=5)
                yield token

        return generate


__all__ = ["ByteTokenizer", "CallLog", "MemLongConfig", "Paced", "Stack", "start_stack", "until"]
