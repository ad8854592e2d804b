"""The logical unit: a pure function of CDB, data and volume state (sans-I/O).

`Lun.execute` never raises: every outcome is a `Result` with SAM status and sense data. It
touches nothing but the `Volume` it was given, so any transport — the TCMU ring, the loopback
ring in tests, a future iSCSI front end — can drive it.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import NamedTuple

from vscsi.scsi import cdb as C
from vscsi.scsi import sense
from vscsi.scsi.buffer import DataBuffer
from vscsi.scsi.commands import block, primary
from vscsi.scsi.identity import Identity
from vscsi.scsi.inquiry import VpdPages, standard
from vscsi.scsi.modes import ModePages, ModeState
from vscsi.scsi.result import CHECK_CONDITION, GOOD, Result
from vscsi.scsi.sense import SenseError
from vscsi.store.base import DirectIo, MediumError, NotReadyError, Volume, WriteProtectedError
from vscsi.store.locks import RegionLocks

log = logging.getLogger(__name__)

Handler = Callable[["Lun", bytes, DataBuffer], int]

# Where each opcode is handled. Opcodes with service actions (0x9E, 0xA3) pick the action in
# their handler. The kernel answers REPORT LUNS, PERSISTENT RESERVE IN/OUT and RESERVE/RELEASE.
HANDLERS: dict[int, Handler] = {
    0x00: primary.test_unit_ready,
    0x03: primary.request_sense,
    0x08: block.read6,
    0x0A: block.write6,
    0x12: primary.inquiry,
    0x15: primary.mode_select6,
    0x1A: primary.mode_sense6,
    0x1B: primary.start_stop_unit,
    0x1E: primary.prevent_allow,
    0x25: block.read_capacity10,
    0x28: block.read10,
    0x2A: block.write10,
    0x2E: block.write_verify10,
    0x2F: block.verify10,
    0x35: block.sync10,
    0x41: block.write_same10,
    0x42: block.unmap,
    0x55: primary.mode_select10,
    0x5A: primary.mode_sense10,
    0x88: block.read16,
    0x89: block.compare_and_write,
    0x8A: block.write16,
    0x8E: block.write_verify16,
    0x8F: block.verify16,
    0x91: block.sync16,
    0x93: block.write_same16,
    0x9E: block.service_action_in,
    0xA3: primary.report_opcodes,
    0xA8: block.read12,
    0xAA: block.write12,
}

# Commands served again after a daemon restart (they were still in the ring, maybe already run)
# whose fresh semantics are not idempotent: these handlers accept their own earlier effect.
REPLAY_HANDLERS: dict[int, Handler] = {
    0x89: block.compare_and_write_replayed,
}

# Commands a pending unit attention does not block (SAM-5 §5.14, SPC-4 §5.14).
UA_EXEMPT = frozenset({0x12, 0x03, 0xA0})
# Commands that change the medium or flush it: WRITE(6/10/12/16), WRITE AND VERIFY(10/16),
# WRITE SAME(10/16), UNMAP, COMPARE AND WRITE, SYNCHRONIZE CACHE(10/16).
CHANGES = frozenset({0x0A, 0x2A, 0xAA, 0x8A, 0x2E, 0x8E, 0x41, 0x93, 0x42, 0x89, 0x35, 0x91})


def _mask(c: C.Cdb) -> int:
    """Bits of the CDB that must be zero: everything outside the usage data but the opcode."""
    usage = bytearray(c.usage)
    usage[0] = 0xFF
    return ~int.from_bytes(usage, "big") & ((1 << (8 * c.size)) - 1)


class _Entry(NamedTuple):
    handler: Handler
    size: int  # CDB length; 0 when the service action decides (checked per action)
    mask: int


def _dispatch_table() -> list[_Entry | None]:
    """Opcode-indexed list: one index operation per command on the hot path."""
    table: list[_Entry | None] = [None] * 256
    for op, handler in HANDLERS.items():
        c = C.lookup(op)
        if c is None or c.service_action is not None:
            table[op] = _Entry(handler, 0, 0)
        else:
            table[op] = _Entry(handler, c.size, _mask(c))
    return table


_DISPATCH = _dispatch_table()


def _check_fields(cdb: bytes, size: int, mask: int) -> None:
    """Reserved or unsupported bits set → 05/24/00 pointing at the first such byte and bit."""
    if len(cdb) < size:
        raise sense.invalid_cdb(len(cdb))
    bad = int.from_bytes(cdb[:size], "big") & mask
    if bad:
        raw = bad.to_bytes(size, "big")
        byte = next(i for i, b in enumerate(raw) if b)
        raise sense.invalid_cdb(byte, raw[byte].bit_length() - 1)


_SERVICE_ACTIONS = {
    (c.opcode, c.service_action): (c.size, _mask(c))
    for c in C.COMMANDS
    if c.service_action is not None
}


# READ(10), WRITE(10), READ(16), WRITE(16): what a transport's compiled path may serve itself
# (see `Lun.direct`), each with the CDB bits the core refuses, as 16 bytes.
FAST_OPCODES = (0x28, 0x2A, 0x88, 0x8A)


def _fast_mask(op: int) -> bytes:
    entry = _DISPATCH[op]
    assert entry is not None
    return entry.mask.to_bytes(entry.size, "big").ljust(16, b"\0")


FAST_MASKS = tuple(_fast_mask(op) for op in FAST_OPCODES)


class FastPath(NamedTuple):
    """READ/WRITE(10/16) as plain data movement (see `Lun.direct`)."""

    io: DirectIo
    block_size: int
    blocks: int
    max_blocks: int


def _check_service_action(cdb: bytes) -> None:
    """An unknown service action is an invalid field (byte 1, bits 4-0), not an opcode."""
    spec = _SERVICE_ACTIONS.get((cdb[0], cdb[1] & 0x1F if len(cdb) > 1 else -1))
    if spec is None:
        raise sense.invalid_cdb(1, 4)
    _check_fields(cdb, *spec)


class Lun:
    """One emulated logical unit over a volume."""

    def __init__(
        self,
        volume: Volume,
        identity: Identity,
        *,
        vendor_pages: Mapping[int, Callable[[], bytes]] | None = None,
        max_transfer_blocks: int | None = None,
    ) -> None:
        self.volume = volume
        self.identity = identity
        self.block_size = volume.block_size
        self.max_transfer_blocks = max_transfer_blocks or (8 << 20) // volume.block_size
        self.vpd = VpdPages(identity, volume, self.max_transfer_blocks, vendor_pages)
        self.mode_state = ModeState()
        self.modes = ModePages(volume, self.mode_state)
        self.standard_inquiry = standard(identity)
        self.ranges = RegionLocks()  # a COMPARE AND WRITE and a write to its blocks never mix
        self._ua: deque[tuple[int, int]] = deque()
        self._ua_lock = threading.Lock()

    @property
    def blocks(self) -> int:
        return self.volume.size // self.block_size

    # -- unit attentions ----------------------------------------------------------------------

    def add_unit_attention(self, asc: int, ascq: int) -> None:
        with self._ua_lock:
            if (asc, ascq) not in self._ua:
                self._ua.append((asc, ascq))

    def pop_unit_attention(self) -> tuple[int, int] | None:
        with self._ua_lock:
            return self._ua.popleft() if self._ua else None

    def reset(self) -> None:
        """LUN reset (a TMR from the initiator): report it to the next command."""
        self.add_unit_attention(*sense.BUS_DEVICE_RESET_FUNCTION_OCCURRED)

    # -- execution -------------------------------------------------------------------------------

    def waits(self, cdb: bytes) -> bool:
        """Whether this command may wait on a peer array: a change to a volume that mirrors
        to one (see `CommandHandler.waits`)."""
        return bool(cdb) and cdb[0] in CHANGES and getattr(self.volume, "waits_on_peer", False)

    @contextmanager
    def direct(self) -> Iterator[FastPath | None]:
        """While held, a READ or WRITE(10/16) whose CDB passes `FAST_MASKS`, whose blocks lie
        within `blocks` and `max_blocks` and whose data is exactly its blocks comes out GOOD
        from plain data movement on the volume's descriptors — so a transport may move it
        itself. Anything else (a field the core refuses, a range it answers with sense, an
        error) the transport must `execute`. None while a unit attention is pending or the
        volume does not hand out descriptors now."""
        direct = getattr(self.volume, "direct", None)
        if self._ua or direct is None:
            yield None
            return
        with direct() as io:
            bs = self.block_size
            yield None if io is None else FastPath(io, bs, self.blocks, self.max_transfer_blocks)

    def supports(self, c: C.Cdb) -> bool:
        """Whether this LUN implements `c` (UNMAP only over a volume that deallocates)."""
        return c.opcode != 0x42 or self.volume.supports_unmap

    def execute(self, cdb: bytes | memoryview, buf: DataBuffer, replayed: bool = False) -> Result:
        """Run one command; every outcome, errors included, is a Result.

        `replayed`: the transport may already have run this very command before a restart
        (see REPLAY_HANDLERS); it says so, the LUN never asks.
        """
        if type(cdb) is not bytes:
            cdb = bytes(cdb)
        try:
            return Result(GOOD, b"", self._dispatch(cdb, buf, replayed))
        except SenseError as e:
            return self._fail(e)
        except MediumError as e:
            code = sense.UNRECOVERED_READ_ERROR if e.op == "read" else sense.WRITE_ERROR
            lba = e.offset // self.block_size
            return self._fail(SenseError(sense.MEDIUM_ERROR, code, info=lba))
        except NotReadyError as e:
            return self._fail(SenseError(sense.NOT_READY, (e.asc, e.ascq)))
        except WriteProtectedError:
            return self._fail(SenseError(sense.DATA_PROTECT, sense.WRITE_PROTECTED))
        except Exception:
            log.exception("internal error executing CDB %s", cdb.hex())
            return self._fail(SenseError(sense.HARDWARE_ERROR, sense.INTERNAL_TARGET_FAILURE))

    def _dispatch(self, cdb: bytes, buf: DataBuffer, replayed: bool) -> int:
        if not cdb:
            raise sense.invalid_cdb(0)
        op = cdb[0]
        if self._ua and op not in UA_EXEMPT:  # reported before the CDB is even looked at
            ua = self.pop_unit_attention()
            if ua is not None:
                raise SenseError(sense.UNIT_ATTENTION, ua)
        entry = _DISPATCH[op]
        if entry is None:
            raise SenseError(sense.ILLEGAL_REQUEST, sense.INVALID_COMMAND_OPERATION_CODE)
        if entry.size:
            _check_fields(cdb, entry.size, entry.mask)
        else:
            _check_service_action(cdb)
        if replayed:
            return REPLAY_HANDLERS.get(op, entry.handler)(self, cdb, buf)
        return entry.handler(self, cdb, buf)

    def _fail(self, e: SenseError) -> Result:
        return Result(CHECK_CONDITION, e.encode(self.mode_state.d_sense), 0)
