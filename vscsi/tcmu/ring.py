"""The TCMU command ring, served from userspace.

`Ring` works on any writable buffer laid out like the uio map — the kernel's (through
`vscsi.tcmu.uio`) or the in-process loopback's — so the same code runs under test everywhere.
Commands are completed in ring order, in place: the kernel walks from its last cleaned entry
up to `cmd_tail` and finds each command by the id in the entry header. The ring starts from
the mailbox's current `cmd_tail`, so a daemon that re-opens a device after a crash serves the
commands that were queued while it was gone.
"""

from __future__ import annotations

import logging
from typing import Protocol

from vscsi.scsi.buffer import DataBuffer
from vscsi.scsi.result import CHECK_CONDITION, GOOD, Result
from vscsi.tcmu import abi

log = logging.getLogger(__name__)

# HARDWARE ERROR / INTERNAL TARGET FAILURE (04/44/00), fixed format, for entries we cannot use.
_BAD_ENTRY_SENSE = bytes([0x70, 0, 0x04, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x44, 0x00, 0, 0, 0, 0])
_CDB_SIZE = (6, 10, 10, 16, 16, 12, 16, 16)  # by group code (opcode >> 5)
_MAILBOX_HEAD = 12


class CommandHandler(Protocol):
    """What serves the commands: the SCSI core's `Lun`."""

    def execute(self, cdb: bytes | memoryview, buf: DataBuffer) -> Result: ...

    def reset(self) -> None: ...


class RingError(Exception):
    """The ring itself is unusable (bad mailbox, corrupt entry header): stop serving it."""


def cdb_length(opcode: int, mem: memoryview, cdb_off: int) -> int:
    """The length of the CDB at `cdb_off` (variable-length CDBs carry their own)."""
    if opcode == 0x7F:
        return 8 + mem[cdb_off + 7]
    return _CDB_SIZE[opcode >> 5]


class Ring:
    """One device's command ring over its shared memory."""

    def __init__(self, mem: memoryview | bytearray, handler: CommandHandler) -> None:
        self.mem = memoryview(mem).cast("B")
        self.handler = handler
        version, flags, cmdr_off, cmdr_size, _head = abi.MAILBOX_HEAD.unpack_from(self.mem, 0)
        if version != abi.MAILBOX_VERSION:
            raise RingError(f"mailbox version {version}, expected {abi.MAILBOX_VERSION}")
        if cmdr_off < abi.MAILBOX_TAIL_OFFSET + 4 or cmdr_off + cmdr_size > len(self.mem):
            raise RingError(
                f"command ring {cmdr_off}+{cmdr_size} outside the {len(self.mem)}-byte map"
            )
        self.flags = flags
        self.cmdr_off = cmdr_off
        self.cmdr_size = cmdr_size
        self.data_off = cmdr_off + cmdr_size
        self.read_len = bool(flags & abi.FLAG_CAP_READ_LEN)
        self.commands = 0
        self.bad_entries = 0
        self._iov_total = 0

    @property
    def tail(self) -> int:
        return abi.U32.unpack_from(self.mem, abi.MAILBOX_TAIL_OFFSET)[0]

    @property
    def head(self) -> int:
        return abi.U32.unpack_from(self.mem, _MAILBOX_HEAD)[0]

    def pending(self) -> bool:
        return self.head != self.tail

    def process(self) -> int:
        """Serve every entry between cmd_tail and cmd_head; returns how many were consumed.

        The caller notifies the kernel once afterwards when the count is non-zero.
        """
        mem = self.mem
        size = self.cmdr_size
        tail = self.tail
        done = 0
        head = self.head
        while tail != head:
            if head >= size or tail >= size:
                raise RingError(f"ring pointers out of range: head {head} tail {tail} size {size}")
            ent = self.cmdr_off + tail
            len_op = abi.U32.unpack_from(mem, ent)[0]
            length = len_op & ~abi.OP_MASK
            if length == 0 or length % abi.ENTRY_ALIGN or tail + length > size:
                raise RingError(f"corrupt entry at {tail}: length {length}")
            op = len_op & abi.OP_MASK
            if op == abi.OP_CMD:
                if length < abi.CMD_ENTRY_MIN:
                    raise RingError(f"command entry at {tail} too short for a response: {length}")
                self._command(ent, length)
            elif op == abi.OP_TMR:
                self._tmr(ent, length)
            elif op != abi.OP_PAD:
                log.warning("ring entry at %d has unknown opcode %d; skipped", tail, op)
            tail = (tail + length) % size
            abi.U32.pack_into(mem, abi.MAILBOX_TAIL_OFFSET, tail)
            done += 1
            if tail == head:
                head = self.head  # more may have arrived while we worked: batch them
        return done

    def _command(self, ent: int, length: int) -> None:
        mem = self.mem
        iov_cnt, bidi, dif, cdb_off = abi.CMD_COUNTS.unpack_from(mem, ent + 8)
        iovs_end = ent + abi.CMD_IOV_OFFSET + 16 * (iov_cnt + bidi + dif)
        if iovs_end > ent + length or not self.cmdr_off <= cdb_off < self.data_off:
            self._respond(ent, Result(CHECK_CONDITION, _BAD_ENTRY_SENSE), 0)
            self.bad_entries += 1
            return
        opcode = mem[cdb_off]
        n = cdb_length(opcode, mem, cdb_off)
        if cdb_off + n > self.data_off:
            self._respond(ent, Result(CHECK_CONDITION, _BAD_ENTRY_SENSE), 0)
            self.bad_entries += 1
            return
        cdb = bytes(mem[cdb_off : cdb_off + n])
        views = self._iovs(ent, iov_cnt)
        if views is None:
            self._respond(ent, Result(CHECK_CONDITION, _BAD_ENTRY_SENSE), 0)
            self.bad_entries += 1
            return
        buf = DataBuffer(views, self._iov_total)
        result = self.handler.execute(cdb, buf)
        self.commands += 1
        self._respond(ent, result, buf.length)

    def _iovs(self, ent: int, count: int) -> list[memoryview] | None:
        mem = self.mem
        end = len(mem)
        views = []
        total = 0
        pos = ent + abi.CMD_IOV_OFFSET
        for _ in range(count):
            base, ln = abi.IOVEC.unpack_from(mem, pos)
            if base < self.data_off or base + ln > end:
                return None
            views.append(mem[base : base + ln])
            total += ln
            pos += 16
        self._iov_total = total
        return views

    def _respond(self, ent: int, result: Result, buf_len: int) -> None:
        mem = self.mem
        read_len = 0
        if self.read_len and result.status == GOOD and 0 < result.data_len < buf_len:
            read_len = result.data_len
            mem[ent + 7] |= abi.UFLAG_READ_LEN
        abi.RESPONSE.pack_into(mem, ent + 8, result.status, read_len)
        if result.status != GOOD:
            sense = result.sense[: abi.SENSE_BUFFERSIZE]
            mem[ent + 16 : ent + 16 + abi.SENSE_BUFFERSIZE] = sense.ljust(
                abi.SENSE_BUFFERSIZE, b"\0"
            )

    def _tmr(self, ent: int, length: int) -> None:
        """Task management: every command before this entry is already complete (we serve in
        order), so an abort finds nothing to abort; a LUN or target reset resets the LUN."""
        tmr_type = self.mem[ent + 8]
        if tmr_type in (abi.TMR_LUN_RESET, abi.TMR_TARGET_WARM_RESET, abi.TMR_TARGET_COLD_RESET):
            self.handler.reset()
