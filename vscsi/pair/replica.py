"""How a P-VOL reaches its S-VOL: the `Replica` protocol, and `LocalReplica` for an S-VOL in
this daemon. A remote link (TrueCopy) implements the same protocol, so the pair machinery
never knows which one it drives."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Protocol

from vscsi.resync.engine import deallocate
from vscsi.store.base import DirectIo, Extent, Volume


class Replica(Protocol):
    """The S-VOL as the P-VOL side sees it."""

    @property
    def size(self) -> int: ...

    def readinto(self, offset: int, bufs: Sequence[memoryview]) -> None: ...

    def write(self, offset: int, bufs: Sequence[memoryview], fua: bool = False) -> None: ...

    def flush(self) -> None: ...

    def unmap(self, offset: int, length: int) -> None:
        """Make the range read as zeroes (the P-VOL advertises LBPRZ=1)."""
        ...

    def extent_at(self, offset: int) -> Extent:
        """Where the S-VOL has data (mapped=True where it cannot tell): copies skip the
        ranges that are holes on both sides, so a thin S-VOL stays thin."""
        ...


class LocalReplica:
    """An S-VOL in this process: its backstore, below the host-facing wrapper."""

    def __init__(self, volume: Volume) -> None:
        self.volume = volume

    @property
    def size(self) -> int:
        return self.volume.size

    def readinto(self, offset: int, bufs: Sequence[memoryview]) -> None:
        self.volume.readinto(offset, bufs)

    def write(self, offset: int, bufs: Sequence[memoryview], fua: bool = False) -> None:
        self.volume.write(offset, bufs, fua)

    def flush(self) -> None:
        self.volume.flush()

    def unmap(self, offset: int, length: int) -> None:
        """Deallocate when the S-VOL can; otherwise write the zeroes a deallocated range reads."""
        deallocate(self.volume, offset, length)

    def extent_at(self, offset: int) -> Extent:
        return self.volume.extent_at(offset)

    def direct(self) -> AbstractContextManager[DirectIo | None]:
        """The S-VOL's descriptors, for the P-VOL's compiled write path (`PairVolume.direct`)."""
        direct = getattr(self.volume, "direct", None)
        return nullcontext() if direct is None else direct()
