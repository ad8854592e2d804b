"""The logical unit: a pure function of CDB, data and volume state (sans-I/O).

`Lun.execute` never raises: every outcome is a `Result` with SAM status and sense data. It
touches nothing but the `Volume` it was given, so any transport — the TCMU ring, the loopback
ring in tests, a future iSCSI front end — can drive it.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Mapping

from vscsi.scsi import cdb as C
from vscsi.scsi import sense
from vscsi.scsi.buffer import DataBuffer
from vscsi.scsi.commands import block, primary
from vscsi.scsi.identity import Identity
from vscsi.scsi.inquiry import VpdPages, standard
from vscsi.scsi.modes import ModePages, ModeState
from vscsi.scsi.result import CHECK_CONDITION, GOOD, Result
from vscsi.scsi.sense import SenseError
from vscsi.store.base import MediumError, NotReadyError, Volume, WriteProtectedError

log = logging.getLogger(__name__)

Handler = Callable[["Lun", bytes, DataBuffer], int]

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
    0xA3: primary.maintenance_in,
    0xA8: block.read12,
    0xAA: block.write12,
}

# Commands a pending unit attention does not block (SAM-5 §5.14, SPC-4 §5.14).
UA_EXEMPT = frozenset({0x12, 0x03, 0xA0})


def _reserved_masks() -> list[tuple[int, int] | None]:
    """Per opcode: (CDB length, bits that must be zero) from the usage data in cdb.py."""
    table: list[tuple[int, int] | None] = [None] * 256
    for c in C.COMMANDS:
        if c.service_action is not None:
            continue  # checked by the service-action handler against its own usage data
        usage = bytearray(c.usage)
        usage[0] = 0xFF
        table[c.opcode] = (c.size, ~int.from_bytes(usage, "big") & ((1 << (8 * c.size)) - 1))
    return table


_RESERVED = _reserved_masks()


def _field_pointer(cdb: bytes, size: int, bad: int) -> SenseError:
    raw = bad.to_bytes(size, "big")
    byte = next(i for i, b in enumerate(raw) if b)
    return sense.invalid_cdb(byte, raw[byte].bit_length() - 1)


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
        self.write_lock = threading.Lock()
        self._ua: deque[tuple[int, int]] = deque()
        self._ua_lock = threading.Lock()
        self.commands = 0
        self.errors = 0

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

    def check_ready(self) -> None:
        """TEST UNIT READY asks the volume stack (pair states may make a volume not ready)."""
        ready = getattr(self.volume, "check_ready", None)
        if ready is not None:
            ready()

    # -- execution -------------------------------------------------------------------------------

    def execute(self, cdb: bytes | memoryview, buf: DataBuffer) -> Result:
        if not isinstance(cdb, bytes):
            cdb = bytes(cdb)
        self.commands += 1
        try:
            return Result(GOOD, b"", self._dispatch(cdb, buf))
        except SenseError as e:
            return self._fail(e)
        except MediumError as e:
            key, code = (
                (sense.MEDIUM_ERROR, sense.UNRECOVERED_READ_ERROR)
                if e.op == "read"
                else (sense.MEDIUM_ERROR, sense.WRITE_ERROR)
            )
            return self._fail(SenseError(key, code, info=e.offset // self.block_size))
        except NotReadyError as e:
            return self._fail(SenseError(sense.NOT_READY, (e.asc, e.ascq)))
        except WriteProtectedError:
            return self._fail(SenseError(sense.DATA_PROTECT, sense.WRITE_PROTECTED))
        except Exception:
            log.exception("internal error executing CDB %s", cdb.hex())
            return self._fail(SenseError(sense.HARDWARE_ERROR, sense.INTERNAL_TARGET_FAILURE))

    def _dispatch(self, cdb: bytes, buf: DataBuffer) -> int:
        if not cdb:
            raise sense.invalid_cdb(0)
        op = cdb[0]
        handler = HANDLERS.get(op)
        if handler is None:
            raise SenseError(sense.ILLEGAL_REQUEST, sense.INVALID_COMMAND_OPERATION_CODE)
        if op not in UA_EXEMPT and self._ua:
            ua = self.pop_unit_attention()
            if ua is not None:
                raise SenseError(sense.UNIT_ATTENTION, ua)
        self._check_reserved(op, cdb)
        return handler(self, cdb, buf)

    def _check_reserved(self, op: int, cdb: bytes) -> None:
        spec = _RESERVED[op]
        if spec is None:
            self._check_service_action(op, cdb)
            return
        size, mask = spec
        if len(cdb) < size:
            raise sense.invalid_cdb(len(cdb))
        bad = int.from_bytes(cdb[:size], "big") & mask
        if bad:
            raise _field_pointer(cdb, size, bad)

    def _check_service_action(self, op: int, cdb: bytes) -> None:
        c = C.lookup(op, cdb[1] & 0x1F if len(cdb) > 1 else None)
        if c is None:
            raise sense.invalid_cdb(1, 4)
        usage = bytearray(c.usage)
        usage[0] = 0xFF
        if len(cdb) < c.size:
            raise sense.invalid_cdb(len(cdb))
        mask = ~int.from_bytes(usage, "big") & ((1 << (8 * c.size)) - 1)
        bad = int.from_bytes(cdb[: c.size], "big") & mask
        if bad:
            raise _field_pointer(cdb, c.size, bad)

    def _fail(self, e: SenseError) -> Result:
        self.errors += 1
        return Result(CHECK_CONDITION, e.encode(self.mode_state.d_sense), 0)
