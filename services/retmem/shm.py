"""Same-host transport: K/V move through shared-memory segments, the calls stay on gRPC.

A client whose ret-mem address is on its own host (loopback, `localhost`, this host's name, a `unix:`
socket) creates segments, files in the shared-memory directory (/dev/shm), and names a region of one
in its requests: an Append's K/V are copied once into the region and the server writes them from there
to its data files (`Chunk.kv_region`); a retrieval's K/V are read by the server from its data files
straight into the region (`SearchRequest.reply_region`), each checked against the CRC-32 it was stored
with as it is read (`records_checked`; a client checks them itself when a server does not say so), and
the client hands the records on as a view of the region. One
`Attach` call per server first proves that the server sees the client's segments (same host, same
/dev/shm, same user); when it does not, or the setting is off, or the address is remote, the K/V stay
in the gRPC messages. Which transport each call used, and the K/V bytes it moved, are counted in the
metrics (`memlong.retmem.transport.*`) and in `RetMemClient.transport_stats`.

Security.
- Other local users: a segment is created with O_CREAT | O_EXCL | O_NOFOLLOW and mode 0600 under a
  name with 128 random bits, so no other user can open it, and a name planted in the shared directory
  beforehand (or a symlink) makes the create fail instead of being used. The server opens a segment only
  if its name has this exact form, without following links, and only if the file is a regular file
  owned by the server's own user with no group or other permission bits; anything else is refused. A
  client and a server running as different users therefore never share memory (Attach fails and the
  K/V go over gRPC).
- Tenants: a segment belongs to one client process (a decoder), which serves many sessions. Segment
  names are made by the client library, travel only to ret-mem (on the internal, token-checked and
  optionally TLS channel) and never come from, or go back to, a caller of the gateway; so no tenant can
  name a segment, let alone another session's. Inside the client a region is leased to one call at a
  time: a retrieval's records are a view of its own region only (never of stale bytes around it), the
  lease lasts as long as any view of those records exists (a `ctypes` buffer the views keep alive), and
  only then can the region serve another call, another session's included. A call that fails or times
  out (so the server might still be using the region) never returns its segment to the pool: the
  segment is unlinked and dropped.
- Integrity: the server checks an Append's K/V against the CRC-32 the client computed before writing
  them, and every retrieved record against the CRC-32 it was stored with as it reads it into the
  region (while it is in the cache; an older server leaves that to the client, which then checks them
  itself). Between that check and the client's use only the call's lease can write the region. A torn,
  short or overwritten region is therefore an error (INVALID_ARGUMENT on append, DATA_LOSS on
  retrieval), never wrong data, and a damaged segment is dropped. A segment shorter than the region named is refused
  before it is touched (a truncated mapping would fault).

Segments are named `memlong-kv-<pid>-<32 hex digits>`; a client unlinks its own at exit, and removes
those of processes of its user that are no longer running when it creates its first one.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import mmap
import os
import queue
import re
import secrets
import socket
import stat
import threading
import weakref
from collections import OrderedDict
from pathlib import Path

import numpy as np

from memlong.api.retmem.v1 import retmem_pb2 as pb
from memlong.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)

PREFIX = "memlong-kv-"
NAME = re.compile(r"memlong-kv-(\d{1,10})-[0-9a-f]{32}")
DEFAULT_DIR = Path("/dev/shm")
MIN_SEGMENT = 1 << 20
NONCE_BYTES = 16
ENV_SWITCH = "MEMLONG_RETMEM_SHARED_MEMORY"  # "0", "off", "false", "no": never use shared memory


def enabled_by_env() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "off", "false", "no")


def default_dir() -> Path | None:
    """/dev/shm when this host has one (Linux); None: no same-host transport."""
    return DEFAULT_DIR if DEFAULT_DIR.is_dir() and os.access(DEFAULT_DIR, os.W_OK | os.X_OK) else None


def is_local_address(target: str) -> bool:
    """Whether a gRPC target names this host: a unix socket, loopback, localhost or this host's name.
    Only a hint: `Attach` proves it before any K/V move this way."""
    t = target.strip()
    if t.startswith(("unix:", "unix-abstract:")):
        return True
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if t.startswith(scheme):
            t = t[len(scheme) :]
            break
    if t.startswith("["):  # [v6]:port
        host = t[1 : t.find("]")] if "]" in t else t[1:]
    elif t.count(":") == 1:
        host = t.split(":", 1)[0]
    else:
        host = t  # a bare v6 address or a name without port
    host = host.lower()
    if host in ("localhost", "ip6-localhost", "ip6-loopback") or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:  # a name: this host's own (no DNS lookup here)
        return host == socket.gethostname().lower()
    return ip.is_loopback or ip.is_unspecified


# ------------------------------------------------------------------------------------- client side


class Segment:
    """A shared-memory file this process created and owns (O_EXCL, 0600), mapped read-write."""

    def __init__(self, directory: Path, size: int) -> None:
        self.name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(16)}"
        self.path = Path(directory) / self.name
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask did
            # Reserve the pages now: a write into a tmpfs file past its free space would fault
            # (SIGBUS) later; here it is an OSError (ENOSPC) the caller falls back from.
            os.posix_fallocate(fd, 0, size)
            self.map = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        os.close(fd)  # the mapping keeps the memory; the name stays for the server to open
        self.size = size
        # The name goes when the segment is dropped, at the latest at exit.
        self._unlink = weakref.finalize(self, _unlink_quietly, str(self.path))

    def unlink(self) -> None:
        self._unlink()


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class Lease:
    """A region of a segment leased to one call. `array` is a writable uint8 view of it; every view
    made from `array` keeps the lease alive (the ctypes buffer underneath is their base), and the
    region goes back to the pool only when the last one is gone, unless `discard` was called."""

    def __init__(self, pool: SegmentPool, segment: Segment, nbytes: int) -> None:
        self.segment, self.nbytes, self.offset = segment, nbytes, 0
        buf = (ctypes.c_ubyte * max(nbytes, 1)).from_buffer(segment.map, 0)
        self.array = np.frombuffer(memoryview(buf), np.uint8, count=nbytes)  # (nbytes,)
        self._state = {"discard": False}
        weakref.finalize(buf, pool._returned, segment, self._state)

    def region(self, offset: int = 0, length: int | None = None) -> pb.SharedRegion:
        n = self.nbytes - offset if length is None else length
        return pb.SharedRegion(segment=self.segment.name, offset=self.offset + offset, length=n)

    def discard(self) -> None:
        """Never reuse this segment (the server may still touch it, or it was found damaged)."""
        self._state["discard"] = True
        self.segment.unlink()


class SegmentPool:
    """Segments of one client, each leased to one call at a time and reused after (mapping pages
    costs more than copying them: a fresh 24 MiB region would fault in 6,000 pages per call)."""

    def __init__(self, directory: Path, max_idle_bytes: int = 512 << 20) -> None:
        self.directory = Path(directory)
        self.max_idle_bytes = max_idle_bytes
        self._lock = threading.Lock()
        self._free: list[Segment] = []
        # Segments whose lease ended: put by finalizers (any thread, any moment, even inside `lease`),
        # so through a queue that is safe there, and taken into `_free` by `lease`.
        self._returns: queue.SimpleQueue[Segment] = queue.SimpleQueue()
        self._all: weakref.WeakSet[Segment] = weakref.WeakSet()
        self._swept = False

    def lease(self, nbytes: int) -> Lease:
        with self._lock:
            self._take_returns()
            fits = [s for s in self._free if s.size >= nbytes]
            if fits:
                seg = min(fits, key=lambda s: s.size)
                self._free.remove(seg)
            else:
                seg = None
        if seg is None:
            if not self._swept:
                self._swept = True
                sweep(self.directory)
            size = max(MIN_SEGMENT, 1 << (max(nbytes, 1) - 1).bit_length())
            seg = Segment(self.directory, size)
            self._all.add(seg)
        return Lease(self, seg, nbytes)

    def _returned(self, segment: Segment, state: dict) -> None:
        """The last view of a lease is gone (a finalizer: any thread; takes no lock)."""
        if not state["discard"]:
            self._returns.put(segment)

    def _take_returns(self) -> None:
        """Move returned segments to the free list, keeping at most max_idle_bytes of them (under
        the lock)."""
        while True:
            try:
                self._free.append(self._returns.get_nowait())
            except queue.Empty:
                break
        self._free.sort(key=lambda s: s.size)
        idle = sum(s.size for s in self._free)
        while idle > self.max_idle_bytes and self._free:
            big = self._free.pop()  # drop the largest first
            idle -= big.size
            big.unlink()

    def close(self) -> None:
        """Unlink every segment of this pool (mappings stay valid until dropped)."""
        with self._lock:
            self._take_returns()
            self._free.clear()
            for seg in list(self._all):
                seg.unlink()


def sweep(directory: Path) -> int:
    """Remove segments of this user whose creating process is gone (left by a crash)."""
    removed, uid = 0, os.geteuid()
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for e in entries:
        m = NAME.fullmatch(e.name)
        if not m or int(m.group(1)) == os.getpid():
            continue
        try:
            if e.stat(follow_symlinks=False).st_uid != uid or _alive(int(m.group(1))):
                continue
            os.unlink(e.path)
            removed += 1
        except OSError:
            continue
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------------------------- server side


class _Mapped:
    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size = fd, size
        self.map = mmap.mmap(fd, size) if size else None

    def close(self) -> None:
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:  # a view still in use: the mapping goes when it does
                pass
        os.close(self.fd)


class SegmentTable:
    """The server's open segments: name -> mapping, opened on first use and checked on every use.

    Only names of the form `memlong-kv-<pid>-<hex>` in `directory` are opened, never through a link,
    and only regular files owned by this process's user with no group or other permissions; a region
    must lie inside the file as it is now. At most `max_open` mappings are kept (least recently used
    dropped first)."""

    def __init__(self, directory: Path | None, max_open: int = 64) -> None:
        self.directory = None if directory is None else Path(directory)
        self.max_open = max_open
        self._lock = threading.Lock()
        self._open: OrderedDict[str, _Mapped] = OrderedDict()

    def _refuse(self, why: str) -> FailedPrecondition:
        return FailedPrecondition(f"shared segment: {why}")

    def _check(self, fd: int) -> os.stat_result:
        """The file as it is now: a regular file of this user, owner-only (checked on every use)."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise self._refuse("not a private file of this server's user")
        return st

    def _get(self, name: str) -> tuple[_Mapped, os.stat_result]:
        if self.directory is None:
            raise self._refuse("shared memory is off on this server")
        if not NAME.fullmatch(name):
            raise InvalidArgument("segment", "not a segment name")
        with self._lock:
            entry = self._open.get(name)
            if entry is not None:
                self._open.move_to_end(name)
        if entry is not None:
            return entry, self._check(entry.fd)
        flags = os.O_RDWR | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.directory / name, flags)
        except OSError as e:
            raise self._refuse(f"cannot open it here ({e.strerror})") from None
        try:
            st = self._check(fd)
            entry = _Mapped(fd, st.st_size)
        except BaseException:
            os.close(fd)
            raise
        with self._lock:
            old = self._open.pop(name, None)
            self._open[name] = entry
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)[1].close()
        if old is not None:
            old.close()
        return entry, st

    def nonce(self, name: str, nbytes: int) -> bytes:
        """The first nbytes of a segment (Attach), read through the file, not the mapping."""
        entry, _ = self._get(name)
        return os.pread(entry.fd, nbytes, 0)

    def view(self, region: pb.SharedRegion, nbytes: int, field: str) -> np.ndarray:
        """A writable uint8 view of the first `nbytes` of a region (checked to lie in the file)."""
        if region.length < nbytes:
            raise InvalidArgument(f"{field}.length", f"{region.length} bytes, {nbytes} needed")
        entry, st = self._get(region.segment)
        end = region.offset + nbytes
        if end > st.st_size:  # the file as it is now: a region past its end would fault
            raise InvalidArgument(
                field, f"region [{region.offset}, {end}) past the segment's {st.st_size} bytes"
            )
        if end > entry.size:  # grew since it was mapped: map it again
            with self._lock:
                if self._open.get(region.segment) is entry:
                    del self._open[region.segment]
            entry.close()
            entry, st = self._get(region.segment)
            if end > entry.size:
                raise InvalidArgument(field, "region past the segment's end")
        if entry.map is None:  # an empty segment: only an empty region fits, and it needs no mapping
            return np.empty(0, np.uint8)
        return np.frombuffer(entry.map, np.uint8, count=nbytes, offset=region.offset)

    def close(self) -> None:
        with self._lock:
            entries, self._open = list(self._open.values()), OrderedDict()
        for e in entries:
            e.close()
