"""Every CDB we accept, declared once with construct: parse in the target, build in tests.

Each `Cdb` also carries its CDB usage data (the bits a client may set, SPC-4 §6.35.3), which
REPORT SUPPORTED OPERATION CODES returns and the target uses to reject reserved bits.
READ/WRITE(10/16) have derived `struct` decoders for the hot path; a unit test checks them
against these declarations.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from construct import (
    BitsInteger,
    BitStruct,
    Construct,
    Flag,
    Int8ub,
    Int16ub,
    Int32ub,
    Int64ub,
    Padding,
    Struct,
)

Op = "opcode" / Int8ub
Control = "control" / Int8ub
SA = BitStruct(Padding(3), "service_action" / BitsInteger(5))

TestUnitReady = Struct(Op, Padding(4), Control)
RequestSense = Struct(
    Op, "b1" / BitStruct(Padding(7), "desc" / Flag), Padding(2), "alloc_len" / Int8ub, Control
)
Inquiry = Struct(
    Op,
    "b1" / BitStruct(Padding(6), "cmddt" / Flag, "evpd" / Flag),
    "page_code" / Int8ub,
    "alloc_len" / Int16ub,
    Control,
)
ModeSense6 = Struct(
    Op,
    "b1" / BitStruct(Padding(4), "dbd" / Flag, Padding(3)),
    "b2" / BitStruct("pc" / BitsInteger(2), "page" / BitsInteger(6)),
    "subpage" / Int8ub,
    "alloc_len" / Int8ub,
    Control,
)
ModeSense10 = Struct(
    Op,
    "b1" / BitStruct(Padding(3), "llbaa" / Flag, "dbd" / Flag, Padding(3)),
    "b2" / BitStruct("pc" / BitsInteger(2), "page" / BitsInteger(6)),
    "subpage" / Int8ub,
    Padding(3),
    "alloc_len" / Int16ub,
    Control,
)
ModeSelect6 = Struct(
    Op,
    "b1" / BitStruct(Padding(3), "pf" / Flag, Padding(3), "sp" / Flag),
    Padding(2),
    "param_len" / Int8ub,
    Control,
)
ModeSelect10 = Struct(
    Op,
    "b1" / BitStruct(Padding(3), "pf" / Flag, Padding(3), "sp" / Flag),
    Padding(5),
    "param_len" / Int16ub,
    Control,
)
ReadCapacity10 = Struct(
    Op, Padding(1), "lba" / Int32ub, Padding(2), "b8" / BitStruct(Padding(7), "pmi" / Flag), Control
)
ServiceActionIn16 = Struct(
    Op, "b1" / SA, "lba" / Int64ub, "alloc_len" / Int32ub, "b14" / Int8ub, Control
)
RwFlags = BitStruct(
    "protect" / BitsInteger(3),
    "dpo" / Flag,
    "fua" / Flag,
    "b1_bit2" / Flag,
    "b1_bit1" / Flag,
    "b1_bit0" / Flag,
)
Rw6 = Struct(
    Op,
    "b1" / BitStruct(Padding(3), "lba_hi" / BitsInteger(5)),
    "lba_lo" / Int16ub,
    "length" / Int8ub,
    Control,
)
Rw10 = Struct(Op, "b1" / RwFlags, "lba" / Int32ub, "group" / Int8ub, "length" / Int16ub, Control)
Rw12 = Struct(Op, "b1" / RwFlags, "lba" / Int32ub, "length" / Int32ub, "group" / Int8ub, Control)
Rw16 = Struct(Op, "b1" / RwFlags, "lba" / Int64ub, "length" / Int32ub, "group" / Int8ub, Control)
VerifyFlags = BitStruct(
    "protect" / BitsInteger(3), "dpo" / Flag, Padding(1), "bytchk" / BitsInteger(2), Padding(1)
)
Verify10 = Struct(
    Op, "b1" / VerifyFlags, "lba" / Int32ub, "group" / Int8ub, "length" / Int16ub, Control
)
Verify16 = Struct(
    Op, "b1" / VerifyFlags, "lba" / Int64ub, "length" / Int32ub, "group" / Int8ub, Control
)
SyncFlags = BitStruct(Padding(5), "sync_nv" / Flag, "immed" / Flag, Padding(1))
SyncCache10 = Struct(
    Op, "b1" / SyncFlags, "lba" / Int32ub, "group" / Int8ub, "length" / Int16ub, Control
)
SyncCache16 = Struct(
    Op, "b1" / SyncFlags, "lba" / Int64ub, "length" / Int32ub, "group" / Int8ub, Control
)
WsFlags = BitStruct(
    "protect" / BitsInteger(3),
    "anchor" / Flag,
    "unmap" / Flag,
    "pbdata" / Flag,
    "lbdata" / Flag,
    "ndob" / Flag,
)
WriteSame10 = Struct(
    Op, "b1" / WsFlags, "lba" / Int32ub, "group" / Int8ub, "length" / Int16ub, Control
)
WriteSame16 = Struct(
    Op, "b1" / WsFlags, "lba" / Int64ub, "length" / Int32ub, "group" / Int8ub, Control
)
Unmap = Struct(
    Op,
    "b1" / BitStruct(Padding(7), "anchor" / Flag),
    Padding(4),
    "group" / Int8ub,
    "param_len" / Int16ub,
    Control,
)
CompareAndWrite = Struct(
    Op, "b1" / RwFlags, "lba" / Int64ub, Padding(3), "nblocks" / Int8ub, "group" / Int8ub, Control
)
StartStopUnit = Struct(
    Op,
    "b1" / BitStruct(Padding(7), "immed" / Flag),
    Padding(1),
    "b3" / Int8ub,
    "b4"
    / BitStruct(
        "power_condition" / BitsInteger(4),
        Padding(1),
        "no_flush" / Flag,
        "loej" / Flag,
        "start" / Flag,
    ),
    Control,
)
PreventAllow = Struct(
    Op, Padding(3), "b4" / BitStruct(Padding(6), "prevent" / BitsInteger(2)), Control
)
ReportOpcodes = Struct(
    Op,
    "b1" / SA,
    "b2" / BitStruct("rctd" / Flag, Padding(4), "options" / BitsInteger(3)),
    "req_opcode" / Int8ub,
    "req_sa" / Int16ub,
    "alloc_len" / Int32ub,
    Padding(1),
    Control,
)

# Unmap parameter list (SBC-3 §5.28.2).
UnmapHeader = Struct("data_len" / Int16ub, "desc_len" / Int16ub, Padding(4))
UnmapDescriptor = Struct("lba" / Int64ub, "nblocks" / Int32ub, Padding(4))


@dataclass(frozen=True)
class Cdb:
    """One command: its opcode (and service action), declaration and CDB usage data."""

    name: str
    opcode: int
    decl: Construct
    usage: bytes
    service_action: int | None = None

    @property
    def size(self) -> int:
        return len(self.usage)

    def parse(self, cdb: bytes | memoryview) -> Any:
        return self.decl.parse(bytes(cdb[: self.size]))

    def build(self, **fields: Any) -> bytes:
        """A CDB for tests and tools: unspecified fields are zero."""
        fields = {"opcode": self.opcode, **fields}
        if self.service_action is not None:
            fields["b1"] = {"service_action": self.service_action, **fields.get("b1", {})}
        return self.decl.build(_fill(self.decl, fields))


def _fill(decl: Construct, fields: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for sub in getattr(decl, "subcons", []):
        name = sub.name
        if name is None:
            continue
        inner = getattr(sub, "subcon", sub)
        if hasattr(inner, "subcons") or hasattr(getattr(inner, "subcon", None), "subcons"):
            target = inner if hasattr(inner, "subcons") else inner.subcon
            out[name] = _fill(target, fields.get(name, {}))
        else:
            out[name] = fields.get(name, False if _is_flag(inner) else 0)
    return out


def _is_flag(c: Construct) -> bool:
    return c is Flag or type(c).__name__ == "FlagLike"


def _u(*b: int) -> bytes:
    return bytes(b)


# Usage data: byte 0 is the opcode; set bits mark fields we implement.
COMMANDS: list[Cdb] = [
    Cdb("TEST UNIT READY", 0x00, TestUnitReady, _u(0x00, 0, 0, 0, 0, 0x00)),
    Cdb("REQUEST SENSE", 0x03, RequestSense, _u(0x03, 0x01, 0, 0, 0xFF, 0x00)),
    Cdb("READ(6)", 0x08, Rw6, _u(0x08, 0x1F, 0xFF, 0xFF, 0xFF, 0x00)),
    Cdb("WRITE(6)", 0x0A, Rw6, _u(0x0A, 0x1F, 0xFF, 0xFF, 0xFF, 0x00)),
    Cdb("INQUIRY", 0x12, Inquiry, _u(0x12, 0x01, 0xFF, 0xFF, 0xFF, 0x00)),
    Cdb("MODE SELECT(6)", 0x15, ModeSelect6, _u(0x15, 0x11, 0, 0, 0xFF, 0x00)),
    Cdb("MODE SENSE(6)", 0x1A, ModeSense6, _u(0x1A, 0x08, 0xFF, 0xFF, 0xFF, 0x00)),
    Cdb("START STOP UNIT", 0x1B, StartStopUnit, _u(0x1B, 0x01, 0, 0x0F, 0xF7, 0x00)),
    Cdb("PREVENT ALLOW MEDIUM REMOVAL", 0x1E, PreventAllow, _u(0x1E, 0, 0, 0, 0x03, 0x00)),
    Cdb(
        "READ CAPACITY(10)",
        0x25,
        ReadCapacity10,
        _u(0x25, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0x01, 0x00),
    ),
    Cdb("READ(10)", 0x28, Rw10, _u(0x28, 0x18, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F, 0xFF, 0xFF, 0x00)),
    Cdb("WRITE(10)", 0x2A, Rw10, _u(0x2A, 0x18, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F, 0xFF, 0xFF, 0x00)),
    Cdb(
        "WRITE AND VERIFY(10)",
        0x2E,
        Rw10,
        _u(0x2E, 0x12, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F, 0xFF, 0xFF, 0x00),
    ),
    Cdb(
        "VERIFY(10)", 0x2F, Verify10, _u(0x2F, 0x16, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F, 0xFF, 0xFF, 0x00)
    ),
    Cdb(
        "SYNCHRONIZE CACHE(10)",
        0x35,
        SyncCache10,
        _u(0x35, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F, 0xFF, 0xFF, 0x00),
    ),
    Cdb(
        "WRITE SAME(10)",
        0x41,
        WriteSame10,
        _u(0x41, 0x08, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F, 0xFF, 0xFF, 0x00),
    ),
    Cdb("UNMAP", 0x42, Unmap, _u(0x42, 0x00, 0, 0, 0, 0, 0x3F, 0xFF, 0xFF, 0x00)),
    Cdb("MODE SELECT(10)", 0x55, ModeSelect10, _u(0x55, 0x11, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x00)),
    Cdb("MODE SENSE(10)", 0x5A, ModeSense10, _u(0x5A, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0x00)),
    Cdb("READ(16)", 0x88, Rw16, _u(0x88, 0x18, *[0xFF] * 12, 0x3F, 0x00)),
    Cdb(
        "COMPARE AND WRITE",
        0x89,
        CompareAndWrite,
        _u(0x89, 0x18, *[0xFF] * 8, 0, 0, 0, 0xFF, 0x3F, 0x00),
    ),
    Cdb("WRITE(16)", 0x8A, Rw16, _u(0x8A, 0x18, *[0xFF] * 12, 0x3F, 0x00)),
    Cdb("WRITE AND VERIFY(16)", 0x8E, Rw16, _u(0x8E, 0x12, *[0xFF] * 12, 0x3F, 0x00)),
    Cdb("VERIFY(16)", 0x8F, Verify16, _u(0x8F, 0x16, *[0xFF] * 12, 0x3F, 0x00)),
    Cdb("SYNCHRONIZE CACHE(16)", 0x91, SyncCache16, _u(0x91, 0x02, *[0xFF] * 12, 0x3F, 0x00)),
    Cdb("WRITE SAME(16)", 0x93, WriteSame16, _u(0x93, 0x09, *[0xFF] * 12, 0x3F, 0x00)),
    Cdb(
        "READ CAPACITY(16)",
        0x9E,
        ServiceActionIn16,
        _u(0x9E, 0x10, *[0xFF] * 8, 0xFF, 0xFF, 0xFF, 0xFF, 0x01, 0x00),  # byte 14: PMI
        service_action=0x10,
    ),
    Cdb(
        "GET LBA STATUS",
        0x9E,
        ServiceActionIn16,
        _u(0x9E, 0x12, *[0xFF] * 8, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x00),
        service_action=0x12,
    ),
    Cdb(
        "REPORT SUPPORTED OPERATION CODES",
        0xA3,
        ReportOpcodes,
        _u(0xA3, 0x0C, 0x87, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x00),
        service_action=0x0C,
    ),
    Cdb("READ(12)", 0xA8, Rw12, _u(0xA8, 0x18, *[0xFF] * 8, 0x3F, 0x00)),
    Cdb("WRITE(12)", 0xAA, Rw12, _u(0xAA, 0x18, *[0xFF] * 8, 0x3F, 0x00)),
]

BY_NAME = {c.name: c for c in COMMANDS}
SERVICE_ACTION_OPCODES = {0x9E, 0xA3}


def lookup(opcode: int, service_action: int | None = None) -> Cdb | None:
    for c in COMMANDS:
        if c.opcode == opcode and (c.service_action is None or c.service_action == service_action):
            return c
    return None


# Hot path: (opcode, flags, lba, length) decoders derived from the declarations above.
RW10 = struct.Struct(">BBIxHx")
RW16 = struct.Struct(">BBQIxx")
assert RW10.size == Rw10.sizeof() and RW16.size == Rw16.sizeof()
