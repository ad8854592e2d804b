"""The crash model: storage with a volatile cache that a power loss drops, and hooks that stop
the product at its named fault points (`vscsi.durable.faults`).

A SIGKILL test only shows what the page cache happened to keep; with these fakes the test
decides what reached the medium, so it can crash at *every* step and check the invariants.

Storage (both thread-safe, both modelled at 512-byte sectors, which a power loss never tears):

- `CrashableFile`: a `LogFile` for the write-intent log (``WriteIntentLog(..., file=f)``).
  pwrite lands in a volatile cache, fdatasync makes the cache durable.
- `CrashableVolume`: a `vscsi.store.base.Volume`. Writes land in a volatile write cache; a FUA
  write, a write with `write_cache` False, and flush() make them durable. Any request can be
  made to fail with EIO (`MediumError`) by `fail()`.

`power_loss(rng=None)` returns a fresh object holding only what is durable, to reopen with;
`restart()` one holding everything, cache included (the process ended, the power stayed on).
Given an `rng`, every sector that was written but not yet durable (cached, or part of a write
or flush caught by the crash) independently did or did not reach the medium: torn writes. A
failed fdatasync / flush loses its cache (as Linux does after a writeback error): those sectors
still read back, are never made durable by a later sync, and may only survive a power loss torn.

Fault points the fakes themselves pass, so that no I/O happens after a crash:
``<name>.pwrite`` and ``<name>.fdatasync`` (files, default name "file"), ``<name>.write``
(before the data reaches the cache), ``<name>.write.cached`` (a FUA or write-through write is
cached, not yet durable) and ``<name>.flush`` (volumes, named by their `name`).

Hooks (install with ``faults.installed(hook)``):

- `Recorder` lists the fault points a run passes, in order;
- `CrashAt(k)` raises `Crash` at the k-th point passed (optionally counting only one name) and
  at every point after it from any thread: the process is dead.

`fault_points(run)` and `run_crashing(run, k)` wrap those for the usual exhaustive loop::

    n = len(fault_points(lambda: scenario(make_fakes())))
    for k in range(n):
        fakes = make_fakes()
        run_crashing(lambda: scenario(fakes), k)
        reopened = [f.power_loss(random.Random(k)) for f in fakes]
        check(reopened)

`Crash` derives from BaseException, so product code that handles Exception, OSError or
VolumeError does not swallow it; `finally` blocks still run, but their I/O hits a fault point and
raises again.
"""

from __future__ import annotations

import contextlib
import errno
import random
import threading
from collections.abc import Callable, Sequence

from vscsi.durable import faults
from vscsi.durable.faults import Crash, fault_point
from vscsi.store.base import Extent, MediumError
from vscsi.tracker.wil import WriteIntentLog

SECTOR = 512


class _Sectors:
    """Durable bytes under a cache of whole sectors; the part both fakes share."""

    def __init__(self, durable: bytes | bytearray) -> None:
        self.durable = bytearray(durable)
        self.cache: dict[int, bytes] = {}  # written, not yet durable
        self.lost: dict[int, bytes] = {}  # its sync failed: reads back, never made durable

    def sector(self, i: int) -> bytes:
        got = self.cache.get(i)
        if got is None:
            got = self.lost.get(i)
        if got is None:
            got = bytes(self.durable[i * SECTOR : (i + 1) * SECTOR]).ljust(SECTOR, b"\0")
        return got

    def read(self, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        first, last = offset // SECTOR, (offset + length - 1) // SECTOR
        raw = b"".join(self.sector(i) for i in range(first, last + 1))
        start = offset - first * SECTOR
        return raw[start : start + length]

    def write(self, offset: int, data: bytes) -> list[int]:
        """Put `data` in the cache; returns the sectors it touched."""
        touched = []
        pos = 0
        while pos < len(data):
            i, within = divmod(offset + pos, SECTOR)
            n = min(SECTOR - within, len(data) - pos)
            old = self.sector(i)
            self.cache[i] = old[:within] + data[pos : pos + n] + old[within + n :]
            self.lost.pop(i, None)
            touched.append(i)
            pos += n
        return touched

    def persist(self, sectors: Sequence[int]) -> None:
        for i in sectors:
            content = self.cache.pop(i, None)
            if content is None:
                content = self.lost.pop(i)
            end = (i + 1) * SECTOR
            if len(self.durable) < end:
                self.durable.extend(bytes(end - len(self.durable)))
            self.durable[i * SECTOR : end] = content

    def sync(self) -> None:
        self.persist(sorted(self.cache))

    def fail_sync(self) -> None:
        self.lost.update(self.cache)
        self.cache.clear()

    def survivors(self, rng: random.Random | None) -> tuple[bytearray, int]:
        """The durable bytes after a power loss (with torn sectors when `rng` is given), and
        the end of the last sector that survived torn (0 if none)."""
        copy = _Sectors(self.durable)
        copy.cache = dict(self.cache)
        copy.lost = dict(self.lost)
        kept: list[int] = []
        if rng is not None:
            pending = sorted(set(copy.cache) | set(copy.lost))
            kept = [i for i in pending if rng.random() < 0.5]
            copy.persist(kept)
        return copy.durable, max(kept, default=-1) * SECTOR + SECTOR


class CrashableFile:
    """A `LogFile` (pread/pwrite/fdatasync/close) whose writes are volatile until fdatasync."""

    def __init__(self, durable: bytes = b"", name: str = "file") -> None:
        self.name = name
        self._s = _Sectors(durable)
        self._size = self._durable_size = len(durable)
        self._failing: set[str] = set()
        self._lock = threading.Lock()
        self.closed = False

    def fail(self, op: str) -> None:
        """Make every later `op` ("pread", "pwrite" or "fdatasync") fail with EIO."""
        if op not in ("pread", "pwrite", "fdatasync"):
            raise ValueError(f"unknown file operation {op!r}")
        self._failing.add(op)

    def heal(self) -> None:
        self._failing.clear()

    def _check(self, op: str) -> None:
        if self.closed:
            raise OSError(errno.EBADF, f"{self.name}: closed")
        if op in self._failing:
            raise OSError(errno.EIO, f"{self.name}: {op} failed")

    def pread(self, length: int, offset: int) -> bytes:
        with self._lock:
            self._check("pread")
            return self._s.read(offset, max(min(length, self._size - offset), 0))

    def pwrite(self, data: bytes, offset: int) -> None:
        fault_point(f"{self.name}.pwrite")
        with self._lock:
            self._check("pwrite")
            self._s.write(offset, bytes(data))
            self._size = max(self._size, offset + len(data))

    def fdatasync(self) -> None:
        fault_point(f"{self.name}.fdatasync")
        with self._lock:
            if "fdatasync" in self._failing and not self.closed:
                self._s.fail_sync()
            self._check("fdatasync")
            self._s.sync()
            self._durable_size = self._size

    def close(self) -> None:
        self.closed = True

    def durable(self) -> bytes:
        """What a power loss right now keeps (nothing torn)."""
        with self._lock:
            return bytes(self._s.durable[: self._durable_size])

    def restart(self) -> CrashableFile:
        """The file as the next process opens it after this one exited without a power loss:
        what was cached is still there (the cache is the kernel's), nothing fails."""
        with self._lock:
            f = CrashableFile(bytes(self._s.durable[: self._durable_size]), self.name)
            f._s.cache, f._s.lost = dict(self._s.cache), dict(self._s.lost)
            f._size = self._size
            return f

    def power_loss(self, rng: random.Random | None = None) -> CrashableFile:
        """The file as the next boot finds it; with `rng`, unsynced sectors survive at random."""
        with self._lock:
            kept, torn_end = self._s.survivors(rng)
            size = max(self._durable_size, min(torn_end, self._size))
            return CrashableFile(bytes(kept[:size]), self.name)


class CrashableVolume:
    """A thick (fully mapped) `Volume` with a volatile write cache and injectable EIO."""

    def __init__(
        self,
        size: int = 1 << 20,
        block_size: int = 512,
        *,
        name: str = "vol",
        write_cache: bool = True,
        durable: bytes | None = None,
    ) -> None:
        if size % block_size or block_size % SECTOR:
            raise ValueError(f"size {size} and block size {block_size} must be sector multiples")
        self.name = name
        self.block_size = block_size
        self.write_cache = write_cache
        self._size = size
        self._s = _Sectors(bytes(size) if durable is None else durable)
        self._failing: dict[str, list[tuple[int | None, int]]] = {}
        self._lock = threading.Lock()
        self.closed = False
        self.writes = 0
        self.flushes = 0

    # -- the crash model --------------------------------------------------------------------

    def fail(self, op: str, offset: int | None = None, err: int = errno.EIO) -> None:
        """Make later `op` requests ("read", "write", "flush") fail with MediumError: all of
        them, or (for reads and writes) those covering byte `offset`, until `heal()`."""
        if op not in ("read", "write", "flush"):
            raise ValueError(f"unknown volume operation {op!r}")
        self._failing.setdefault(op, []).append((offset, err))

    def heal(self) -> None:
        self._failing.clear()

    def durable(self) -> bytes:
        """What a power loss right now keeps (nothing torn)."""
        with self._lock:
            return bytes(self._s.durable)

    def read(self, offset: int, length: int) -> bytes:
        """The current contents (cache included), for checks."""
        with self._lock:
            return self._s.read(offset, length)

    def restart(self) -> CrashableVolume:
        """The volume as the next process opens it after this one exited without a power
        loss: its write cache (the device's) still holds what it held; no injected errors."""
        with self._lock:
            v = CrashableVolume(
                self._size,
                self.block_size,
                name=self.name,
                write_cache=self.write_cache,
                durable=bytes(self._s.durable),
            )
            v._s.cache, v._s.lost = dict(self._s.cache), dict(self._s.lost)
            return v

    def power_loss(self, rng: random.Random | None = None) -> CrashableVolume:
        """The volume as the next boot finds it; with `rng`, unflushed sectors survive at
        random (each sector whole)."""
        with self._lock:
            kept, _ = self._s.survivors(rng)
        return CrashableVolume(
            self._size,
            self.block_size,
            name=self.name,
            write_cache=self.write_cache,
            durable=bytes(kept),
        )

    def _check(self, op: str, offset: int, length: int) -> None:
        if self.closed:
            raise MediumError(op, offset, length, errno.EBADF)
        if offset < 0 or length < 0 or offset + length > self._size:
            raise ValueError(f"{self.name}: {op} beyond the volume: {offset}+{length}")
        for at, err in self._failing.get(op, ()):
            if at is None or offset <= at < offset + length:
                raise MediumError(op, offset if at is None else at, length, err)

    # -- Volume ---------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def supports_unmap(self) -> bool:
        return False

    @property
    def read_only(self) -> bool:
        return False

    def check_ready(self) -> None:
        pass

    def readinto(self, offset: int, bufs: Sequence[memoryview]) -> None:
        total = sum(len(b) for b in bufs)
        with self._lock:
            self._check("read", offset, total)
            data = self._s.read(offset, total)
        pos = 0
        for b in bufs:
            b[:] = data[pos : pos + len(b)]
            pos += len(b)

    def write(self, offset: int, bufs: Sequence[memoryview], fua: bool = False) -> None:
        data = b"".join(bytes(b) for b in bufs)
        fault_point(f"{self.name}.write")
        with self._lock:
            self._check("write", offset, len(data))
            touched = self._s.write(offset, data)
            self.writes += 1
        if fua or not self.write_cache:
            fault_point(f"{self.name}.write.cached")
            with self._lock:
                self._s.persist([i for i in touched if i in self._s.cache])

    def flush(self) -> None:
        fault_point(f"{self.name}.flush")
        with self._lock:
            if self._failing.get("flush") and not self.closed:
                self._s.fail_sync()
            self._check("flush", 0, 0)
            self._s.sync()
            self.flushes += 1

    def unmap(self, offset: int, length: int) -> None:
        """Not thick-provisioned away: reads zeroes afterwards, like a cached zero write."""
        self.write(offset, [memoryview(bytes(length))])

    def extent_at(self, offset: int) -> Extent:
        return Extent(offset, self._size - offset, True)

    def close(self) -> None:
        self.closed = True


class Recorder:
    """A hook that lists every fault point passed, in order."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, name: str) -> None:
        with self._lock:
            self.names.append(name)


class CrashAt:
    """A hook that crashes at the k-th fault point passed (counting only `name` if given), and
    at every fault point after that: nothing the dead process does reaches storage."""

    def __init__(self, k: int, name: str | None = None) -> None:
        self.k = k
        self.name = name
        self.fired: str | None = None
        self._seen = 0
        self._lock = threading.Lock()

    def __call__(self, name: str) -> None:
        with self._lock:
            if self.fired is not None:
                raise Crash(f"dead since {self.fired}")
            if self.name is not None and name != self.name:
                return
            if self._seen == self.k:
                self.fired = name
                raise Crash(name)
            self._seen += 1


def fault_points(run: Callable[[], object]) -> list[str]:
    """The fault points `run` passes, in order, running it once without a crash."""
    rec = Recorder()
    with faults.installed(rec):
        run()
    return rec.names


def run_crashing(run: Callable[[], object], k: int, name: str | None = None) -> str | None:
    """Run `run`, crashing at its k-th fault point (of `name` only, if given). Returns the
    point it crashed at, or None if it finished first."""
    hook = CrashAt(k, name)
    with faults.installed(hook), contextlib.suppress(Crash):
        run()
    return hook.fired


def abandon(log: WriteIntentLog) -> None:
    """The process dies holding the write-intent log: its cleaner stops, its file is released,
    and nothing is cleared (a clean `close()` clears every region whose writes ended)."""
    log._stop.set()
    if log._cleaner is not None:
        log._cleaner.join()
    log._closed = True
    log._io.close()
