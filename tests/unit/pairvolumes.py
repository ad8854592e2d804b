"""Helpers for the pair tests: in-memory volumes with switchable failures, and replicas that
count, slow down or pause the copy."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

from tests.unit.memvolume import MemVolume
from vscsi.pair.manager import PairManager
from vscsi.pair.replica import LocalReplica
from vscsi.scsi.identity import Identity
from vscsi.store.base import MediumError, Volume

MIB = 1 << 20


class FaultyVolume(MemVolume):
    """A MemVolume whose every write fails while `failing` is set (a dead device; with `torn`
    the first half of the write lands before the error), and whose flush fails while
    `flush_failing` is set."""

    failing = False
    torn = False
    flush_failing = False  # a device whose write cache cannot be written back

    def write(self, offset: int, bufs: Sequence[memoryview], fua: bool = False) -> None:
        if self.failing:
            data = b"".join(bytes(b) for b in bufs)
            if self.torn:
                self.data[offset : offset + len(data) // 2] = data[: len(data) // 2]
            raise MediumError("write", offset, len(data), 5)
        super().write(offset, bufs, fua)

    def flush(self) -> None:
        if self.flush_failing:
            raise MediumError("write", 0, 0, 5)
        super().flush()


class GatedReplica(LocalReplica):
    """Counts bytes written; `gate` (set by default) pauses every write while cleared."""

    def __init__(self, volume: Volume) -> None:
        super().__init__(volume)
        self.written = 0
        self.gate = threading.Event()
        self.gate.set()
        self.reads = 0

    def write(self, offset: int, bufs: Sequence[memoryview], fua: bool = False) -> None:
        self.gate.wait()
        super().write(offset, bufs, fua)
        self.written += sum(len(b) for b in bufs)

    def readinto(self, offset: int, bufs: Sequence[memoryview]) -> None:
        super().readinto(offset, bufs)
        self.reads += sum(len(b) for b in bufs)


def volumes(n: int = 4, size: int = 4 * MIB) -> dict[str, FaultyVolume]:
    """Volumes v0..v{n-1}, each filled with its own random data."""
    vols = {}
    for i in range(n):
        v = FaultyVolume(size, name=f"v{i}")
        v.data[:] = os.urandom(size)
        v.mapped[:] = b"\1" * len(v.mapped)  # data everywhere: a copy skips only holes
        vols[v.name] = v
    return vols


def identities(names: Sequence[str]) -> dict[str, Identity]:
    return {n: Identity(serial=410001, volume_id=0x100 + i) for i, n in enumerate(names)}


def manager(
    state_dir: str,
    vols: dict[str, FaultyVolume],
    paused: frozenset[str] = frozenset(),
    **kw: object,
) -> PairManager:
    """A manager with small chunks and GatedReplica S-VOLs (`manager.replicas[svol]`); the
    replicas of `paused` volumes start with their gate closed."""
    replicas: dict[str, GatedReplica] = {}

    def factory(volume: Volume) -> GatedReplica:
        rep = replicas[volume.name] = GatedReplica(volume)
        if volume.name in paused:
            rep.gate.clear()
        return rep

    kw.setdefault("chunk", 256 << 10)
    kw.setdefault("wil_idle", 0.05)
    m = PairManager(state_dir, vols, identities(list(vols)), replica_factory=factory, **kw)  # type: ignore[arg-type]
    m.replicas = replicas  # type: ignore[attr-defined]
    return m


def write(vol: Volume, offset: int, data: bytes) -> None:
    vol.write(offset, [memoryview(data)])


def read(vol: Volume, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    vol.readinto(offset, [memoryview(buf)])
    return bytes(buf)
