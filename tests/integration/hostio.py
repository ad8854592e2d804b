"""What the host does to a LUN in the integration tests: fio with verification, and a writer
that remembers every acknowledged block so a daemon can be killed under it."""

from __future__ import annotations

import mmap
import os
import random
import struct
import subprocess
import threading
import time
from pathlib import Path

from tests.integration.conftest import Daemon, run


def fio(
    dev: str, size: str = "12M", rate_iops: int = 0, sync: bool = False
) -> subprocess.Popen[str]:
    """fio writing random 4 KiB blocks with crc32c checksums over the first `size` bytes, then
    verifying every block (12M: ~10 s of writes in the emulated VM); `rate_iops` caps the
    writes, so that a test surely acts while they run; `sync` opens the disk O_SYNC, so each
    write is a WRITE with FUA."""
    cmd = ["fio", "--name=verify", f"--filename={dev}", "--ioengine=libaio", "--direct=1",
           "--rw=randwrite", "--bs=4k", "--iodepth=8", f"--size={size}", "--verify=crc32c",
           "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0",
           "--randrepeat=0"]  # fmt: skip
    if rate_iops:
        cmd.append(f"--rate_iops={rate_iops}")
    if sync:
        cmd.append("--sync=1")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


class Writer(threading.Thread):
    """Writes 4 KiB blocks (O_DIRECT) at random places in the first `span` bytes of `dev` until
    stopped, remembering what each block held when its write was acknowledged. It never ends
    by itself, so a daemon killed while it runs is killed with writes in flight by
    construction (fio's time_based mode would skip its verify phase)."""

    def __init__(self, dev: str, span: int) -> None:
        super().__init__(daemon=True)
        self.dev, self.blocks = dev, span // 4096
        self.acked: dict[int, bytes] = {}
        self.count = 0
        self.error: BaseException | None = None
        self._stop_writing = threading.Event()

    def run(self) -> None:
        fd = os.open(self.dev, os.O_RDWR | os.O_DIRECT)
        buf = mmap.mmap(-1, 4096)
        rng = random.Random(self.dev)
        try:
            while not self._stop_writing.is_set():
                block = rng.randrange(self.blocks)
                data = struct.pack("<QQ", block, self.count) + rng.randbytes(4080)
                buf[:] = data
                os.pwrite(fd, buf, block * 4096)
                self.acked[block] = data
                self.count += 1
        except BaseException as e:
            self.error = e
        finally:
            os.close(fd)

    def wait_for(self, writes: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        target = self.count + writes
        while self.count < target:
            assert self.error is None and self.is_alive(), self.error
            assert time.monotonic() < deadline, f"{self.dev}: {self.count} of {target} writes"
            time.sleep(0.2)

    def stop_and_verify(self) -> None:
        """Every acknowledged block reads back as it was last written."""
        self._stop_writing.set()
        if self.ident is None:  # never started
            return
        self.join(300)
        assert self.error is None, self.error
        fd = os.open(self.dev, os.O_RDONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, 4096)
        try:
            for block, data in self.acked.items():
                os.preadv(fd, [buf], block * 4096)
                assert buf[:] == data, f"{self.dev}: block {block} lost an acknowledged write"
        finally:
            os.close(fd)


class Reader(threading.Thread):
    """Reads 4 KiB blocks (O_DIRECT) at random places in the first `span` bytes of `dev` until
    stopped, so that reads are in flight beside a writer's writes when a daemon is killed: a
    read that finishes before an older write must not cost that write its ring slot."""

    def __init__(self, dev: str, span: int) -> None:
        super().__init__(daemon=True)
        self.dev, self.blocks = dev, span // 4096
        self.count = 0
        self.error: BaseException | None = None
        self._stop_reading = threading.Event()

    def run(self) -> None:
        fd = os.open(self.dev, os.O_RDONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, 4096)
        rng = random.Random(self.dev + "r")
        try:
            while not self._stop_reading.is_set():
                os.preadv(fd, [buf], rng.randrange(self.blocks) * 4096)
                self.count += 1
        except BaseException as e:
            self.error = e
        finally:
            os.close(fd)

    def stop_and_check(self) -> None:
        """Every read succeeded."""
        self._stop_reading.set()
        if self.ident is None:
            return
        self.join(300)
        assert self.error is None, self.error
        assert self.count > 0, f"{self.dev}: no read completed"


def fio_ok(p: subprocess.Popen[str], d: Daemon, timeout: float = 600) -> None:
    out, _ = p.communicate(timeout=timeout)
    if p.returncode != 0 or "err= 0" not in out:
        dmesg = run("dmesg", check=False).splitlines()[-30:]
        log = d.output().splitlines()[-40:]
        raise AssertionError("\n".join([out[-3000:], "-- dmesg", *dmesg, "-- vscsi", *log]))


def wait_writes(dev: str, count: int, timeout: float = 120) -> None:
    """Until the host has completed `count` more writes to `dev` (the block layer's counter):
    a fault injected then meets writes in flight."""
    stat = Path(f"/sys/block/{Path(dev).resolve().name}/stat")  # /dev/mapper/X -> dm-N
    target = int(stat.read_text().split()[4]) + count
    deadline = time.monotonic() + timeout
    while int(stat.read_text().split()[4]) < target:
        assert time.monotonic() < deadline, f"{dev}: fewer than {count} writes in {timeout}s"
        time.sleep(0.1)


def rescan(dev: str) -> None:
    """Make the kernel read the disk again: a LUN that was write protected (an S-VOL, a fenced
    P-VOL) when the kernel last looked stays read-only to it until then (MODE SENSE WP)."""
    Path(f"/sys/class/block/{Path(dev).name}/device/rescan").write_text("1")
