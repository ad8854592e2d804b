"""The volume interface every layer stacks on (like a device-mapper target).

The SCSI core sees only a `Volume`; backstores, shadow sets and pair primaries implement it.
Offsets and lengths are in bytes and always multiples of `block_size`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable


class StoreConfigError(ValueError):
    """A backing path that cannot serve as configured; `field` names the config key at fault."""

    def __init__(self, message: str, field: str = "path") -> None:
        super().__init__(message)
        self.field = field


class VolumeError(Exception):
    """Base for errors a volume reports to the SCSI layer."""


class MediumError(VolumeError):
    """The device failed a read or write; the SCSI layer answers MEDIUM ERROR for that command.

    `offset` is the byte offset of the failing request (or of the first bad block if known).
    """

    def __init__(self, op: str, offset: int, length: int, errno: int | None = None) -> None:
        super().__init__(f"{op} error at byte {offset} (+{length}), errno {errno}")
        self.op = op
        self.offset = offset
        self.length = length
        self.errno = errno


class NotReadyError(VolumeError):
    """The volume cannot serve I/O now (e.g. a pair state forbids access): NOT READY sense."""

    def __init__(self, reason: str, asc: int = 0x04, ascq: int = 0x00) -> None:
        super().__init__(reason)
        self.asc = asc
        self.ascq = ascq


class WriteProtectedError(VolumeError):
    """Writes are refused by volume state: DATA PROTECT / WRITE PROTECTED (27/00)."""


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of blocks that are all mapped or all deallocated (for GET LBA STATUS)."""

    offset: int
    length: int
    mapped: bool


class DirectIo(NamedTuple):
    """A volume's data as plain descriptors, for a transport that moves READ and WRITE data
    itself (the ring's compiled path). A volume hands it out only for the moment in which a
    plain `preadv`/`pwritev` on `fd` is exactly what its `readinto`/`write` would do."""

    fd: int
    direct_fd: int  # O_DIRECT, for block-aligned buffers; -1 if none
    reads: bool
    writes: bool  # never while the write cache is off: durable writes are the volume's own
    # A P-VOL in PAIR: each write also goes, after `fd`, to these S-VOLs ((fd, direct_fd)
    # each), and only into regions whose write intent is durable: (region bytes, ready,
    # touched) as `WriteIntentLog.lend` hands them out.
    mirrors: tuple[tuple[int, int], ...] = ()
    intent: tuple[int, bytearray, bytearray] | None = None


@runtime_checkable
class Volume(Protocol):
    """What the SCSI core needs from the storage under a LUN."""

    name: str
    block_size: int
    write_cache: bool  # WCE; MODE SELECT may change it at run time

    @property
    def size(self) -> int:
        """Capacity in bytes (a multiple of block_size)."""
        ...

    @property
    def supports_unmap(self) -> bool:
        """True when unmap() really deallocates (punch hole / BLKDISCARD)."""
        ...

    @property
    def read_only(self) -> bool:
        """True when host writes must be refused with WRITE PROTECTED."""
        ...

    def check_ready(self) -> None:
        """TEST UNIT READY: raise NotReadyError when the volume's state forbids all access."""
        ...

    def readinto(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Fill `bufs` (in order) from `offset`. Raises MediumError / NotReadyError."""
        ...

    def write(self, offset: int, bufs: Sequence[memoryview], fua: bool = False) -> None:
        """Write `bufs` (in order) at `offset`; durable on return when `fua` or no write cache."""
        ...

    def flush(self) -> None:
        """Make every acknowledged write durable (SYNCHRONIZE CACHE)."""
        ...

    def unmap(self, offset: int, length: int) -> None:
        """Deallocate; later reads return zeroes."""
        ...

    def extent_at(self, offset: int) -> Extent:
        """The mapped/deallocated run that starts at `offset` (GET LBA STATUS)."""
        ...

    def close(self) -> None: ...
