"""memlong.atomic: write_atomic (bytes, text or a writer callback; the file's mode; create-if-absent) and
private_dir (owner-only folders, existing ones of ours tightened)."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

from memlong.atomic import private_dir, write_atomic


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("data", [b"\x00\x01bytes", "text é"])
def test_bytes_and_text_are_written_whole_with_no_temp_file_left(tmp_path, data):
    path = tmp_path / "sub" / "f"
    assert write_atomic(path, data, mode=0o600)
    assert path.read_bytes() == (data.encode() if isinstance(data, str) else data)
    assert _mode(path) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["f"]


def test_a_writer_callback_fills_the_file_by_name(tmp_path):
    path = tmp_path / "t.safetensors"
    path.write_bytes(b"old")
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    old_umask = os.umask(0)
    try:
        assert write_atomic(path, lambda tmp: save_file(tensors, str(tmp)), mode=0o600)
    finally:
        os.umask(old_umask)
    assert torch.equal(load_file(str(path))["a"], tensors["a"])
    assert _mode(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_failing_writer_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"old")

    def fail(tmp):
        tmp.write_bytes(b"part")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic(path, fail)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_create_if_absent_keeps_the_first_writers_data(tmp_path):
    path = tmp_path / "f"
    assert write_atomic(path, b"first", replace=False)
    assert not write_atomic(path, b"second", replace=False)
    assert path.read_bytes() == b"first"


def test_private_dir_creates_owner_only_folders_under_a_permissive_umask(tmp_path):
    path = tmp_path / "a" / "b"
    old_umask = os.umask(0)
    try:
        assert private_dir(path) == path
    finally:
        os.umask(old_umask)
    assert _mode(path) == 0o700 and _mode(path.parent) == 0o700


def test_private_dir_tightens_an_existing_wider_folder_of_ours_and_leaves_the_folders_above(tmp_path):
    path = tmp_path / "shared"
    old_umask = os.umask(0)
    try:
        path.mkdir(mode=0o777)
        tmp_path.chmod(0o755)
        assert _mode(path) == 0o777
        private_dir(path)
    finally:
        os.umask(old_umask)
    assert _mode(path) == 0o700
    assert _mode(tmp_path) == 0o755  # not ours to tighten: it existed above the folder asked for


def test_private_dir_leaves_a_folder_owned_by_another_user_as_it_is(tmp_path, monkeypatch):
    path = tmp_path / "theirs"
    path.mkdir()
    path.chmod(0o755)
    monkeypatch.setattr(os, "geteuid", lambda: path.stat().st_uid + 1)
    private_dir(path)
    assert _mode(path) == 0o755
