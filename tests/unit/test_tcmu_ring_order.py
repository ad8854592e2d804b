"""The ring's ordered mailbox accesses (C atomics) and a two-thread run over the loopback."""

from __future__ import annotations

import mmap
import random
import struct
import threading

from tests.unit.test_tcmu_ring import Disk, rw
from vscsi.scsi.result import GOOD
from vscsi.tcmu import abi
from vscsi.tcmu.loopback import LoopbackDevice, LoopbackKernel
from vscsi.tcmu.ring import Ring, ffi, lib  # the C functions the ring uses


def test_acquire_load_and_release_store_use_the_given_offsets() -> None:
    mem = mmap.mmap(-1, 4096)
    ptr = ffi.from_buffer(mem, require_writable=True)
    try:
        struct.pack_into("<I", mem, 12, 0xDEADBEEF)
        assert lib.ring_load_acquire_u32(ptr, 12) == 0xDEADBEEF
        assert lib.ring_load_acquire_u32(ptr, 16) == 0
        lib.ring_store_release_u32(ptr, 64, 0x01020304)
        assert mem[60:72] == bytes(4) + b"\x04\x03\x02\x01" + bytes(4)
        lib.ring_store_release_u32(ptr, 4092, 0xFFFFFFFF)  # the last word of the map
        assert lib.ring_load_acquire_u32(ptr, 4092) == 0xFFFFFFFF
    finally:
        ffi.release(ptr)
    mem.close()


def test_ring_reads_head_and_publishes_tail_through_them() -> None:
    k, disk = LoopbackKernel(), Disk()
    ring = Ring(k.mem, disk)
    k.submit(rw(0x2A, 0, 1), b"\x5a" * 512)
    assert ring.head == abi.U32.unpack_from(k.mem, 12)[0] == k.head
    assert ring.process() == 1
    assert abi.U32.unpack_from(k.mem, abi.MAILBOX_TAIL_OFFSET)[0] == k.head
    ring.release()
    k.mem.close()  # nothing of the ring still holds the map


def test_initiators_and_server_race_over_the_loopback() -> None:
    """Four initiator threads and the serving thread racing over a small ring that wraps many
    times: every write lands and every read returns what its initiator wrote last."""
    k, disk = LoopbackKernel(cmdr_size=2000, data_size=64 << 10), Disk()
    dev = LoopbackDevice(k)
    stop = threading.Event()
    server = threading.Thread(target=dev.serve, args=(disk, stop))
    server.start()
    failures: list[str] = []

    def initiator(n: int) -> None:
        rng = random.Random(n)
        last: dict[int, bytes] = {}
        for i in range(250):
            lba = n * 16 + rng.randrange(16)  # each initiator owns its blocks
            if lba in last and rng.random() < 0.5:
                c = dev.execute(rw(0x28, lba, 1), data_in_len=512)
                if c.status != GOOD or c.data != last[lba]:
                    failures.append(f"read of {lba} by {n}")
            else:
                last[lba] = (n << 16 | i).to_bytes(4, "little") * 128
                if dev.execute(rw(0x2A, lba, 1), last[lba]).status != GOOD:
                    failures.append(f"write of {lba} by {n}")

    initiators = [threading.Thread(target=initiator, args=(n,)) for n in range(4)]
    try:
        for t in initiators:
            t.start()
        for t in initiators:
            t.join(60)
    finally:
        stop.set()
        dev.wake()
        server.join(5)
        dev.close()
    assert not failures and dev.error is None and k.pads > 10
