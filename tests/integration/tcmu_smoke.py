"""Real-kernel smoke test of the TCMU transport (run as root inside the VM, not by pytest).

    PATH=/tmp/venv/bin:$PATH scripts/vm-run '/tmp/venv/bin/python tests/integration/tcmu_smoke.py'

Loads the modules, listens on TCM-USER netlink, creates a user backstore, serves its ring with
a tiny in-memory disk, exports it through tcm_loop, moves data through /dev/sdX with dd and
checks it both ways, then tears everything down and checks nothing of ours is left.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a plain script

from vscsi.scsi.buffer import DataBuffer
from vscsi.scsi.result import CHECK_CONDITION, GOOD, Result
from vscsi.tcmu import configfs
from vscsi.tcmu.netlink import CMD_ADDED_DEVICE, CMD_REMOVED_DEVICE, NetlinkListener
from vscsi.tcmu.uio import UioDevice, UioError

VOLUME = "smoke"
SIZE = 16 << 20
BLOCK = 512


def sense(key: int, asc: int, ascq: int = 0) -> bytes:
    return bytes([0x70, 0, key, 0, 0, 0, 0, 10, 0, 0, 0, 0, asc, ascq, 0, 0, 0, 0])


class RamDisk:
    """Just enough SCSI for sd to attach and move data; everything else is 05/20/00."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.blocks = size // BLOCK
        self.opcodes: set[int] = set()
        self.resets = 0

    def execute(self, cdb: bytes | memoryview, buf: DataBuffer) -> Result:
        cdb = bytes(cdb)
        self.opcodes.add(cdb[0])
        op = cdb[0]
        if op == 0x00:  # TEST UNIT READY
            return Result(GOOD)
        if op == 0x12:
            return self.inquiry(cdb, buf)
        if op == 0x25:  # READ CAPACITY(10)
            last = min(self.blocks - 1, 0xFFFFFFFF)
            return Result(
                GOOD, b"", buf.scatter(last.to_bytes(4, "big") + BLOCK.to_bytes(4, "big"))
            )
        if op == 0x9E and cdb[1] & 0x1F == 0x10:  # READ CAPACITY(16)
            data = (self.blocks - 1).to_bytes(8, "big") + BLOCK.to_bytes(4, "big") + bytes(20)
            return Result(GOOD, b"", buf.scatter(data[: int.from_bytes(cdb[10:14], "big")]))
        if op in (0x28, 0x2A):
            return self.io(op == 0x2A, int.from_bytes(cdb[2:6], "big"), cdb[7] << 8 | cdb[8], buf)
        if op in (0x88, 0x8A):
            lba, n = int.from_bytes(cdb[2:10], "big"), int.from_bytes(cdb[10:14], "big")
            return self.io(op == 0x8A, lba, n, buf)
        return Result(CHECK_CONDITION, sense(0x05, 0x20))

    def inquiry(self, cdb: bytes, buf: DataBuffer) -> Result:
        alloc = cdb[3] << 8 | cdb[4]
        if cdb[1] & 1:
            if cdb[2] != 0x00:
                return Result(CHECK_CONDITION, sense(0x05, 0x24))
            data = bytes([0, 0, 0, 1, 0])  # supported pages: only this one
        else:
            data = bytes([0, 0, 6, 2, 31, 0, 0, 0x02]) + b"VSCSI   " + b"TCMU SMOKE      " + b"0001"
        return Result(GOOD, b"", buf.scatter(data[:alloc]))

    def io(self, write: bool, lba: int, n: int, buf: DataBuffer) -> Result:
        if lba + n > self.blocks:
            return Result(CHECK_CONDITION, sense(0x05, 0x21))
        a, b = lba * BLOCK, (lba + n) * BLOCK
        if write:
            self.data[a:b] = buf.gather(b - a)
            return Result(GOOD)
        return Result(GOOD, b"", buf.scatter(memoryview(self.data)[a:b]))

    def reset(self) -> None:
        self.resets += 1

    def waits(self, cdb: bytes) -> bool:
        return True  # with SMOKE_WORKERS, every command exercises the pool


def check(cond: bool, what: str) -> None:
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        raise SystemExit(1)


def dd(*args: str) -> None:
    subprocess.run(["dd", "status=none", *args], check=True)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    configfs.prepare_kernel()
    left = configfs.remove_all_vscsi()
    check(left == [], f"no leftovers from earlier runs ({left})")
    events: list[tuple[str, str]] = []

    def on(kind: str) -> Callable[..., int]:
        def callback(name: str, minor: int, dev_id: int, **changes: object) -> int:
            events.append((kind, name))
            return 0

        return callback

    listener = NetlinkListener(on("added"), on("removed"), on("reconfig"))
    listener.start()
    disk = RamDisk(SIZE)
    bs = configfs.create_backstore(VOLUME, SIZE, BLOCK)
    check(configfs.find_backstore(VOLUME) is not None, "find_backstore sees the new backstore")
    dev = UioDevice.open(bs.uio_name)
    check(dev.tcmu_name.endswith(f"/vscsi-{VOLUME}/vscsi/{VOLUME}"), f"uio name {dev.tcmu_name}")
    try:
        UioDevice.open(bs.uio_name)
        check(False, "a second open of the uio device is refused")
    except UioError as e:
        check("already served by another process" in str(e), f"second open refused: {e}")
    stop = threading.Event()
    workers = int(os.environ.get("SMOKE_WORKERS", "0"))
    thread = threading.Thread(target=dev.serve, args=(disk, stop, workers), daemon=True)
    thread.start()
    export = configfs.export_loop(bs)
    sd, sg = configfs.find_disk(export, timeout=60)
    check(Path(sd).exists() and Path(sg).exists(), f"disk appeared: {sd} {sg}")
    check(("added", dev.tcmu_name) in events, "netlink ADDED_DEVICE received and answered")
    size = int(Path(f"/sys/block/{Path(sd).name}/size").read_text()) * 512
    check(size == SIZE, f"the host sees {size} bytes")

    pattern = os.urandom(1 << 20)
    src = Path("/tmp/smoke.in")
    src.write_bytes(pattern)
    t0 = time.monotonic()
    dd(f"if={src}", f"of={sd}", "bs=64k", "seek=8192", "oflag=direct,seek_bytes")
    check(
        disk.data[8192 : 8192 + len(pattern)] == pattern,
        "data written through sd landed in the disk",
    )
    disk.data[8 << 20 : (8 << 20) + len(pattern)] = pattern[::-1]
    dd(f"if={sd}", "of=/tmp/smoke.out", "bs=128k", "skip=64", "count=8", "iflag=direct")
    check(Path("/tmp/smoke.out").read_bytes() == pattern[::-1], "data read through sd matches")
    print(f"     moved 2 MiB in {time.monotonic() - t0:.2f}s; ring served {dev.ring.commands}")
    seen = ", ".join(f"{op:02x}" for op in sorted(disk.opcodes))
    print(f"     opcodes seen: {seen}")

    configfs.remove_export(export)
    stop.set()
    dev.wake()
    thread.join(10)
    check(not thread.is_alive(), "ring thread stopped on request")
    dev.close()
    configfs.remove_backstore(bs)
    time.sleep(0.5)
    listener.stop()
    check(("removed", dev.tcmu_name) in events, "netlink REMOVED_DEVICE received and answered")
    kinds = {CMD_ADDED_DEVICE, CMD_REMOVED_DEVICE}
    check(all(s == 0 for c, _n, s in listener.events if c in kinds), "all replies were status 0")
    check(configfs.find_backstore(VOLUME) is None, "backstore removed")
    check(configfs.remove_all_vscsi() == [], "nothing of ours left in configfs")
    print("tcmu smoke: PASS", flush=True)


if __name__ == "__main__":
    sys.exit(main())
