"""A TCMU device's uio node: find it, own it exclusively, map it, wait for and signal work."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import select
import threading
import time
from pathlib import Path

from vscsi.tcmu.ring import CommandHandler, Ring, RingError

log = logging.getLogger(__name__)

SYSFS_UIO = Path("/sys/class/uio")
_FOUR = b"\0\0\0\0"
SPIN_SECONDS = 1e-3


class UioError(Exception):
    """The uio device is missing, unusable or already served by someone else."""


def find_uio(tcmu_name: str) -> str:
    """The uioN whose `name` is `tcm-user/<hba>/<device>/<subtype>/<cfgstring>`."""
    for dev in sorted(SYSFS_UIO.glob("uio*")):
        with contextlib.suppress(OSError):
            if (dev / "name").read_text().strip() == tcmu_name:
                return dev.name
    raise UioError(f"no uio device named {tcmu_name}")


def uio_for_device(hba: str, device: str) -> str:
    """The uioN of backstore `device` in `hba` (e.g. user_1), whatever its cfgstring."""
    prefix = f"tcm-user/{hba.removeprefix('user_')}/{device}/"
    for dev in sorted(SYSFS_UIO.glob("uio*")):
        with contextlib.suppress(OSError):
            if (dev / "name").read_text().startswith(prefix):
                return dev.name
    raise UioError(f"no uio device for backstore {hba}/{device}")


class RingDevice:
    """A ring in shared memory plus its doorbells: `fd` becomes readable when the other side
    posted work (read 4 bytes to acknowledge), `notify()` tells it completions are ready."""

    def __init__(self, name: str, fd: int, mem: mmap.mmap) -> None:
        self.name = name
        self.fd = fd
        self.mem = mem
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.ring: Ring | None = None

    def notify(self) -> None:
        os.write(self.fd, _FOUR)

    def serve(self, handler: CommandHandler, stop: threading.Event) -> None:
        """Serve the ring until `stop` is set (wake us with `wake()`) or the ring breaks."""
        ring = self.ring = Ring(self.mem, handler)
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while not stop.is_set():
                if ring.process():
                    self.notify()
                    if self._spin(ring):
                        continue
                for fd, _ev in poller.poll(1000):
                    if fd == self.fd:
                        os.read(self.fd, 4)  # acknowledge the doorbell
        except RingError as e:
            log.error("%s: %s; no longer serving this device", self.name, e)
        except OSError as e:
            log.error("%s: %s; no longer serving this device", self.name, e.strerror)

    def _spin(self, ring: Ring) -> bool:
        """After a batch, watch the ring briefly before sleeping: at queue depth the next
        command usually arrives within microseconds, and a poll/read wake-up costs more."""
        deadline = time.perf_counter() + SPIN_SECONDS
        while time.perf_counter() < deadline:
            if ring.pending():
                return True
        return False

    def wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def close(self) -> None:
        self.wake()
        with contextlib.suppress(BufferError, ValueError):
            if self.ring is not None:
                self.ring.mem.release()
            self.mem.close()
        for fd in (self.fd, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fd = -1


class UioDevice(RingDevice):
    """An opened, locked and mapped /dev/uioN."""

    def __init__(self, name: str, fd: int, mem: mmap.mmap, tcmu_name: str) -> None:
        super().__init__(name, fd, mem)
        self.tcmu_name = tcmu_name

    @classmethod
    def open(cls, name: str) -> UioDevice:
        sysfs = SYSFS_UIO / name
        try:
            tcmu_name = (sysfs / "name").read_text().strip()
            size = int((sysfs / "maps/map0/size").read_text(), 0)
            fd = os.open(f"/dev/{name}", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise UioError(f"{name}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise UioError(
                    f"{name} ({tcmu_name}) is already served by another process"
                ) from None
            raise UioError(f"{name}: cannot lock ({e.strerror})") from None
        try:
            mem = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            os.close(fd)
            raise UioError(f"{name}: cannot map {size} bytes ({e.strerror})") from None
        return cls(name, fd, mem, tcmu_name)
