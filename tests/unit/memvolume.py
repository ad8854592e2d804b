"""An in-memory `Volume` for SCSI tests: injectable medium errors and a block allocation map."""

from __future__ import annotations

from collections.abc import Sequence

from vscsi.store.base import Extent, MediumError


class MemVolume:
    """Honours the `Volume` protocol; unwritten and unmapped blocks read as zeroes.

    `bad_read` / `bad_write` hold byte offsets of blocks whose I/O fails with MediumError,
    like bad sectors; `mapped` tracks which blocks hold data (for GET LBA STATUS).
    """

    def __init__(
        self,
        size: int = 8 << 20,
        block_size: int = 512,
        *,
        unmap: bool = True,
        read_only: bool = False,
        write_cache: bool = True,
        name: str = "mem",
    ) -> None:
        self.name = name
        self.block_size = block_size
        self.write_cache = write_cache
        self.data = bytearray(size)
        self.mapped = bytearray(size // block_size)  # 1 per allocated block
        self.bad_read: set[int] = set()
        self.bad_write: set[int] = set()
        self._unmap = unmap
        self._read_only = read_only
        self.writes: list[tuple[int, int, bool]] = []  # (offset, length, fua)
        self.flushes = 0

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def supports_unmap(self) -> bool:
        return self._unmap

    @property
    def read_only(self) -> bool:
        return self._read_only

    def _check(self, bad: set[int], op: str, offset: int, length: int) -> None:
        if offset < 0 or offset + length > len(self.data):
            raise ValueError(f"{op} beyond the volume: {offset}+{length}")
        for b in sorted(bad):
            if offset <= b < offset + length:
                raise MediumError(op, b, self.block_size, 5)

    def check_ready(self) -> None:
        pass

    def readinto(self, offset: int, bufs: Sequence[memoryview]) -> None:
        total = sum(len(b) for b in bufs)
        if self.bad_read:
            self._check(self.bad_read, "read", offset, total)
        pos = offset
        for b in bufs:
            n = len(b)
            b[:] = self.data[pos : pos + n]
            pos += n

    def write(self, offset: int, bufs: Sequence[memoryview], fua: bool = False) -> None:
        total = sum(len(b) for b in bufs)
        self._check(self.bad_write, "write", offset, total)
        pos = offset
        for b in bufs:
            n = len(b)
            self.data[pos : pos + n] = b
            pos += n
        bs = self.block_size
        self.mapped[offset // bs : (offset + total) // bs] = b"\1" * (total // bs)
        self.writes.append((offset, total, fua))

    def flush(self) -> None:
        self.flushes += 1

    def unmap(self, offset: int, length: int) -> None:
        self._check(set(), "unmap", offset, length)
        self.data[offset : offset + length] = bytes(length)
        bs = self.block_size
        self.mapped[offset // bs : (offset + length) // bs] = bytes(length // bs)

    def extent_at(self, offset: int) -> Extent:
        bs = self.block_size
        first = offset // bs
        state = self.mapped[first]
        end = first
        while end < len(self.mapped) and self.mapped[end] == state:
            end += 1
        return Extent(offset, (end - first) * bs, bool(state))

    def close(self) -> None:
        pass
