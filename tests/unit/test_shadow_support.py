"""Helpers for the shadow set tests (no tests of its own): members on small sparse files, a
member wrapper with bad blocks and a read stall, and a simulated crash.

A crash stops the worker at a chunk boundary and closes everything without the clean
dismount: the control blocks keep the last generation written while mounted (not clean), the
write-intent log keeps its marks (the tests use a long idle delay), and reopening from the
member files alone is what a restart after SIGKILL or power loss does.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

from tests.unit.crashmodel import abandon
from vscsi.shadow import AREA, ShadowSet, Tuning
from vscsi.shadow.control import SLOT
from vscsi.shadow.set import Stats
from vscsi.store.base import Extent, MediumError
from vscsi.store.file import FileVolume

MIB = 1 << 20
CONTROL_READS = 2 * SLOT  # what read_block reads from a member when a set is opened
SIZE = 4 * MIB  # of the virtual unit
GRAIN = 64 << 10
CHUNK = 256 << 10
TUNING = Tuning(
    grain=GRAIN, chunk=CHUNK, log_region=CHUNK, log_idle=3600.0, checkpoint_bytes=2 * CHUNK
)


class Member(FileVolume):
    """A member on a file, with bad ranges (`bad_read`, `bad_write`: (offset, length) pairs
    whose I/O fails with MediumError) and a one-time stall: after `stall_after(n)` the read that
    crosses n more bytes waits (setting `stalled`) until `release` is set.

    Unless `sparse`, it reports every block mapped, as a block device does, so copies and
    merges read every chunk and the tests of their order and locking can stall them anywhere;
    a `sparse` member reports the file's holes."""

    def __init__(self, path: Path, size: int = SIZE + AREA, sparse: bool = False) -> None:
        super().__init__(path.name, str(path), size=size, create=True)
        self.sparse = sparse
        self.bad_read: list[tuple[int, int]] = []
        self.bad_write: list[tuple[int, int]] = []
        self.written = 0
        self.read_bytes = 0
        self.stalled = threading.Event()
        self.release = threading.Event()
        self._stall_at: int | None = None

    def stall_after(self, nbytes: int) -> None:
        self.stalled.clear()
        self.release.clear()
        self._stall_at = nbytes

    def _hits(self, bad: list[tuple[int, int]], op: str, offset: int, length: int) -> None:
        for start, n in bad:
            if offset < start + n and start < offset + length:
                raise MediumError(op, max(offset, start), length, 5)

    def readinto(self, offset: int, bufs: Sequence[memoryview]) -> None:
        length = sum(len(b) for b in bufs)
        self._hits(self.bad_read, "read", offset, length)
        if self._stall_at is not None:
            self._stall_at -= length
            if self._stall_at < 0:
                self._stall_at = None
                self.stalled.set()
                self.release.wait()
        super().readinto(offset, bufs)
        self.read_bytes += length

    def write(self, offset: int, bufs: Sequence[memoryview], fua: bool = False) -> None:
        length = sum(len(b) for b in bufs)
        self._hits(self.bad_write, "write", offset, length)
        super().write(offset, bufs, fua)
        self.written += length

    def extent_at(self, offset: int) -> Extent:
        if self.sparse:
            return super().extent_at(offset)
        return Extent(offset, self.size - offset, True)


def members(tmp_path: Path, *names: str) -> list[Member]:
    return [Member(tmp_path / f"{n}.img") for n in names]


def reopen(tmp_path: Path, *names: str) -> list[Member]:
    """The same member files as new volumes, as a restarted daemon would open them."""
    return [Member(tmp_path / f"{n}.img") for n in names]


def create(tmp_path: Path, vols: Sequence[Member], wil: bool = True) -> ShadowSet:
    """A new set, its initial copies done and not counted in its stats."""
    s = ShadowSet.create("dsa1", vols, state_dir=tmp_path / "state", wil=wil, tuning=TUNING)
    assert s.wait(10)
    s.stats = Stats()
    return s


def open_set(tmp_path: Path, vols: Sequence[Member], wil: bool = True) -> ShadowSet:
    return ShadowSet.open("dsa1", vols, state_dir=tmp_path / "state", wil=wil, tuning=TUNING)


def crash(s: ShadowSet, *stalled: Member) -> None:
    """Abandon `s` without the clean dismount (releasing members stalled in the worker)."""
    s._stopping.set()
    with s._cond:
        s._cond.notify_all()
    for m in stalled:
        m.release.set()
    s._worker.join()
    if s._wil is not None:
        abandon(s._wil)
    for v in s._volumes():
        v.close()


def write(s: ShadowSet, offset: int, data: bytes) -> None:
    s.write(offset, [memoryview(data)])


def read(s: ShadowSet, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    s.readinto(offset, [memoryview(buf)])
    return bytes(buf)


def data_of(tmp_path: Path, name: str) -> bytes:
    """The member's data area (the virtual unit's blocks, without the control area)."""
    with open(tmp_path / f"{name}.img", "rb") as f:
        return f.read(SIZE)


def scribble(tmp_path: Path, name: str, offset: int, data: bytes) -> None:
    """Change a member file behind the set's back (a write that reached only this member)."""
    with open(tmp_path / f"{name}.img", "r+b") as f:
        f.seek(offset)
        f.write(data)
