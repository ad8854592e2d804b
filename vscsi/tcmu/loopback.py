"""The kernel's half of a TCMU ring, in process: the loopback transport.

`LoopbackKernel` lays out the same map as target_core_user (mailbox, command ring, data area),
queues CMD/PAD/TMR entries and reaps completions the way the kernel does, so the real `Ring`
runs unmodified under test on any machine. `LoopbackDevice` gives it the uio device's doorbells
(a pipe each way), so `RingDevice.serve` runs against it in a thread too.
"""

from __future__ import annotations

import mmap
import os
import threading
from dataclasses import dataclass, field

from vscsi.scsi.result import CHECK_CONDITION
from vscsi.tcmu import abi
from vscsi.tcmu._ring_c import ffi, lib
from vscsi.tcmu.uio import RingDevice

CMDR_OFF = 128
BLOCK = 4096


@dataclass
class Completion:
    """What the initiator gets back for one command."""

    cmd_id: int
    status: int
    sense: bytes
    data: bytes
    read_len: int | None = None


@dataclass
class _Pending:
    blocks: list[int]
    data_in_len: int
    done: threading.Event = field(default_factory=threading.Event)
    completion: Completion | None = None


def _align(n: int) -> int:
    return (n + abi.ENTRY_ALIGN - 1) & ~(abi.ENTRY_ALIGN - 1)


class LoopbackKernel:
    """Plays target_core_user: submits commands into the ring and reaps their completions."""

    def __init__(
        self,
        cmdr_size: int = 16 << 10,
        data_size: int = 1 << 20,
        flags: int = abi.FLAG_CAP_READ_LEN | abi.FLAG_CAP_TMR,
    ) -> None:
        self.cmdr_size = cmdr_size
        self.data_off = CMDR_OFF + cmdr_size
        self.mem = mmap.mmap(-1, self.data_off + data_size)
        abi.MAILBOX_HEAD.pack_into(self.mem, 0, abi.MAILBOX_VERSION, flags, CMDR_OFF, cmdr_size, 0)
        abi.U32.pack_into(self.mem, abi.MAILBOX_TAIL_OFFSET, 0)
        self.head = 0
        self.last_cleaned = 0
        self.free_blocks = list(range(data_size // BLOCK))
        self.pending: dict[int, _Pending] = {}
        self.completions: dict[int, Completion] = {}
        self._ids = iter(range(1, 1 << 30))
        self.lock = threading.Lock()
        self.pads = 0

    # -- submitting ---------------------------------------------------------------------------

    def ring_free(self) -> int:
        used = (self.head - self.last_cleaned) % self.cmdr_size
        return self.cmdr_size - used - abi.ENTRY_ALIGN  # never fill up: head == tail is empty

    def submit(self, cdb: bytes, data_out: bytes = b"", data_in_len: int = 0) -> int | None:
        """Queue one command; None when the ring or the data area is full (the kernel waits)."""
        with self.lock:
            length = len(data_out) or data_in_len
            nblocks = -(-length // BLOCK)
            size = _align(abi.cmd_base_size(nblocks) + len(cdb))
            if nblocks > len(self.free_blocks) or not self._make_room(size):
                return None
            # Take blocks from both ends so the iovs are scattered: the gather path is tested.
            blocks = [self.free_blocks.pop(-1 if i % 2 else 0) for i in range(nblocks)]
            cmd_id = next(self._ids) & 0xFFFF or next(self._ids)
            self._write_cmd(cmd_id, cdb, data_out, length, blocks, size)
            self.pending[cmd_id] = _Pending(blocks, data_in_len)
            return cmd_id

    def _make_room(self, size: int) -> bool:
        to_end = self.cmdr_size - self.head
        if size > to_end:  # the entry would cross the end: pad to the start of the ring
            if self.ring_free() < to_end + size:
                return False
            self._write_header(self.head, to_end, abi.OP_PAD, 0)
            self.pads += 1
            self._advance(to_end)
        return self.ring_free() >= size

    def _write_header(self, pos: int, length: int, op: int, cmd_id: int) -> None:
        abi.HEADER.pack_into(self.mem, CMDR_OFF + pos, length | op, cmd_id, 0, 0)

    def _advance(self, n: int) -> None:
        self.head = (self.head + n) % self.cmdr_size
        # one 4-byte release store, as the kernel's: struct writes byte by byte, and the
        # compiled path, which reads cmd_head while this runs, saw torn values
        with ffi.from_buffer(self.mem, require_writable=True) as mem:  # released: the map
            lib.ring_store_release_u32(mem, 12, self.head)  # may be closed at any time

    def _write_cmd(
        self, cmd_id: int, cdb: bytes, data: bytes, length: int, blocks: list[int], size: int
    ) -> None:
        ent = CMDR_OFF + self.head
        self.mem[ent : ent + size] = bytes(size)  # as queue_cmd_ring: the ring reads zeros
        self._write_header(self.head, size, abi.OP_CMD, cmd_id)
        cdb_off = ent + abi.cmd_base_size(len(blocks))
        abi.CMD_COUNTS.pack_into(self.mem, ent + 8, len(blocks), 0, 0, cdb_off)
        left = length
        for i, b in enumerate(blocks):
            base = self.data_off + b * BLOCK
            n = min(BLOCK, left)
            abi.IOVEC.pack_into(self.mem, ent + abi.CMD_IOV_OFFSET + 16 * i, base, n)
            chunk = data[length - left : length - left + n]
            self.mem[base : base + len(chunk)] = chunk
            left -= n
        self.mem[cdb_off : cdb_off + len(cdb)] = cdb
        self._advance(size)

    def submit_tmr(self, tmr_type: int, cmd_ids: list[int]) -> bool:
        with self.lock:
            size = _align(abi.TMR_IDS_OFFSET + 2 * len(cmd_ids))
            if not self._make_room(size):
                return False
            ent = CMDR_OFF + self.head
            self._write_header(self.head, size, abi.OP_TMR, 0)
            self.mem[ent + 8] = tmr_type
            abi.U32.pack_into(self.mem, ent + 12, len(cmd_ids))
            for i, c in enumerate(cmd_ids):
                self.mem[ent + 32 + 2 * i : ent + 34 + 2 * i] = c.to_bytes(2, "little")
            self._advance(size)
            return True

    # -- reaping ----------------------------------------------------------------------------------

    def reap(self) -> list[Completion]:
        """What the kernel does when notified: walk from the last cleaned entry to cmd_tail."""
        out = []
        with self.lock:
            tail = abi.U32.unpack_from(self.mem, abi.MAILBOX_TAIL_OFFSET)[0]
            while self.last_cleaned != tail:
                ent = CMDR_OFF + self.last_cleaned
                len_op, cmd_id, _kf, uflags = abi.HEADER.unpack_from(self.mem, ent)
                if len_op & abi.OP_MASK == abi.OP_CMD:
                    out.append(self._complete(ent, cmd_id, uflags))
                self.last_cleaned = (self.last_cleaned + (len_op & ~abi.OP_MASK)) % self.cmdr_size
        return out

    def _complete(self, ent: int, cmd_id: int, uflags: int) -> Completion:
        p = self.pending.pop(cmd_id)
        status, read_len = abi.RESPONSE.unpack_from(self.mem, ent + 8)
        # the kernel takes sense with CHECK CONDITION only (tcmu_handle_completion)
        sense = b""
        if status == CHECK_CONDITION:
            sense = bytes(self.mem[ent + 16 : ent + 16 + abi.SENSE_BUFFERSIZE])
        has_len = bool(uflags & abi.UFLAG_READ_LEN)
        n = min(read_len, p.data_in_len) if has_len else p.data_in_len
        data = b"".join(
            bytes(self.mem[self.data_off + b * BLOCK : self.data_off + (b + 1) * BLOCK])
            for b in p.blocks
        )[:n]
        self.free_blocks.extend(p.blocks)
        c = Completion(cmd_id, status, sense, data, read_len if has_len else None)
        self.completions[cmd_id] = c
        p.completion = c
        p.done.set()
        return c


class LoopbackDevice(RingDevice):
    """A `LoopbackKernel` behind uio-style doorbells, for `RingDevice.serve` in a thread."""

    def __init__(self, kernel: LoopbackKernel) -> None:
        self.kernel = kernel
        irq_r, self._irq_w = os.pipe2(os.O_CLOEXEC)
        super().__init__("loopback", irq_r, kernel.mem)
        self.events: dict[int, _Pending] = {}
        # The compiled path rings with a write() from C: the kernel's side reaps in a thread.
        self._bell_r, self.doorbell_fd = os.pipe2(os.O_CLOEXEC)
        self._reaper = threading.Thread(target=self._reap_on_doorbells, daemon=True)
        self._reaper.start()

    def _reap_on_doorbells(self) -> None:
        while os.read(self._bell_r, 4096):
            self.kernel.reap()

    def ring_doorbell(self) -> None:
        """The kernel's side: tell the daemon there is work (uio_event_notify)."""
        os.write(self._irq_w, b"\1\0\0\0")

    def notify(self) -> None:
        self.kernel.reap()  # the daemon's doorbell: the kernel reaps at once

    def execute(
        self, cdb: bytes, data_out: bytes = b"", data_in_len: int = 0, timeout: float = 10
    ) -> Completion:
        """Submit one command and wait for its completion (a synchronous initiator)."""
        while True:
            cmd_id = self.kernel.submit(cdb, data_out, data_in_len)
            if cmd_id is not None:
                break
            threading.Event().wait(0.001)
        with self.kernel.lock:  # a spinning server may have answered it already
            pending = self.kernel.pending.get(cmd_id)
            if pending is None:
                return self.kernel.completions[cmd_id]
        self.ring_doorbell()
        if not pending.done.wait(timeout):
            raise TimeoutError(f"command {cmd_id} not completed in {timeout}s")
        assert pending.completion is not None
        return pending.completion

    def close(self) -> None:
        super().close()
        os.close(self._irq_w)
        os.close(self.doorbell_fd)  # the reaper reads end of file and ends
        self._reaper.join(5)
        os.close(self._bell_r)
