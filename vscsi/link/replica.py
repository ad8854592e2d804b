"""An S-VOL on a peer array, reached through the `Replica` protocol the pair layer mirrors to."""

from __future__ import annotations

from collections.abc import Sequence

from vscsi.link.frames import MAX_DATA
from vscsi.link.session import LinkSession
from vscsi.store.base import Extent


class RemoteReplica:
    """Volume `volume_name` of the peer array behind `session`. Every method raises a
    `LinkError` when it did not complete; requests larger than one frame carries are split
    into several, sent one after the other."""

    def __init__(self, session: LinkSession, volume_name: str) -> None:
        self.session = session
        self.volume_name = volume_name

    @property
    def size(self) -> int:
        return self.session.size(self.volume_name)

    def readinto(self, offset: int, bufs: Sequence[memoryview]) -> None:
        for buf in bufs:
            for start in range(0, len(buf), MAX_DATA):
                piece = buf[start : start + MAX_DATA]
                piece[:] = self.session.read(self.volume_name, offset + start, len(piece))
            offset += len(buf)

    def write(self, offset: int, bufs: Sequence[memoryview], fua: bool = False) -> None:
        data = bufs[0] if len(bufs) == 1 else memoryview(b"".join(bufs))
        for start in range(0, len(data), MAX_DATA):
            piece = data[start : start + MAX_DATA]
            self.session.write(self.volume_name, offset + start, piece, fua)

    def flush(self) -> None:
        self.session.flush(self.volume_name)

    def unmap(self, offset: int, length: int) -> None:
        """The peer's target makes the range read as zeroes (deallocating if it can)."""
        self.session.unmap(self.volume_name, offset, length)

    def extent_at(self, offset: int) -> Extent:
        """Mapped or not as the peer's volume says; mapped when it cannot tell."""
        return self.session.extent(self.volume_name, offset)
