"""Backstores on a regular file (sparse) or a real block device.

Data moves with preadv/pwritev straight between the caller's buffers (the ring's mapped iovs)
and the device. Block devices use O_DIRECT when every buffer is aligned, so the host's writes
do not sit twice in page caches; anything unaligned falls back to the buffered descriptor.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from vscsi.store.base import DirectIo, Extent, MediumError, StoreConfigError
from vscsi.store.claim import MissingStoreError, open_store

__all__ = ["FileVolume", "StoreConfigError"]

BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def _punch_hole(fd: int, offset: int, length: int) -> None:
    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _address(view: memoryview) -> int:
    """Start address of a writable buffer (O_DIRECT needs it aligned)."""
    if view.readonly:
        return -1
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


class FileVolume:
    """A volume on a regular file or a block device, with the `Volume` interface.

    The store is opened and claimed as `vscsi.store.claim` describes, from the open to close().
    """

    def __init__(
        self,
        name: str,
        path: str,
        *,
        size: int | None = None,
        block_size: int | None = None,
        write_cache: bool = True,
        create: bool = False,
        read_only: bool = False,
        follow_symlinks: bool = False,
    ) -> None:
        self.name = name
        self.path = path
        self.write_cache = write_cache
        self._read_only = read_only
        self._fd = -1
        self._direct_fd = -1
        self._open(size, block_size, create, follow_symlinks)

    # -- set-up -------------------------------------------------------------------------------

    def _open(
        self, size: int | None, block_size: int | None, create: bool, follow_symlinks: bool
    ) -> None:
        try:
            self._fd, _ = open_store(
                self.path,
                not self._read_only,
                create=create and size is not None,
                follow_symlinks=follow_symlinks,
            )
        except MissingStoreError:
            hint = "and no size is given" if create else "(create it or set create = true)"
            raise StoreConfigError(f"{self.path} does not exist {hint}") from None
        mode = os.fstat(self._fd).st_mode
        self.is_block_device = stat.S_ISBLK(mode)
        if self.is_block_device:
            self._open_block_device(size, block_size)
        else:
            self._open_file(size, block_size)

    def _open_file(self, size: int | None, block_size: int | None) -> None:
        self.block_size = block_size or 512
        current = os.fstat(self._fd).st_size
        if size is None:
            size = current
        elif current == 0 and not self._read_only:
            os.ftruncate(self._fd, size)  # a new sparse image
        elif current != size:
            self.close()
            raise StoreConfigError(
                f"{self.path} is {current} bytes but size = {size} (fix size or the file)", "size"
            )
        self._check_geometry(size)
        self._size = size
        self._supports_unmap = True

    def _open_block_device(self, size: int | None, block_size: int | None) -> None:
        buf = fcntl.ioctl(self._fd, BLKGETSIZE64, b"\0" * 8)
        dev_size = struct.unpack("Q", buf)[0]
        dev_block = struct.unpack("i", fcntl.ioctl(self._fd, BLKSSZGET, b"\0" * 4))[0]
        self.block_size = block_size or dev_block
        if self.block_size < dev_block:
            self.close()
            raise StoreConfigError(
                f"{self.path} has {dev_block}-byte sectors, more than block_size {self.block_size}",
                "block_size",
            )
        if size is not None and size > dev_size:
            self.close()
            raise StoreConfigError(
                f"{self.path} is {dev_size} bytes, smaller than size = {size}", "size"
            )
        size = size if size is not None else dev_size - dev_size % self.block_size
        self._check_geometry(size)
        self._size = size
        self._supports_unmap = self._discard_supported()
        try:  # the same device, not the path again; not O_EXCL: our claim is self._fd's
            flags = (os.O_RDONLY if self._read_only else os.O_RDWR) | os.O_DIRECT | os.O_CLOEXEC
            self._direct_fd = os.open(f"/proc/self/fd/{self._fd}", flags)
        except OSError:
            self._direct_fd = -1

    def _discard_supported(self) -> bool:
        dev = os.fstat(self._fd).st_rdev
        sysfs = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
        for rel in ("queue/discard_max_bytes", "../queue/discard_max_bytes"):
            try:
                with open(os.path.join(sysfs, rel)) as f:
                    return int(f.read()) > 0
            except OSError:
                continue
        return False

    def _check_geometry(self, size: int) -> None:
        if self.block_size not in (512, 1024, 2048, 4096):
            self.close()
            raise StoreConfigError(
                f"{self.block_size} is not 512, 1024, 2048 or 4096", "block_size"
            )
        if size <= 0 or size % self.block_size:
            self.close()
            raise StoreConfigError(
                f"{size} bytes is not a positive multiple of block size {self.block_size}", "size"
            )

    def fileno(self) -> int:
        """The claimed descriptor (-1 once closed)."""
        return self._fd

    # -- the Volume interface --------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def supports_unmap(self) -> bool:
        return self._supports_unmap

    @property
    def read_only(self) -> bool:
        return self._read_only

    def _fd_for(self, bufs: Sequence[memoryview]) -> int:
        if self._direct_fd < 0:
            return self._fd
        align = self.block_size
        for b in bufs:
            if len(b) % align or _address(b) % align:
                return self._fd
        return self._direct_fd

    def check_ready(self) -> None:
        """A backing store is always ready; its failures surface per command."""

    @contextmanager
    def direct(self) -> Iterator[DirectIo | None]:
        """The descriptors `readinto` and `write` use (see `DirectIo`)."""
        if self._fd < 0:
            yield None
            return
        yield DirectIo(self._fd, self._direct_fd, True, not self._read_only and self.write_cache)

    def readinto(self, offset: int, bufs: Sequence[memoryview]) -> None:
        fd = self._fd_for(bufs)
        total = sum(len(b) for b in bufs)
        try:
            got = os.preadv(fd, bufs, offset)
        except OSError as e:
            raise MediumError("read", offset, total, e.errno) from None
        if got != total:
            self._finish_short_read(offset, bufs, got)

    def _finish_short_read(self, offset: int, bufs: Sequence[memoryview], got: int) -> None:
        """Complete a short preadv; past end of file reads as zeroes (sparse tail)."""
        pos = 0
        for b in bufs:
            n = len(b)
            if pos + n > got:
                start = max(got - pos, 0)
                view = b[start:]
                while len(view):
                    at = offset + pos + start
                    try:
                        k = os.preadv(self._fd, [view], at)
                    except OSError as e:
                        raise MediumError("read", at, len(view), e.errno) from None
                    if k == 0:
                        view[:] = bytes(len(view))
                        break
                    start += k
                    view = view[k:]
            pos += n

    def write(self, offset: int, bufs: Sequence[memoryview], fua: bool = False) -> None:
        fd = self._fd_for(bufs)
        total = sum(len(b) for b in bufs)
        flags = os.RWF_DSYNC if (fua or not self.write_cache) else 0
        try:
            done = os.pwritev(fd, bufs, offset, flags)
            if done != total:
                self._finish_short_write(offset, bufs, done, flags)
        except OSError as e:
            raise MediumError("write", offset, total, e.errno) from None

    def _finish_short_write(
        self, offset: int, bufs: Sequence[memoryview], done: int, flags: int
    ) -> None:
        data = b"".join(bytes(b) for b in bufs)[done:]
        pos = offset + done
        while data:
            k = os.pwritev(self._fd, [data], pos, flags)
            if k <= 0:
                raise OSError(errno.EIO, "short write")
            data = data[k:]
            pos += k

    def flush(self) -> None:
        try:
            os.fdatasync(self._fd)
        except OSError as e:
            raise MediumError("flush", 0, 0, e.errno) from None

    def unmap(self, offset: int, length: int) -> None:
        """Deallocate. With the write cache off the zeroes are durable before it returns, as
        every write then is (LBPRZ=1 promises them)."""
        try:
            if self.is_block_device:
                self._unmap_block_device(offset, length)
            else:
                _punch_hole(self._fd, offset, length)
            if not self.write_cache:
                os.fdatasync(self._fd)
        except OSError as e:
            raise MediumError("unmap", offset, length, e.errno) from None

    def _unmap_block_device(self, offset: int, length: int) -> None:
        """Deallocate and guarantee zeroes (we report LBPRZ): punch, else discard + zero-out."""
        try:
            _punch_hole(self._fd, offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENODEV):
                raise
            rng = struct.pack("QQ", offset, length)
            with contextlib.suppress(OSError):
                fcntl.ioctl(self._fd, BLKDISCARD, rng)
            fcntl.ioctl(self._fd, BLKZEROOUT, rng)

    def extent_at(self, offset: int) -> Extent:
        if self.is_block_device:
            return Extent(offset, self._size - offset, True)
        try:
            data = os.lseek(self._fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise MediumError("read", offset, 0, e.errno) from None
            return Extent(offset, self._size - offset, False)  # a hole to the end
        if data > offset:
            return Extent(offset, min(data, self._size) - offset, False)
        hole = os.lseek(self._fd, offset, os.SEEK_HOLE)
        return Extent(offset, min(hole, self._size) - offset, True)

    def close(self) -> None:
        for fd in (self._direct_fd, self._fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._direct_fd = -1
