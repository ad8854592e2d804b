"""The shadow set control block, carried on every member so a set can be assembled from its
members alone. Declared once with construct; docs/shadow.md shows the byte layout.

The last `AREA` bytes of each member are reserved for it. The block is written into one of two
4 KiB slots, alternating with the generation (slot = generation % 2), with FUA and a flush, so
a torn write leaves the previous generation readable in the other slot. The block on a member
names that member (`self_id`); the rest is the same on every member written in a generation.
"""

from __future__ import annotations

import uuid
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from construct import (
    Bytes,
    Checksum,
    Const,
    ConstructError,
    Flag,
    Int8sl,
    Int8ul,
    Int16ul,
    Int32ul,
    Int64ul,
    Mapping,
    Padded,
    PrefixedArray,
    RawCopy,
    Struct,
    this,
)

from vscsi.shadow.states import MemberState, Operation, OpKind, SetState
from vscsi.store.base import Volume, VolumeError

MAGIC = b"VSCSISHD"
VERSION = 1
AREA = 1 << 20  # reserved at the end of every member
SLOT = 4096
MAX_MEMBERS = 16

MemberEntry = Struct(
    "id" / Bytes(16),
    "state" / Mapping(Int8ul, {
        MemberState.FULL: 1, MemberState.COPY_TARGET: 2,
        MemberState.REMOVED: 3, MemberState.STALE: 4,
    }),
)  # fmt: skip

OpEntry = Struct(
    "kind" / Mapping(Int8ul, {
        OpKind.COPY: 1, OpKind.MINICOPY: 2, OpKind.MERGE: 3, OpKind.MINIMERGE: 4,
    }),
    "target" / Int8sl,  # index into members, -1 for a merge
    "fence" / Int64ul,  # this pass is done below it: the checkpoint
)  # fmt: skip

Body = Struct(
    "magic" / Const(MAGIC),
    "version" / Const(VERSION, Int16ul),
    "set_id" / Bytes(16),
    "self_id" / Bytes(16),  # which member this copy of the block is on
    "generation" / Int64ul,
    "clean" / Flag,  # dismounted cleanly; False while mounted
    "block_size" / Int32ul,
    "size" / Int64ul,  # of the virtual unit, in bytes
    "log_generation" / Int64ul,  # the write-intent log's generation at mount (0: no log)
    "members" / PrefixedArray(Int8ul, MemberEntry),
    "ops" / PrefixedArray(Int8ul, OpEntry),  # the queue, head (active operation) first
)

Block = Struct(
    "body" / RawCopy(Body),
    "crc" / Checksum(Int32ul, lambda data: zlib.crc32(data), this.body.data),
)

Slot = Padded(SLOT, Block)


class ControlBlockError(ValueError):
    """A member carries no valid control block (never part of a set, or both slots torn)."""


@dataclass(slots=True)
class ControlBlock:
    """The set's durable truth for one generation."""

    set_id: bytes
    generation: int
    clean: bool
    block_size: int
    size: int
    log_generation: int
    state: SetState


def new_id() -> bytes:
    return uuid.uuid4().bytes


def encode(block: ControlBlock, self_id: bytes) -> bytes:
    """The slot image of `block` as written on member `self_id`."""
    ids = list(block.state.members)
    if len(ids) > MAX_MEMBERS:
        raise ValueError(f"a shadow set has at most {MAX_MEMBERS} members")
    body = {
        "set_id": block.set_id,
        "self_id": self_id,
        "generation": block.generation,
        "clean": block.clean,
        "block_size": block.block_size,
        "size": block.size,
        "log_generation": block.log_generation,
        "members": [{"id": bytes.fromhex(m), "state": s} for m, s in block.state.members.items()],
        "ops": [
            {"kind": op.kind, "target": -1 if op.target is None else ids.index(op.target),
             "fence": op.fence}
            for op in block.state.queue
        ],
    }  # fmt: skip
    return Slot.build({"body": {"value": body}})


def decode(raw: bytes) -> tuple[ControlBlock, bytes]:
    """(block, self_id) from a slot image; ControlBlockError if it is not a valid block."""
    try:
        body = Slot.parse(raw).body.value
    except ConstructError as e:
        raise ControlBlockError(f"no valid control block: {e}") from None
    members = {e.id.hex(): e.state for e in body.members}
    ids = list(members)
    state = SetState(members=members)
    for entry in body.ops:
        target = None if entry.target < 0 else ids[entry.target]
        state.enqueue(Operation(entry.kind, target, entry.fence))
    block = ControlBlock(
        body.set_id, body.generation, body.clean, body.block_size, body.size,
        body.log_generation, state,
    )  # fmt: skip
    return block, body.self_id


def area_offset(volume: Volume) -> int:
    """Where the reserved area starts on `volume`."""
    return volume.size - AREA


def virtual_size(volumes: Iterable[Volume], block_size: int) -> int:
    """The virtual unit's size: the smallest member minus the reserved area, in whole blocks."""
    smallest = min(v.size for v in volumes) - AREA
    size = smallest - smallest % block_size
    if size <= 0:
        raise ValueError(f"members must be larger than the {AREA}-byte control area")
    return size


def read_block(volume: Volume) -> tuple[ControlBlock, bytes]:
    """The newest valid block of the two slots on `volume`, with the member id it names."""
    found: list[tuple[ControlBlock, bytes]] = []
    for slot in range(2):
        buf = bytearray(SLOT)
        try:
            volume.readinto(area_offset(volume) + slot * SLOT, [memoryview(buf)])
            found.append(decode(bytes(buf)))
        except (VolumeError, ControlBlockError):
            continue
    if not found:
        raise ControlBlockError(f"{volume.name}: no valid shadow set control block")
    return max(found, key=lambda f: f[0].generation)


def write_block(volume: Volume, block: ControlBlock, self_id: bytes) -> None:
    """Write `block` durably into the slot of its generation (the other keeps the previous)."""
    offset = area_offset(volume) + (block.generation % 2) * SLOT
    volume.write(offset, [memoryview(encode(block, self_id))], fua=True)
    volume.flush()


def newest(blocks: Sequence[tuple[ControlBlock, bytes]]) -> ControlBlock:
    """The block of the highest generation: the set's truth. Blocks of different sets are an
    operator mistake, refused."""
    sets = {b.set_id for b, _ in blocks}
    if len(sets) > 1:
        raise ControlBlockError("the members belong to different shadow sets")
    return max((b for b, _ in blocks), key=lambda b: b.generation)
