"""The ring code against the in-process loopback kernel: the same layout target_core_user uses."""

from __future__ import annotations

import contextlib
import random
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from construct import Container

from tests.unit.scsi_harness import Sense, cdb, make_lun
from vscsi.scsi.buffer import DataBuffer
from vscsi.scsi.result import CHECK_CONDITION, GOOD, Result
from vscsi.tcmu import abi
from vscsi.tcmu.loopback import LoopbackDevice, LoopbackKernel
from vscsi.tcmu.ring import Command, Ring, RingError


class Disk:
    """A tiny command handler: READ(10)/WRITE(10) on a bytearray, anything else fails."""

    def __init__(self, size: int = 1 << 20) -> None:
        self.data = bytearray(size)
        self.resets = 0
        self.seen: list[bytes] = []
        self.replayed: list[bytes] = []

    def execute(self, cdb: bytes | memoryview, buf: DataBuffer, replayed: bool = False) -> Result:
        cdb = bytes(cdb)
        self.seen.append(cdb)
        if replayed:
            self.replayed.append(cdb)
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

    def waits(self, cdb: bytes) -> bool:
        """Writes go to the workers (as a P-VOL's of a remote pair), the rest run inline."""
        return cdb[0] == 0x2A


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
    k, disk = LoopbackKernel(cmdr_size=1000), Disk()
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


def test_only_entries_queued_before_attach_are_replayed() -> None:
    """What was in the ring when the Ring attached may have run already: the handler is told;
    what the kernel queues afterwards is fresh, across a wrap with PAD entries too."""
    k, disk = LoopbackKernel(cmdr_size=1104), Disk()
    Ring(k.mem, disk).process()
    for i in range(5):  # 5 x 128-byte entries: the ring is most of the way round
        k.submit(rw(0x2A, i, 1), bytes([i]) * 512)
    assert Ring(k.mem, disk).process() == 5
    k.reap()
    old = [rw(0x2A, i, 1) for i in range(3)]
    for c in old:
        k.submit(c, b"\x01" * 512)
    pads = k.pads
    ring = Ring(k.mem, disk)
    new = [rw(0x28, i, 1) for i in range(4)]
    for c in new:
        k.submit(c, data_in_len=512)
    disk.replayed.clear()
    assert ring.process() == 7 + k.pads - pads
    assert k.pads > pads  # one entry crossed the end of the ring
    assert disk.replayed == old
    assert disk.seen[-7:] == old + new
    k.submit(rw(0x28, 9, 1), data_in_len=512)
    ring.process()
    assert disk.replayed == old


@pytest.mark.parametrize("answered", [False, True], ids=["before its answer", "after its status"])
def test_compare_and_write_replayed_after_a_kill_is_not_a_false_miscompare(answered: bool) -> None:
    """The daemon ran a CAW (its write landed) and died before cmd_tail moved past it, before
    writing its answer or with its GOOD already in the slot: the restarted one serves it again
    or keeps that answer, GOOD either way; the same CAW sent afresh afterwards miscompares."""
    k, lun = LoopbackKernel(), make_lun()
    old, new = b"\x11" * 512, b"\x22" * 512
    ring = Ring(k.mem, lun)
    k.submit(rw(0x2A, 5, 1), old)
    ring.process()
    k.reap()
    caw = cdb("COMPARE AND WRITE", lba=5, nblocks=1)
    k.submit(caw, old + new)
    (cmd,) = ring.fetch()
    assert ring.run(cmd).status == GOOD  # the write landed; then SIGKILL, no completion
    if answered:
        abi.RESPONSE.pack_into(k.mem, 128 + cmd.slot + 8, GOOD, 0)
    assert Ring(k.mem, lun).process() == 1
    (c,) = k.reap()
    assert c.status == GOOD
    k.submit(rw(0x28, 5, 1), data_in_len=512)
    Ring(k.mem, lun).process()
    assert k.reap()[0].data == new
    fresh = Ring(k.mem, lun)
    k.submit(caw, old + new)
    fresh.process()
    (c,) = k.reap()
    s = Sense.parse(c.sense[: 8 + c.sense[7]])  # the ring pads sense to 96 bytes
    assert c.status == CHECK_CONDITION and s.code == (0xE, 0x1D, 0x00) and s.info == 0


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


@contextlib.contextmanager
def served(dev: LoopbackDevice, handler: Disk, workers: int = 0) -> Iterator[None]:
    """`dev` served by a thread, as the daemon serves a uio device; stopped afterwards."""
    stop = threading.Event()
    t = threading.Thread(target=dev.serve, args=(handler, stop, workers))
    t.start()
    try:
        yield
    finally:
        stop.set()
        dev.wake()
        t.join(5)
        dev.close()
    assert not t.is_alive()


def test_served_in_a_thread_with_doorbells() -> None:
    k, disk = LoopbackKernel(), Disk()
    dev = LoopbackDevice(k)
    with served(dev, disk):
        for i in range(50):
            c = dev.execute(rw(0x2A, i, 2), bytes([i]) * 1024)
            assert c.status == GOOD
        c = dev.execute(rw(0x28, 10, 2), data_in_len=1024)
        assert c.data == bytes([10]) * 512 + bytes([11]) * 512


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


def slot_id(k: LoopbackKernel, slot: int) -> int:
    return abi.HEADER.unpack_from(k.mem, 128 + slot)[1]


def test_a_command_that_finishes_early_is_answered_in_its_own_slot_after_the_older_ones() -> None:
    k, disk = LoopbackKernel(flags=abi.FLAG_CAP_OOOC | abi.FLAG_CAP_READ_LEN), Disk()
    ring = Ring(k.mem, disk)
    ids = [k.submit(rw(0x2A, i, 1), bytes([i + 1]) * 512) for i in range(3)]
    cmds = ring.fetch()
    assert [c.cmd_id for c in cmds] == ids and ring.outstanding()
    assert ring.complete(cmds[2], ring.run(cmds[2])) == 0  # held: the older two run on
    assert k.reap() == [] and [slot_id(k, c.slot) for c in cmds] == ids  # requests intact
    assert ring.complete(cmds[0], ring.run(cmds[0])) == 1
    assert [c.cmd_id for c in k.reap()] == ids[:1]
    assert ring.complete(cmds[1], ring.run(cmds[1])) == 2
    assert [c.cmd_id for c in k.reap()] == ids[1:]
    assert not ring.outstanding() and not k.pending
    assert disk.data[0:1536:512] == b"\x01\x02\x03"
    with pytest.raises(RingError, match="not outstanding"):
        ring.complete(cmds[1], ring.run(cmds[1]))
    k.submit(rw(0x2A, 3, 1), b"\x04" * 512)
    (later,) = ring.fetch()
    with pytest.raises(RingError, match="not outstanding"):  # answered: behind cmd_tail now
        ring.complete(cmds[0], ring.run(cmds[0]))
    assert ring.complete(later, ring.run(later)) == 1


def test_sigkill_after_a_later_command_finished_serves_each_unanswered_command_once() -> None:
    """A write still running on a worker, a read behind it already done, then SIGKILL: the
    new daemon finds both requests in their slots and the kernel gets one answer for each —
    no write left to time out, no cmd_id answered twice (which breaks a real ring)."""
    k, disk = LoopbackKernel(flags=abi.FLAG_CAP_OOOC | abi.FLAG_CAP_READ_LEN), Disk()
    disk.data[512:1024] = b"r" * 512
    ring = Ring(k.mem, disk)
    write = k.submit(rw(0x2A, 0, 1), b"w" * 512)
    read = k.submit(rw(0x28, 1, 1), data_in_len=512)
    cmds = ring.fetch()
    ring.complete(cmds[1], ring.run(cmds[1]))
    assert k.reap() == []  # what the doorbell after the read would have the kernel do
    resumed = Ring(k.mem, disk)  # the write never finished in the killed daemon
    assert resumed.process() == 2
    done = {c.cmd_id: c for c in k.reap()}
    assert done.keys() == {write, read} and not k.pending
    assert done[read].data == b"r" * 512 and done[write].status == GOOD
    assert disk.data[:512] == b"w" * 512 and disk.replayed == [rw(0x2A, 0, 1), rw(0x28, 1, 1)]


def test_out_of_order_completions_from_a_thread_pool() -> None:
    k = LoopbackKernel(cmdr_size=4000, data_size=64 * 4096, flags=abi.FLAG_CAP_OOOC)
    disk = Disk()
    ring = Ring(k.mem, disk)
    rng = random.Random(7)
    expected: dict[int, bytes] = {}
    for round_ in range(20):
        batch = {}
        for i in range(rng.randint(1, 12)):
            lba = round_ * 16 + i
            data = rng.randbytes(512)
            cmd_id = k.submit(rw(0x2A, lba, 1), data)
            if cmd_id is None:
                break
            batch[cmd_id] = data
            expected[lba] = data
        cmds = ring.fetch()
        rng.shuffle(cmds)

        def finish(cmd: Command, delay: float) -> None:
            threading.Event().wait(delay)
            ring.complete(cmd, ring.run(cmd))
            k.reap()

        with ThreadPoolExecutor(4) as pool:
            for cmd in cmds:
                pool.submit(finish, cmd, rng.random() / 1000)
        assert all(k.completions[c].status == GOOD for c in batch)
        assert not ring.outstanding() and not k.pending
    assert k.pads > 0
    for lba, data in expected.items():
        assert disk.data[lba * 512 : (lba + 1) * 512] == data


def test_thread_pool_serving_through_doorbells() -> None:
    k, disk = LoopbackKernel(flags=abi.FLAG_CAP_OOOC | abi.FLAG_CAP_READ_LEN), Disk()
    dev = LoopbackDevice(k)
    with served(dev, disk, 4), ThreadPoolExecutor(8) as initiators:
        writes = [
            initiators.submit(dev.execute, rw(0x2A, i, 1), bytes([i]) * 512) for i in range(64)
        ]
        assert all(f.result().status == GOOD for f in writes)
        c = dev.execute(rw(0x28, 5, 2), data_in_len=1024)
        assert c.data == bytes([5]) * 512 + bytes([6]) * 512


def test_restart_after_partial_completion_resumes_from_cmd_tail() -> None:
    """Killed after answering one of three: the new Ring serves exactly the other two."""
    k, disk = LoopbackKernel(), Disk()
    ring = Ring(k.mem, disk)
    for i in range(3):
        k.submit(rw(0x2A, i, 1), bytes([0x10 + i]) * 512)
    cmds = ring.fetch()
    ring.complete(cmds[0], ring.run(cmds[0]))  # then SIGKILL: cmds[1:] never answered
    assert len(k.reap()) == 1
    resumed = Ring(k.mem, disk)
    assert resumed.process() == 2
    assert len(k.reap()) == 2 and not k.pending
    assert disk.seen.count(rw(0x2A, 0, 1)) == 1
    assert disk.data[0:1536:512] == b"\x10\x11\x12"


def test_bad_cdb_offset_and_unknown_opcode_do_not_stop_the_ring() -> None:
    k, disk = LoopbackKernel(), Disk()
    ring = Ring(k.mem, disk)
    k.submit(rw(0x28, 0, 1), data_in_len=512)
    ent = 128 + k.last_cleaned
    abi.CMD_COUNTS.pack_into(k.mem, ent + 8, 1, 0, 0, len(k.mem) + 4096)  # cdb outside the map
    k.submit_tmr(abi.TMR_ABORT_TASK, [])
    tmr = 128 + (k.head - 32)
    k.mem[tmr] = (k.mem[tmr] & ~abi.OP_MASK) | 5  # an opcode the ABI does not define
    good = k.submit(rw(0x28, 0, 1), data_in_len=512)
    assert ring.process() == 3
    done = {c.cmd_id: c for c in k.reap()}
    assert done[good].status == GOOD
    assert [c.sense[2] for c in done.values() if c.status] == [0x04]
    assert ring.bad_entries == 1


def test_entry_crossing_the_ring_end_stops_the_ring() -> None:
    k = LoopbackKernel(cmdr_size=1024)
    ring = Ring(k.mem, Disk())
    k.submit(rw(0x28, 0, 1), data_in_len=512)
    abi.U32.pack_into(k.mem, 128, 2048 | abi.OP_CMD)
    with pytest.raises(RingError, match="corrupt"):
        ring.process()


def test_handler_exception_still_answers_the_command() -> None:
    class Broken(Disk):
        def execute(
            self, cdb: bytes | memoryview, buf: DataBuffer, replayed: bool = False
        ) -> Result:
            raise ValueError("bug")

    k = LoopbackKernel()
    ring = Ring(k.mem, Broken())
    k.submit(rw(0x28, 0, 1), data_in_len=512)
    ring.process()
    (c,) = k.reap()
    assert c.status == CHECK_CONDITION and c.sense[2] == 0x04


def test_offsets_agree_with_declarations() -> None:
    """The constants the hot path and the loopback use are those of the construct layouts."""
    assert abi.Mailbox.sizeof() == abi.MAILBOX_TAIL_OFFSET + 4
    assert abi.EntryHeader.sizeof() == abi.HEADER.size
    assert abi.Iovec.sizeof() == abi.IOVEC.size
    assert 8 + abi.RESPONSE.size + abi.SENSE_BUFFERSIZE == abi.CMD_ENTRY_MIN
    tmr = abi.TmrEntry.build(
        Container(
            hdr=Container(len_op=40 | abi.OP_TMR, cmd_id=0, kflags=0, uflags=0),
            tmr_type=abi.TMR_ABORT_TASK,
            cmd_cnt=2,
            cmd_ids=[7, 9],
        )
    )
    assert len(tmr) == abi.TMR_IDS_OFFSET + 4
    assert tmr[abi.TMR_IDS_OFFSET :] == b"\x07\x00\x09\x00"
    k = LoopbackKernel()
    k.submit_tmr(abi.TMR_LUN_RESET, [3, 4, 5])
    parsed = abi.TmrEntry.parse(bytes(k.mem[128 : 128 + 48]))
    assert (parsed.tmr_type, list(parsed.cmd_ids)) == (abi.TMR_LUN_RESET, [3, 4, 5])


def test_workers_finishing_together_share_one_doorbell_and_none_is_left_unannounced() -> None:
    """Completions published while a worker is ringing are announced by it (again, once it is
    done), not one `write()` each; every command still reaches the initiator."""
    release = threading.Event()
    started = threading.Semaphore(0)

    class Gated(Disk):
        def execute(
            self, cdb: bytes | memoryview, buf: DataBuffer, replayed: bool = False
        ) -> Result:
            started.release()
            release.wait(10)
            return super().execute(cdb, buf, replayed)

    class Counting(LoopbackDevice):
        doorbells = 0

        def notify(self) -> None:
            self.doorbells += 1
            threading.Event().wait(0.05)  # a slow doorbell: the other workers finish meanwhile
            super().notify()

    k, disk = LoopbackKernel(flags=abi.FLAG_CAP_OOOC | abi.FLAG_CAP_READ_LEN), Gated()
    dev = Counting(k)
    try:
        with served(dev, disk, 8), ThreadPoolExecutor(8) as initiators:
            writes = [
                initiators.submit(dev.execute, rw(0x2A, i, 1), bytes([i]) * 512) for i in range(8)
            ]
            for _ in range(8):  # all eight running at once
                assert started.acquire(timeout=10)
            release.set()
            assert all(f.result().status == GOOD for f in writes)
    finally:
        release.set()
    assert dev.doorbells < 8


def test_an_idle_ring_sleeps_until_the_kernel_or_a_stop_wakes_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A daemon presents dozens of LUNs, most idle: an idle ring's thread must not wake on a
    timer (64 rings waking each second cost 5% of a vCPU), and a stop still ends it at once."""
    batches = []
    real = LoopbackDevice._batch

    def counted(self: LoopbackDevice, *args: object) -> bool:
        batches.append(1)
        return real(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(LoopbackDevice, "_batch", counted)
    dev = LoopbackDevice(LoopbackKernel())
    with served(dev, Disk()):
        assert dev.execute(rw(0x28, 0, 1), data_in_len=512).status == GOOD
        threading.Event().wait(0.1)
        idle_from = len(batches)
        threading.Event().wait(2.5)
        assert len(batches) == idle_from
