"""A TCMU device's uio node: find it, own it exclusively, map it, wait for and signal work."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import mmap
import os
import select
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path

import pyudev

from vscsi.scsi.lun import FastPath
from vscsi.tcmu.doorbell import Doorbell
from vscsi.tcmu.ring import Command, CommandHandler, FastStop, Ring, RingError

log = logging.getLogger(__name__)

SYSFS_UIO = Path("/sys/class/uio")
_FOUR = b"\0\0\0\0"
SPIN_SECONDS = 1e-3
# How far the compiled path's watch may widen for a QD1 host whose next command comes just
# after it (see ring_serve_fast_for): in the VM that gap is 1-3 ms.
SPIN_MAX_SECONDS = 5e-3
# The longest the compiled path keeps a busy ring before the loop looks at the LUN again (a pair
# waiting for the gate, a unit attention): each return costs a trip through Python, several
# hundred microseconds under the VM's emulation, which at queue depth was most of the CPU.
FAST_LIMIT_SECONDS = 10e-3
MAX_RETURNS = 64  # times one batch gives the queue back to the compiled path, at most


class UioError(Exception):
    """The uio device is missing, unusable or already served by someone else."""


@functools.cache
def _udev() -> pyudev.Context:
    """One udev context for the process: each new one looks libudev up again (ldconfig -p, a
    fork), which made attaching 64 LUNs cost a second each."""
    return pyudev.Context()


def _uio_names() -> list[tuple[str, str]]:
    """(uioN, name) of every uio device: from udev, or straight from sysfs without it."""
    try:
        devices = list(_udev().list_devices(subsystem="uio"))
        return [(d.sys_name, _udev_name(d)) for d in devices]
    except (ImportError, OSError):
        out = []
        for dev in sorted(SYSFS_UIO.glob("uio*")):
            with contextlib.suppress(OSError):
                out.append((dev.name, (dev / "name").read_text().strip()))
        return out


def _udev_name(dev: pyudev.Device) -> str:
    try:
        return dev.attributes.asstring("name").strip()
    except (KeyError, UnicodeDecodeError):
        return ""


def find_uio(tcmu_name: str) -> str:
    """The uioN whose `name` is `tcm-user/<hba>/<device>/<subtype>/<cfgstring>`."""
    for uio, name in _uio_names():
        if name == tcmu_name:
            return uio
    raise UioError(f"no uio device named {tcmu_name} (is target_core_user loaded?)")


def uio_for_device(hba: str, device: str) -> str:
    """The uioN of backstore `device` in `hba` (e.g. user_1), whatever its cfgstring."""
    prefix = f"tcm-user/{hba.removeprefix('user_')}/{device}/"
    for uio, name in _uio_names():
        if name.startswith(prefix) or name == prefix[:-1]:
            return uio
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
        self.error: str | None = None  # why serve() gave up: the daemon must not carry on
        self._ring_doorbell = Doorbell(lambda: self.notify())
        self._bell = threading.Lock()  # guards _working
        self._working = 0  # commands handed to workers and not completed
        self._direct: Callable[[], AbstractContextManager[FastPath | None]] | None = None
        self._watched = False  # the compiled path left the ring empty: sleep, do not spin
        self.doorbell_fd = fd  # where the compiled path rings (uio: the device itself)

    def notify(self) -> None:
        os.write(self.fd, _FOUR)

    def serve(
        self, handler: CommandHandler, stop: threading.Event, workers: int = 0, fast: bool = True
    ) -> None:
        """Serve the ring until `stop` is set (wake us with `wake()`) or the ring breaks.

        With `fast`, the READ/WRITE commands the handler's `direct()` allows are served by
        the compiled path (`Ring.serve_fast`) before anything else is parsed.

        With `workers`, the commands the handler says may wait (`waits`) run on a thread pool
        of that size; every other command runs at once on this thread (a hop to a worker buys
        nothing for a command that does not wait). Answers go out in ring order (`Ring.complete`),
        one notify per batch.
        A broken ring (`RingError`), a failed doorbell or any unexpected exception, here or
        in a worker, ends the loop with `error` set: the host's commands to this device would
        only time out from then on, so the owner stops and a restart re-attaches.
        """
        pool = None
        self._direct = getattr(handler, "direct", None) if fast else None
        try:
            ring = self.ring = Ring(self.mem, handler, self.name)
            if workers:
                pool = ThreadPoolExecutor(workers, f"{self.name}-io")
            self._loop(ring, pool, stop)
        except Exception as e:
            self._failed(e)
        finally:
            if pool is not None:
                pool.shutdown(wait=True)

    def _loop(self, ring: Ring, pool: ThreadPoolExecutor | None, stop: threading.Event) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not stop.is_set() and self.error is None:
            served = self._batch(ring, pool)
            if served and not self._working and not self._watched and self._spin(ring):
                continue  # (not while workers run: they need the GIL more than a spinner)
            for fd, _ev in poller.poll():  # stop() and close() write the wake pipe
                if fd == self.fd:
                    os.read(self.fd, 4)  # acknowledge the doorbell
                else:
                    os.read(self._wake_r, 64)

    def _failed(self, e: Exception) -> None:
        """Record the first failure (one line) and wake the serving loop to stop."""
        if isinstance(e, RingError):
            why = str(e)
        elif isinstance(e, OSError):
            why = f"uio: {e.strerror or e}"
        else:
            log.error("%s: unexpected error", self.name, exc_info=e)
            why = f"unexpected {type(e).__name__}: {e}"
        if self.error is None:
            self.error = why
        self.wake()

    def _batch(self, ring: Ring, pool: ThreadPoolExecutor | None) -> bool:
        """Serve what is queued; True if anything was. (The compiled path rings for its own.)

        The core fetches only what the compiled path leaves to it: the entry it stopped at,
        or everything while it does not run. A command queued after the compiled path
        returned with the ring empty, or with its time up, is the compiled path's on the
        loop's next trip: fetched here it would cost the core's whole path (for a P-VOL's
        1 MiB write in PAIR, a fifth of them went that way).

        When the compiled path served some commands and stopped at one for the core (a write
        into a region whose intent is not yet durable, say), the core answers that one alone
        and the compiled path gets the rest again, as long as it keeps serving some: one such
        command does not send the whole queue behind it through Python."""
        before = ring.entries
        fast, stop = self._serve_fast(ring)
        after_fast = ring.entries
        answered = pooled = returns = 0
        while stop is FastStop.CORE:
            limit = 1 if fast and returns < MAX_RETURNS else 0  # 0: everything queued
            cmds = ring.fetch(limit)
            for cmd in cmds:
                if pool is not None and not cmd.bad and ring.handler.waits(cmd.cdb):
                    with self._bell:
                        self._working += 1
                    pool.submit(self._run, ring, cmd)
                    pooled += 1
                else:
                    answered += ring.complete(cmd, ring.run(cmd))
            if not (limit and cmds):
                break
            fast, stop = self._serve_fast(ring)  # none while that command is out with a worker
            after_fast = ring.entries
            returns += 1
        if answered or (not pooled and ring.entries != after_fast):
            self._ring_doorbell()  # PAD/TMR entries alone: their ring space is free once reaped
        return ring.entries != before

    def _serve_fast(self, ring: Ring) -> tuple[int, FastStop]:
        """The compiled path's share of the queue (`Ring.serve_fast`): the entries it consumed,
        and why it stopped (CORE also when it cannot run: off, commands out with workers, a
        LUN state it does not own). `_watched` says it left the ring empty and the loop
        should sleep, not spin: after its own spin window, or at once for a host that keeps a
        queue (see ring_serve_fast_for)."""
        self._watched = False
        if self._direct is None or ring.outstanding():
            return 0, FastStop.CORE  # (with commands out C serves nothing: leave the gate alone)
        if not ring.pending():
            return 0, FastStop.EMPTY
        with self._direct() as path:
            if path is None:
                return 0, FastStop.CORE
            served, stop = ring.serve_fast(
                path, self.doorbell_fd, SPIN_SECONDS, FAST_LIMIT_SECONDS, self.fd, SPIN_MAX_SECONDS
            )
            self._watched = stop is FastStop.EMPTY
            return served, stop

    def _run(self, ring: Ring, cmd: Command) -> None:
        try:
            answered = ring.complete(cmd, ring.run(cmd))
            with self._bell:
                self._working -= 1
            if answered:
                self._ring_doorbell()
        except Exception as e:
            self._failed(e)

    def _spin(self, ring: Ring) -> bool:
        """After a batch, watch the ring briefly before sleeping: at queue depth the next
        command usually arrives within microseconds, and a poll/read wake-up costs more. Each
        look lets go of the GIL (`sleep(0)`), so other LUNs' threads are not held up."""
        deadline = time.perf_counter() + SPIN_SECONDS
        while time.perf_counter() < deadline:
            if ring.pending():
                return True
            time.sleep(0)
        return False

    def wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def counts(self) -> tuple[int, int]:
        """Commands answered so far, and how many of them the compiled path answered."""
        ring = self.ring
        return (0, 0) if ring is None else (ring.commands, ring.fast_commands)

    def close(self) -> None:
        self.wake()
        with contextlib.suppress(BufferError, ValueError):
            if self.ring is not None:
                self.ring.release()
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
            if e.errno == errno.EBUSY:  # target_core_user allows one opener at a time
                raise UioError(
                    f"{name} ({tcmu_name}) is already served by another process"
                ) from None
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
