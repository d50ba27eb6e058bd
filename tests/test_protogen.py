"""The committed generated code matches what `python -m memlong.protogen` produces now."""

from pathlib import Path

from memlong.protogen import REPO, generate


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    files = generate(tmp_path)
    assert files, "no proto files found"
    stale = [str(f) for f in files if (tmp_path / f).read_bytes() != (REPO / f).read_bytes()]
    assert not stale, f"stale generated code, run `python -m memlong.protogen`: {stale}"
