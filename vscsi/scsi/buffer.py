"""Scatter/gather view of a command's data buffer (the iovs the transport hands us)."""

from __future__ import annotations

from collections.abc import Sequence


class DataBuffer:
    """The data-out bytes of a command, or where its data-in goes, as a list of memoryviews.

    Transports pass views straight into their shared memory so READ/WRITE move data between
    the device and the ring without an intermediate copy.
    """

    __slots__ = ("length", "views")

    def __init__(self, views: Sequence[memoryview] = (), length: int | None = None) -> None:
        self.views = list(views)
        self.length = sum(len(v) for v in self.views) if length is None else length

    @classmethod
    def of_size(cls, n: int) -> DataBuffer:
        return cls([memoryview(bytearray(n))])

    @classmethod
    def of_bytes(cls, data: bytes) -> DataBuffer:
        return cls([memoryview(bytearray(data))])

    def slices(self, offset: int, length: int) -> list[memoryview]:
        """Views covering bytes [offset, offset+length) of the buffer."""
        if offset == 0 and length == self.length:
            return self.views  # the whole buffer: the common READ/WRITE case
        out: list[memoryview] = []
        pos = 0
        end = offset + length
        for v in self.views:
            n = len(v)
            if pos + n > offset and pos < end:
                a = max(offset - pos, 0)
                b = min(end - pos, n)
                out.append(v[a:b])
            pos += n
            if pos >= end:
                break
        return out

    def gather(self, n: int | None = None, offset: int = 0) -> bytes:
        """Copy out up to `n` bytes starting at `offset` (data-out parameters, WRITE SAME)."""
        if n is None:
            n = self.length - offset
        return b"".join(bytes(v) for v in self.slices(offset, n))

    def scatter(self, data: bytes | memoryview, offset: int = 0) -> int:
        """Copy `data` into the buffer at `offset`, truncated to fit; returns bytes copied."""
        src = memoryview(data)
        done = 0
        for v in self.slices(offset, len(src)):
            n = len(v)
            v[:] = src[done : done + n]
            done += n
        return done

    def tobytes(self) -> bytes:
        return self.gather()
