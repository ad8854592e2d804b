"""The ring code against the in-process loopback kernel: the same layout target_core_user uses."""

from __future__ import annotations

import random
import threading

import pytest
from construct import Container

from vscsi.scsi.buffer import DataBuffer
from vscsi.scsi.result import CHECK_CONDITION, GOOD, Result
from vscsi.tcmu import abi
from vscsi.tcmu.loopback import LoopbackDevice, LoopbackKernel
from vscsi.tcmu.ring import Ring, RingError


class Disk:
    """A tiny command handler: READ(10)/WRITE(10) on a bytearray, anything else fails."""

    def __init__(self, size: int = 1 << 20) -> None:
        self.data = bytearray(size)
        self.resets = 0
        self.seen: list[bytes] = []

    def execute(self, cdb: bytes | memoryview, buf: DataBuffer) -> Result:
        cdb = bytes(cdb)
        self.seen.append(cdb)
        if cdb[0] in (0x28, 0x2A):
            lba = int.from_bytes(cdb[2:6], "big") * 512
            n = int.from_bytes(cdb[7:9], "big") * 512
            if cdb[0] == 0x28:
                return Result(GOOD, b"", buf.scatter(bytes(self.data[lba : lba + n])))
            self.data[lba : lba + n] = buf.gather(n)
            return Result(GOOD)
        if cdb[0] == 0x12:  # a short answer into a longer buffer: a residual
            return Result(GOOD, b"", buf.scatter(b"INQ"))
        return Result(CHECK_CONDITION, b"\x70\x00\x05" + bytes(15))

    def reset(self) -> None:
        self.resets += 1


def rw(op: int, lba: int, blocks: int) -> bytes:
    return bytes([op, 0]) + lba.to_bytes(4, "big") + b"\0" + blocks.to_bytes(2, "big") + b"\0"


def test_write_then_read_through_scattered_iovs() -> None:
    k, disk = LoopbackKernel(), Disk()
    ring = Ring(k.mem, disk)
    payload = random.randbytes(5 * 4096)
    k.submit(rw(0x2A, 8, 40), payload)
    k.submit(rw(0x28, 8, 40), data_in_len=len(payload))
    assert ring.process() == 2
    done = k.reap()
    assert [c.status for c in done] == [GOOD, GOOD]
    assert done[1].data == payload
    assert disk.data[4096 : 4096 + len(payload)] == payload


def test_wraparound_with_pad_entries_and_many_commands() -> None:
    k, disk = LoopbackKernel(cmdr_size=1024), Disk()
    ring = Ring(k.mem, disk)
    for i in range(300):
        data = bytes([i % 256]) * 512
        assert k.submit(rw(0x2A, i, 1), data) is not None
        ring.process()
        k.reap()
    assert k.pads > 0
    assert all(disk.data[i * 512] == i % 256 for i in range(300))
    assert ring.commands == 300


def test_ring_full_and_data_area_full_are_refused_not_overrun() -> None:
    k = LoopbackKernel(cmdr_size=512, data_size=8 * 4096)
    assert k.submit(rw(0x28, 0, 80), data_in_len=80 * 512) is None  # 10 blocks > 8
    ids = []
    while (c := k.submit(rw(0x28, 0, 1), data_in_len=512)) is not None:
        ids.append(c)
    assert 0 < len(ids) <= 8
    ring = Ring(k.mem, Disk())
    ring.process()
    assert len(k.reap()) == len(ids)
    assert k.submit(rw(0x28, 0, 1), data_in_len=512) is not None


def test_check_condition_sense_and_read_len_residual() -> None:
    k = LoopbackKernel()
    ring = Ring(k.mem, Disk())
    bad = k.submit(bytes([0xC5, 0, 0, 0, 0, 0]))
    inq = k.submit(bytes([0x12, 0, 0, 0, 96, 0]), data_in_len=96)
    ring.process()
    done = {c.cmd_id: c for c in k.reap()}
    assert done[bad].status == CHECK_CONDITION and done[bad].sense[2] == 0x05
    assert len(done[bad].sense) == abi.SENSE_BUFFERSIZE
    assert done[inq].read_len == 3 and done[inq].data == b"INQ"


def test_tmr_lun_reset_reaches_the_handler() -> None:
    k, disk = LoopbackKernel(), Disk()
    ring = Ring(k.mem, disk)
    k.submit_tmr(abi.TMR_ABORT_TASK, [7])
    k.submit_tmr(abi.TMR_LUN_RESET, [])
    assert ring.process() == 2
    assert disk.resets == 1


def test_restart_resumes_pending_entries() -> None:
    """A new Ring on the same memory (a restarted daemon) serves what was queued meanwhile."""
    k, disk = LoopbackKernel(), Disk()
    Ring(k.mem, disk).process()
    k.submit(rw(0x2A, 0, 1), b"\xab" * 512)
    k.submit(rw(0x2A, 1, 1), b"\xcd" * 512)
    assert Ring(k.mem, disk).process() == 2
    assert len(k.reap()) == 2
    assert disk.data[0] == 0xAB and disk.data[512] == 0xCD


def test_malformed_entries_never_crash() -> None:
    k, disk = LoopbackKernel(), Disk()
    ring = Ring(k.mem, disk)
    cmd = k.submit(rw(0x28, 0, 1), data_in_len=512)
    assert cmd is not None
    ent = 128 + 0
    abi.IOVEC.pack_into(k.mem, ent + abi.CMD_IOV_OFFSET, 16, 512)  # iov inside the ring
    ring.process()
    (c,) = k.reap()
    assert c.status == CHECK_CONDITION and c.sense[2] == 0x04 and ring.bad_entries == 1
    k.submit(rw(0x28, 0, 1), data_in_len=512)
    abi.U32.pack_into(k.mem, 128 + k.last_cleaned, 3 | abi.OP_CMD)  # length not 8-aligned
    with pytest.raises(RingError):
        ring.process()


def test_bad_mailbox_is_refused() -> None:
    k = LoopbackKernel()
    k.mem[0] = 9
    with pytest.raises(RingError, match="version"):
        Ring(k.mem, Disk())


def test_served_in_a_thread_with_doorbells() -> None:
    k, disk = LoopbackKernel(), Disk()
    dev = LoopbackDevice(k)
    stop = threading.Event()
    t = threading.Thread(target=dev.serve, args=(disk, stop))
    t.start()
    try:
        for i in range(50):
            c = dev.execute(rw(0x2A, i, 2), bytes([i]) * 1024)
            assert c.status == GOOD
        c = dev.execute(rw(0x28, 10, 2), data_in_len=1024)
        assert c.data == bytes([10]) * 512 + bytes([11]) * 512
    finally:
        stop.set()
        dev.wake()
        t.join(5)
        dev.close()
    assert not t.is_alive()


def test_fast_decoders_agree_with_declarations() -> None:
    rng = random.Random(1)
    for _ in range(200):
        raw = rng.randbytes(72)
        hdr = abi.EntryHeader.parse(raw)
        assert abi.HEADER.unpack_from(raw) == (hdr.len_op, hdr.cmd_id, hdr.kflags, hdr.uflags)
        entry = bytearray(raw)
        entry[8:20] = (1).to_bytes(4, "little") + bytes(8)  # one iov, no bidi, no dif
        req = abi.CmdRequest.parse(bytes(entry))
        assert abi.CMD_COUNTS.unpack_from(entry, 8) == (1, 0, 0, req.cdb_off)
        assert abi.IOVEC.unpack_from(entry, abi.CMD_IOV_OFFSET) == (req.iov[0].base, req.iov[0].len)
        rsp = abi.CmdResponse.parse(raw + bytes(96))
        assert abi.RESPONSE.unpack_from(raw, 8) == (rsp.scsi_status, rsp.read_len)
        mb = abi.Mailbox.parse(raw + bytes(8))
        assert abi.MAILBOX_HEAD.unpack_from(raw) == (
            mb.version,
            mb.flags,
            mb.cmdr_off,
            mb.cmdr_size,
            mb.cmd_head,
        )
        assert abi.U32.unpack_from(raw, abi.MAILBOX_TAIL_OFFSET)[0] == mb.cmd_tail
    built = abi.CmdRequest.build(
        Container(
            hdr=Container(len_op=1, cmd_id=2, kflags=0, uflags=0),
            iov_cnt=1,
            iov_bidi_cnt=0,
            iov_dif_cnt=0,
            cdb_off=99,
            iov=[Container(base=4096, len=512)],
        )
    )
    assert len(built) == abi.CMD_IOV_OFFSET + 16
