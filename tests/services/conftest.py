"""The `stack` fixture: ret-mem, a decoder on a tiny random LLaMA and the gateway over loopback gRPC."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.services.stack import Stack, start_stack


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    s = start_stack(tmp_path)
    yield s
    s.stop()
