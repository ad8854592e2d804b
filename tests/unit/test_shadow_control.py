"""The control block on each member: layout, checksum, A/B slots against torn writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.test_shadow_support import SIZE, Member, members
from vscsi.shadow.control import (
    AREA,
    SLOT,
    ControlBlock,
    ControlBlockError,
    decode,
    encode,
    new_id,
    newest,
    read_block,
    virtual_size,
    write_block,
)
from vscsi.shadow.states import MemberState, SetState, mount_member, system_failure


def block(generation: int = 1) -> ControlBlock:
    state = SetState(members={"aa" * 16: MemberState.FULL})
    mount_member(state, "bb" * 16)
    system_failure(state, log_valid=False)  # the copy target leaves, a merge is queued
    mount_member(state, "cc" * 16)
    state.queue[0].fence = 1 << 20
    return ControlBlock(new_id(), generation, False, 512, SIZE, 7, state)


def test_round_trip() -> None:
    blk = block()
    raw = encode(blk, bytes.fromhex("cc" * 16))
    assert len(raw) == SLOT and raw.startswith(b"VSCSISHD")
    back, self_id = decode(raw)
    assert self_id.hex() == "cc" * 16
    assert (back.set_id, back.generation, back.clean, back.size, back.log_generation) == (
        blk.set_id, 1, False, SIZE, 7,
    )  # fmt: skip
    assert back.state.members == blk.state.members
    assert [(o.kind, o.target, o.fence) for o in back.state.queue] == [
        (o.kind, o.target, o.fence) for o in blk.state.queue
    ]


def test_corruption_is_detected() -> None:
    raw = bytearray(encode(block(), new_id()))
    raw[60] ^= 1
    with pytest.raises(ControlBlockError, match="crc"):
        decode(bytes(raw))
    with pytest.raises(ControlBlockError):
        decode(bytes(SLOT))


def test_torn_write_leaves_the_previous_generation(tmp_path: Path) -> None:
    (m,) = members(tmp_path, "a")
    me = new_id()
    for gen in (1, 2, 3):
        write_block(m, block(gen), me)
    assert read_block(m)[0].generation == 3
    with open(tmp_path / "a.img", "r+b") as f:  # generation 3 lives in slot 1: tear it
        f.seek(m.size - AREA + SLOT + 100)
        f.write(b"\xff" * 64)
    got, self_id = read_block(m)
    assert got.generation == 2 and self_id == me
    m.close()


def test_member_without_a_block_is_refused(tmp_path: Path) -> None:
    (m,) = members(tmp_path, "a")
    with pytest.raises(ControlBlockError, match="no valid"):
        read_block(m)
    m.close()


def test_block_sits_at_the_end_of_each_member(tmp_path: Path) -> None:
    small = Member(tmp_path / "small.img", size=SIZE + AREA)
    big = Member(tmp_path / "big.img", size=2 * SIZE + AREA)
    blk = block(2)  # even generation: slot 0, the start of the area
    for v in (small, big):
        write_block(v, blk, new_id())
        with open(v.path, "rb") as f:
            f.seek(v.size - AREA)
            assert f.read(8) == b"VSCSISHD"
        v.close()


def test_virtual_size_is_smallest_member_minus_area_in_whole_blocks(tmp_path: Path) -> None:
    a = Member(tmp_path / "a.img", size=SIZE + AREA + 4096)
    b = Member(tmp_path / "b.img", size=SIZE + AREA + 512)
    assert virtual_size([a, b], 512) == SIZE + 512
    assert virtual_size([a, b], 4096) == SIZE
    a.close()
    b.close()


def test_newest_generation_wins_and_other_sets_are_refused() -> None:
    old, new = block(4), block(5)
    new.set_id = old.set_id
    assert newest([(old, b""), (new, b"")]) is new
    with pytest.raises(ControlBlockError, match="different shadow sets"):
        newest([(old, b""), (block(6), b"")])
