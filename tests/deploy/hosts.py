"""Ret-mem shards on separate "hosts" on one machine: Linux network namespaces when we may create
them (root, `ip netns`), else plain processes on loopback.

Each namespace host gets its own network stack joined to this one by a veth pair (10.213.<i>.1 here,
10.213.<i>.2 there), so a shard listens on its own address and port 50061, exactly as one pod per
node would; traffic crosses a real (virtual) link. A host keeps its address and data directory
across kill/restart, so clients keep their ring.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PORT = 50061


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def netns_available() -> bool:
    """True when this process can create and delete a network namespace."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    name = f"mlprobe{os.getpid()}"
    try:
        _ip("netns", "add", name)
        _ip("netns", "del", name)
        return True
    except (subprocess.SubprocessError, OSError):
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ShardHost:
    """One ret-mem shard process on its own host (namespace) or loopback port."""

    def __init__(
        self, name: str, index: int, data_dir: Path, use_netns: bool, extra: Sequence[str] = ()
    ) -> None:
        self.name, self.index, self.data_dir, self.extra = name, index, data_dir, tuple(extra)
        self.netns = f"ml{os.getpid() % 100000}h{index}" if use_netns else None
        self.proc: subprocess.Popen[str] | None = None
        if self.netns:
            self._create_namespace()
            self.host, self.port = f"10.213.{index}.2", PORT
        else:
            self.host, self.port = "127.0.0.1", _free_port()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _create_namespace(self) -> None:
        ns, here, there = self.netns, f"{self.netns}a", f"{self.netns}b"
        _ip("netns", "add", ns)
        _ip("link", "add", here, "type", "veth", "peer", "name", there)
        _ip("link", "set", there, "netns", ns)
        _ip("addr", "add", f"10.213.{self.index}.1/24", "dev", here)
        _ip("link", "set", here, "up")
        _ip("-n", ns, "addr", "add", f"10.213.{self.index}.2/24", "dev", there)
        _ip("-n", ns, "link", "set", there, "up")
        _ip("-n", ns, "link", "set", "lo", "up")

    def start(self, ring: str) -> None:
        """Start the shard process; returns once it listens (health may still be NOT_SERVING)."""
        cmd = [
            sys.executable, "-m", "memlong.services.retmem", "serve",
            "--host", self.host, "--port", str(self.port),
            "--data-dir", str(self.data_dir), "--shards", self.name, "--all-shards", ring,
            "--drain-s", "0", *self.extra,
        ]  # fmt: skip
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        line = self.proc.stdout.readline()
        if not line.startswith("RETMEM_PORT="):
            self.proc.kill()
            raise RuntimeError(f"shard {self.name} did not start: {line!r}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=60)

    def destroy(self) -> None:
        self.kill()
        if self.netns:
            subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, timeout=30)
            subprocess.run(["ip", "link", "del", f"{self.netns}a"], capture_output=True, timeout=30)


class ShardCluster:
    """N shard hosts forming one ring (`ring` is the --all-shards / client mapping)."""

    def __init__(self, root: Path, n: int, use_netns: bool | None = None, extra: Sequence[str] = ()) -> None:
        self.use_netns = netns_available() if use_netns is None else use_netns
        self.hosts: list[ShardHost] = []
        try:
            for i in range(n):
                self.hosts.append(ShardHost(f"shard{i}", i, root / f"shard{i}", self.use_netns, extra))
        except BaseException:
            self.destroy()
            raise
        self.shards = {h.name: h.address for h in self.hosts}
        self.ring = ",".join(f"{n}={a}" for n, a in self.shards.items())

    def start(self) -> None:
        for h in self.hosts:
            h.start(self.ring)

    def host(self, name: str) -> ShardHost:
        return next(h for h in self.hosts if h.name == name)

    def destroy(self) -> None:
        for h in self.hosts:
            h.destroy()
