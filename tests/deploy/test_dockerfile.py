"""The container build file, checked offline (no Docker engine here): every COPY source exists and is
not ignored, torch is pinned as in pyproject, the image runs as a non-root user, exposes the ports
the manifests use, and its entry point is the project's own CLI."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import tomllib

from .test_manifests import GRPC_PORTS, HEALTH_PORT, HTTP_PORT

REPO = Path(__file__).resolve().parents[2]


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def ignored(path: str) -> bool:
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path.split("/")[0], p) for p in patterns)


def final_stage() -> list[tuple[str, str]]:
    ops = instructions()
    last_from = max(i for i, (op, _) in enumerate(ops) if op == "FROM")
    return ops[last_from:]


def test_copy_sources_exist_and_are_not_ignored() -> None:
    copies = [rest for op, rest in instructions() if op == "COPY" and "--from=" not in rest]
    assert copies
    for rest in copies:
        *sources, _dest = rest.split()
        for src in sources:
            assert (REPO / src).exists(), f"COPY {src}: not in the repository"
            assert not ignored(src), f"COPY {src}: excluded by .dockerignore"


def test_dockerignore_keeps_local_state_and_secrets_out() -> None:
    for path in (".venv", ".git", "data", "memlong.egg-info", "tls.key", "ca/server.pem"):
        assert ignored(path), path
    for path in ("memlong", "services", "proto", "pyproject.toml"):
        assert not ignored(path), path


def test_torch_pin_matches_pyproject() -> None:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d for d in deps if d.startswith("torch")]
    runs = " ".join(rest for op, rest in instructions() if op == "RUN")
    assert pin in runs


def test_runtime_stage_is_non_root_with_the_cli_entrypoint_and_ports() -> None:
    stage = final_stage()
    users = [rest for op, rest in stage if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    (entry,) = [rest for op, rest in stage if op == "ENTRYPOINT"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert entry == '["memlong"]' and "memlong" in scripts
    exposed = {int(p) for op, rest in stage if op == "EXPOSE" for p in rest.split()}
    assert exposed >= {*GRPC_PORTS.values(), HEALTH_PORT, HTTP_PORT}
    assert not any(op == "ADD" for op, _ in instructions()), "ADD can fetch URLs; use COPY"
