"""Vendor VPD page 0xC0: the volume's pair state, as a host's failover software reads it.

Declared once with `construct`; the SCSI layer serves `build_page(...)`, tests and a future
`vscsi inq` parse it with `parse_page`. Layout (big-endian) in docs/pairs.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from construct import (
    Array,
    Bytes,
    Const,
    Container,
    Int8ub,
    Int16ub,
    Int32ub,
    Int64ub,
    Mapping,
    PaddedString,
    Prefixed,
    Struct,
)

from vscsi.pair.states import Role, Status

PAGE_CODE = 0xC0
FORMAT_VERSION = 1
REMOTE_SLOT = 0  # slot 0: the TrueCopy (remote) pair
SLOTS = 4  # remote, then MU#0..MU#2
SLOT_REMOTE, SLOT_LOCAL = 0, 1

ROLE_CODES = {Role.SMPL: 0, Role.PVOL: 1, Role.SVOL: 2}
STATUS_CODES = {Status.SMPL: 0, Status.COPY: 1, Status.PAIR: 2, Status.PSUS: 3, Status.PSUE: 4,
                Status.RCPY: 5, Status.SSUS: 6, Status.SSWS: 7}  # fmt: skip

FLAG_SPLIT_READ_ONLY = 0x01
FLAG_FENCED = 0x02  # remote slot: a P-VOL that refuses host writes (fenced or demoted)

Slot = Struct(
    "kind" / Int8ub,  # 0 remote (TrueCopy), 1 local (ShadowImage)
    "mu" / Int8ub,
    "role" / Mapping(Int8ub, ROLE_CODES),
    "status" / Mapping(Int8ub, STATUS_CODES),
    "progress" / Int8ub,  # copy progress, percent
    "flags" / Int8ub,
    "reserved" / Bytes(2),
    "partner_serial" / Int32ub,
    "partner_volume_id" / Int32ub,
    "generation" / Int64ub,
)

Body = Struct(
    "version" / Int8ub,
    "reserved" / Bytes(3),
    "serial" / Int32ub,
    "volume_id" / Int32ub,
    "port" / PaddedString(8, "ascii"),
    "slot_count" / Const(SLOTS, Int8ub),
    "slot_length" / Const(Slot.sizeof(), Int8ub),
    "reserved2" / Bytes(2),
    "slots" / Array(SLOTS, Slot),
)

Page = Struct(
    "peripheral" / Int8ub,
    "page_code" / Const(PAGE_CODE, Int8ub),
    "body" / Prefixed(Int16ub, Body),
)


@dataclass(frozen=True, slots=True)
class SlotInfo:
    """One pair slot as the page carries it."""

    role: Role = Role.SMPL
    status: Status = Status.SMPL
    progress: int = 0
    partner_serial: int = 0
    partner_volume_id: int = 0
    generation: int = 0
    split_read_only: bool = False
    fenced: bool = False


def _slot(index: int, info: SlotInfo) -> dict[str, Any]:
    return {
        "kind": SLOT_REMOTE if index == REMOTE_SLOT else SLOT_LOCAL,
        "mu": 0 if index == REMOTE_SLOT else index - 1,
        "role": info.role,
        "status": info.status,
        "progress": info.progress,
        "flags": (FLAG_SPLIT_READ_ONLY if info.split_read_only else 0)
        | (FLAG_FENCED if info.fenced else 0),
        "reserved": bytes(2),
        "partner_serial": info.partner_serial,
        "partner_volume_id": info.partner_volume_id,
        "generation": info.generation,
    }


def build_page(
    serial: int,
    volume_id: int,
    port: str,
    mus: dict[int, SlotInfo],
    remote: SlotInfo | None = None,
) -> bytes:
    """The whole page (header included); `mus` maps MU# (0..2) to its slot, `remote` is the
    TrueCopy slot; the others are SMPL."""
    slots = [_slot(i, SlotInfo()) for i in range(SLOTS)]
    if remote is not None:
        slots[REMOTE_SLOT] = _slot(REMOTE_SLOT, remote)
    for mu, info in mus.items():
        slots[mu + 1] = _slot(mu + 1, info)
    body = {
        "version": FORMAT_VERSION,
        "reserved": bytes(3),
        "serial": serial,
        "volume_id": volume_id,
        "port": port,
        "slot_count": SLOTS,
        "slot_length": Slot.sizeof(),
        "reserved2": bytes(2),
        "slots": slots,
    }
    return Page.build({"peripheral": 0, "page_code": PAGE_CODE, "body": body})


def parse_page(data: bytes) -> Container:
    """Inverse of `build_page`: `.body.serial`, `.body.slots[i].status` (a Status), …"""
    return Page.parse(data)
