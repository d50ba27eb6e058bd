"""Atomic file writes: temp file in the same directory -> fsync -> rename -> fsync(directory).

A reader sees the old file or the new one, never a part; after return the new one survives a crash.
`private_dir` makes the folders such files live in owner-only.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def private_dir(path: Path) -> Path:
    """Create directory `path`, and every missing folder above it, owner-only (0700: neither the names
    in it nor its files reachable by other local users). When `path` exists already and we own it, its
    group and other permissions are removed; one owned by another user is left as it is (chmod would
    fail), and so are existing folders above it (/tmp, a shared volume's root)."""
    path = Path(path)
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for p in reversed(missing):
        p.mkdir(mode=0o700, exist_ok=True)
    path.mkdir(mode=0o700, exist_ok=True)  # exists now; raises if `path` is a file
    st = path.stat()
    if st.st_uid == os.geteuid() and st.st_mode & 0o077:
        os.chmod(path, stat.S_IMODE(st.st_mode) & ~0o077)
    return path


def write_atomic(
    path: Path, data: bytes | str | Callable[[Path], object], *, mode: int = 0o644, replace: bool = True
) -> bool:
    """Write `data` to `path` atomically and durably, the file created with `mode` (e.g. 0o600 for
    secrets: never readable by others, not even as the temp file).

    `data`: the bytes (a str is written as UTF-8), or a writer called with the temp file's path that
    fills that (already created, empty) file, for libraries that write by file name (safetensors'
    `save_file`) without first building the whole file in memory.

    replace=False: create only if absent (the first of several concurrent writers wins; the others'
    data is dropped). Returns whether this call's data is now the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")  # unique per writer
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        if callable(data):
            os.close(fd)
            data(tmp)
            fd = os.open(tmp, os.O_RDONLY)  # the file as the writer left it
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
            written = True
        else:
            try:
                os.link(tmp, path)  # atomic create-if-absent
                written = True
            except FileExistsError:
                written = False
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return written
