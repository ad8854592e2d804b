"""The virtual unit's I/O: balanced reads, member failures and repair, minicopy, merge and
the host's view during it, stale members, and reassembly from the member files."""

from __future__ import annotations

import os
import random
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from tests.unit.test_shadow_support import (
    CHUNK,
    CONTROL_READS,
    GRAIN,
    SIZE,
    TUNING,
    Member,
    crash,
    create,
    data_of,
    members,
    open_set,
    read,
    reopen,
    scribble,
    write,
)
from vscsi.shadow import AREA, MemberState, OpKind, ShadowError, ShadowSet
from vscsi.shadow.control import read_block
from vscsi.store.base import MediumError, NotReadyError, Volume


def states(s: ShadowSet) -> dict[str, str]:
    return {m["name"]: m["state"] for m in s.show()["members"]}


def test_a_shadow_set_is_a_volume(tmp_path: Path) -> None:
    s = create(tmp_path, members(tmp_path, "a", "b"))
    assert isinstance(s, Volume)
    assert (s.size, s.block_size, s.supports_unmap, s.read_only) == (SIZE, 512, True, False)
    s.check_ready()
    write(s, 8192, b"z" * 4096)
    s.unmap(8192, 4096)
    assert read(s, 8192, 4096) == bytes(4096)
    assert s.extent_at(SIZE - GRAIN).length == GRAIN  # never past the virtual unit
    s.close()
    with pytest.raises(NotReadyError):
        s.check_ready()


def test_reads_are_balanced_over_full_members_never_a_copy_target(tmp_path: Path) -> None:
    a, b, c = members(tmp_path, "a", "b", "c")
    s = create(tmp_path, [a, b])
    a.stall_after(CHUNK)
    s.add(c)
    assert a.stalled.wait(5)
    reads_before = {v.name: v.read_bytes for v in (a, b, c)}
    for i in range(8):
        read(s, SIZE - (i + 1) * 4096, 4096)
    done = {v.name: v.read_bytes - reads_before[v.name] for v in (a, b, c)}
    assert done == {"a.img": 4 * 4096, "b.img": 4 * 4096, "c.img": 0}
    assert states(s)["c.img"] == "ShadowCopying"
    a.release.set()
    assert s.wait(10)
    s.close()


def test_host_write_during_copy_is_not_overwritten_by_stale_copy_data(tmp_path: Path) -> None:
    a, b = members(tmp_path, "a")[0], members(tmp_path, "b")[0]
    s = create(tmp_path, [a])
    write(s, 0, b"old" * 4096)
    a.stall_after(CHUNK)  # the copier stalls in chunk 1 after reading nothing of it
    s.add(b)
    assert a.stalled.wait(5)
    write(s, 3 * CHUNK, b"new" * 4096)  # ahead of the copy fence: the target gets it too
    a.release.set()
    write(s, CHUNK, b"mid" * 4096)  # waits for the chunk being copied, lands after it
    assert s.wait(10)
    for off, tag in ((0, b"old"), (CHUNK, b"mid"), (3 * CHUNK, b"new")):
        assert data_of(tmp_path, "b")[off : off + 12288] == tag * 4096
    assert data_of(tmp_path, "a") == data_of(tmp_path, "b")
    s.close()


def test_write_error_removes_the_member_host_write_succeeds(tmp_path: Path) -> None:
    a, b, c = members(tmp_path, "a", "b", "c")
    s = create(tmp_path, [a, b, c])
    b.bad_write.append((CHUNK, 4096))
    gen = s.generation
    write(s, CHUNK, b"w" * 8192)
    assert states(s)["b.img"] == "Removed"
    assert read(s, CHUNK, 8192) == b"w" * 8192
    assert s.generation > gen
    write(s, 2 * CHUNK, b"x" * 512)  # host I/O continues on the others
    assert data_of(tmp_path, "a") == data_of(tmp_path, "c")
    b.bad_write.clear()
    s.add(b)  # its changes were tracked: a minicopy of the two grains written since
    assert s.wait(10)
    assert s.stats.copied == 2 * GRAIN
    assert data_of(tmp_path, "a") == data_of(tmp_path, "b")
    s.close()


def test_read_error_is_answered_from_another_member_and_repaired(tmp_path: Path) -> None:
    a, b = members(tmp_path, "a", "b")
    s = create(tmp_path, [a, b])
    payload = os.urandom(8192)
    write(s, 4096, payload)
    scribble(tmp_path, "a", 4096, bytes(8192))  # the bad blocks lost their data
    a.bad_read.append((4096, 512))
    for _ in range(2):  # whichever member round-robin picks first
        assert read(s, 4096, 8192) == payload
    assert s.stats.read_repairs == 8192 // 512
    assert data_of(tmp_path, "a")[4096 : 4096 + 8192] == payload  # rewritten
    assert states(s)["a.img"] == "ShadowSetMember"
    s.close()


def test_member_whose_repair_fails_is_removed(tmp_path: Path) -> None:
    a, b = members(tmp_path, "a", "b")
    s = create(tmp_path, [a, b])
    write(s, 0, b"q" * 4096)
    a.bad_read.append((0, 512))
    a.bad_write.append((0, 512))
    for _ in range(2):
        assert read(s, 0, 4096) == b"q" * 4096
    assert states(s)["a.img"] == "Removed"
    assert s.state.full_members() == [s.show()["members"][1]["id"]]
    s.close()


def test_last_full_member_error_goes_to_the_host(tmp_path: Path) -> None:
    a, b = members(tmp_path, "a", "b")
    s = create(tmp_path, [a, b])
    b.bad_write.append((0, SIZE))
    write(s, 0, b"1" * 512)
    a.bad_write.append((0, 512))
    a.bad_read.append((4096, 512))
    with pytest.raises(MediumError):
        write(s, 0, b"2" * 512)
    with pytest.raises(MediumError):
        read(s, 4096, 512)
    assert states(s) == {"a.img": "ShadowSetMember", "b.img": "Removed"}
    assert read(s, 8192, 512) == bytes(512)
    s.close()


def test_minicopy_copies_only_blocks_written_since_removal(tmp_path: Path) -> None:
    a, b, c = members(tmp_path, "a", "b", "c")
    s = create(tmp_path, [a, b, c])
    s.remove("c.img", minicopy=True)
    for off in (0, 5 * GRAIN + 100 * 512, SIZE - 512):
        write(s, off, b"m" * 512)
    c.written = 0  # the member returns: the set still holds (and claims) its volume
    s.add(c)
    assert s.show()["operations"][0]["kind"] == "MiniCopy"
    assert s.wait(10)
    assert s.stats.copied == 3 * GRAIN and c.written == 3 * GRAIN + 2 * 4096  # + 2 blocks
    assert data_of(tmp_path, "a") == data_of(tmp_path, "c")
    s.close()


def test_minicopy_bitmap_survives_a_clean_dismount_not_a_crash(tmp_path: Path) -> None:
    s = create(tmp_path, members(tmp_path, "a", "b"))
    s.remove("b.img", minicopy=True)
    write(s, 0, b"1" * 512)
    s.close()
    s = open_set(tmp_path, reopen(tmp_path, "a"))  # b is not given: still Removed
    write(s, 2 * CHUNK, b"2" * 512)
    s.add(reopen(tmp_path, "b")[0])
    assert s.wait(10)
    assert s.stats.copied == 2 * GRAIN
    s.remove("b.img", minicopy=True)
    crash(s)
    s = open_set(tmp_path, reopen(tmp_path, "a"))
    assert s.wait(10)
    s.add(reopen(tmp_path, "b")[0])
    assert s.show()["operations"][0]["kind"] == "Copy"  # the bitmap missed the crash
    assert s.wait(10)
    assert s.stats.copied == SIZE
    s.close()


def test_minicopy_removal_refused_while_merge_pending(tmp_path: Path) -> None:
    s = create(tmp_path, members(tmp_path, "a", "b"))
    crash(s)
    vols = reopen(tmp_path, "a", "b")
    vols[0].stall_after(CONTROL_READS)
    s = open_set(tmp_path, vols, wil=False)
    assert vols[0].stalled.wait(5)
    with pytest.raises(ShadowError, match="merge is pending"):
        s.remove("b.img", minicopy=True)
    vols[0].release.set()
    assert s.wait(10)
    s.close()


def test_merge_makes_diverged_members_identical(tmp_path: Path) -> None:
    s = create(tmp_path, members(tmp_path, "a", "b", "c"))
    write(s, 0, os.urandom(SIZE))
    crash(s)
    for name, off in (("b", 100), ("c", CHUNK + 7), ("b", SIZE - 1000), ("c", 3 * CHUNK)):
        scribble(tmp_path, name, off, os.urandom(777))
    s = open_set(tmp_path, reopen(tmp_path, "a", "b", "c"), wil=False)
    assert s.wait(10)
    assert s.stats.merge_scanned == SIZE and s.stats.merge_written == 4 * CHUNK
    assert data_of(tmp_path, "a") == data_of(tmp_path, "b") == data_of(tmp_path, "c")
    s.close()


def test_host_read_of_unmerged_region_is_merged_first(tmp_path: Path) -> None:
    s = create(tmp_path, members(tmp_path, "a", "b"))
    write(s, 0, b"a" * SIZE)
    crash(s)
    scribble(tmp_path, "b", 3 * CHUNK, b"b" * 4096)
    vols = reopen(tmp_path, "a", "b")
    vols[0].stall_after(CONTROL_READS)  # the merge stalls in its first chunk
    s = open_set(tmp_path, vols, wil=False)
    assert vols[0].stalled.wait(5)
    assert s.show()["members"][0]["display"] == "Master Member, Merging (0%)"
    answers = {read(s, 3 * CHUNK, 4096) for _ in range(4)}  # round-robin over a and b
    assert answers == {b"a" * 4096}
    assert data_of(tmp_path, "b")[3 * CHUNK : 3 * CHUNK + 4096] == b"a" * 4096
    vols[0].release.set()
    assert s.wait(10)
    assert s.stats.merge_scanned == SIZE and s.stats.merge_written == GRAIN  # by the read
    s.close()


def test_stale_member_is_recognised_by_generation(tmp_path: Path) -> None:
    s = create(tmp_path, members(tmp_path, "a", "b"))
    write(s, 0, b"1" * 4096)
    s.remove("b.img")  # b keeps the generation it had then
    write(s, 0, b"2" * 4096)
    s.close()
    vols = reopen(tmp_path, "a", "b")
    s = open_set(tmp_path, vols)
    assert states(s) == {"a.img": "ShadowSetMember", "b.img": "Stale"}
    assert {read(s, 0, 4096) for _ in range(4)} == {b"2" * 4096}
    s.add(vols[1])
    assert s.wait(10)
    assert s.stats.copied == SIZE
    s.close()


def test_clean_dismount_reopens_steady_without_merge(tmp_path: Path) -> None:
    s = create(tmp_path, members(tmp_path, "a", "b"))
    write(s, 0, b"k" * 4096)
    s.close()
    s = open_set(tmp_path, reopen(tmp_path, "a", "b"))
    assert s.show()["state"] == "Steady State" and s.log_valid
    assert s.wait(1) and s.stats.merge_scanned == 0
    assert read(s, 0, 4096) == b"k" * 4096
    s.close()


def test_copy_resumes_from_its_checkpoint_after_clean_dismount(tmp_path: Path) -> None:
    a, b = members(tmp_path, "a", "b")
    s = create(tmp_path, [a])
    a.stall_after(3 * CHUNK)
    s.add(b)
    assert a.stalled.wait(5)
    a.release.set()
    s.close()
    vols = reopen(tmp_path, "a", "b")
    (op,) = read_block(vols[0])[0].state.queue
    assert op.kind is OpKind.COPY and op.fence >= 3 * CHUNK
    s = open_set(tmp_path, vols)
    assert s.wait(10)
    assert s.stats.copied == SIZE - op.fence
    assert data_of(tmp_path, "a") == data_of(tmp_path, "b")
    s.close()


def test_set_assembles_without_a_missing_member(tmp_path: Path) -> None:
    s = create(tmp_path, members(tmp_path, "a", "b"))
    s.close()
    s = open_set(tmp_path, reopen(tmp_path, "a"))
    assert [m["state"] for m in s.show()["members"]] == ["ShadowSetMember", "Removed"]
    write(s, 0, b"n" * 512)
    s.add(reopen(tmp_path, "b")[0])
    assert s.wait(10)
    assert s.stats.copied == GRAIN  # it was a full member at the clean dismount
    s.close()


def test_add_refuses_a_member_too_small(tmp_path: Path) -> None:
    s = create(tmp_path, members(tmp_path, "a"))
    small = Member(tmp_path / "small.img", size=SIZE)
    with pytest.raises(ShadowError, match="cannot hold"):
        s.add(small)
    small.close()
    s.close()


def test_show_reads_like_show_shadow(tmp_path: Path) -> None:
    a, b = members(tmp_path, "a", "b")
    s = create(tmp_path, [a])
    a.stall_after(2 * CHUNK)
    s.add(b)
    assert a.stalled.wait(5)
    shown = s.show()
    assert shown["state"] == "Copy Active (12%)"
    assert [m["display"] for m in shown["members"]] == ["ShadowSetMember", "ShadowCopying (12%)"]
    assert s.state.members[shown["members"][1]["id"]] is MemberState.COPY_TARGET
    a.release.set()
    assert s.wait(10)
    assert s.stats.finished == [(OpKind.COPY, shown["members"][1]["id"])]
    s.close()


def test_open_needs_a_member_with_a_control_block(tmp_path: Path) -> None:
    vols = members(tmp_path, "x")
    with pytest.raises(ShadowError, match="no volume carries"):
        ShadowSet.open("dsa9", vols, state_dir=tmp_path / "state", tuning=TUNING)
    vols[0].close()


def test_host_writes_racing_a_copy_and_a_merge_end_identical(tmp_path: Path) -> None:
    a, b, c = members(tmp_path, "a", "b", "c")
    s = create(tmp_path, [a, b])
    model = bytearray(SIZE)
    rng = random.Random(5)
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            off = rng.randrange(0, SIZE // 4096) * 4096
            data = rng.randbytes(4096)
            write(s, off, data)
            model[off : off + 4096] = data

    t = threading.Thread(target=writer)
    t.start()
    s.add(c)
    assert s.wait(10)
    stop.set()
    t.join()
    assert data_of(tmp_path, "a") == data_of(tmp_path, "b") == data_of(tmp_path, "c") == model
    crash(s)
    scribble(tmp_path, "c", 5000, b"junk" * 100)
    s = open_set(tmp_path, reopen(tmp_path, "a", "b", "c"), wil=False)
    assert {read(s, 4096, 4096) for _ in range(6)} == {bytes(model[4096:8192])}
    assert s.wait(10)
    assert data_of(tmp_path, "c") == model
    s.close()


def test_members_of_different_sets_are_refused(tmp_path: Path) -> None:
    one = create(tmp_path, members(tmp_path, "a"))
    one.close()
    two = ShadowSet.create("dsa2", members(tmp_path, "b"), state_dir=tmp_path / "s2", tuning=TUNING)
    two.close()
    vols = reopen(tmp_path, "a", "b")
    with pytest.raises(ShadowError, match="different shadow sets"):
        open_set(tmp_path, vols)
    for v in vols:
        v.close()


def test_copy_target_write_error_abandons_the_copy_not_the_host_write(tmp_path: Path) -> None:
    a, b = members(tmp_path, "a", "b")
    s = create(tmp_path, [a])
    a.stall_after(CHUNK)
    s.add(b)
    assert a.stalled.wait(5)
    b.bad_write.append((3 * CHUNK, 512))
    write(s, 3 * CHUNK, b"h" * 4096)
    assert states(s) == {"a.img": "ShadowSetMember", "b.img": "Stale"}
    a.release.set()
    assert s.wait(10)
    assert read(s, 3 * CHUNK, 4096) == b"h" * 4096
    b.bad_write.clear()
    s.add(b)  # a new add starts again from block 0
    assert s.wait(10)
    assert data_of(tmp_path, "a") == data_of(tmp_path, "b")
    s.close()


def test_a_set_holds_at_most_sixteen_members(tmp_path: Path) -> None:
    vols = [Member(tmp_path / f"m{i}.img", size=AREA + GRAIN) for i in range(17)]
    s = create(tmp_path, vols[:16])
    with pytest.raises(ShadowError, match="16 members already"):
        s.add(vols[16])
    vols[16].close()
    s.close()


def test_copy_is_paced_and_a_crash_during_it_leaves_the_original_members(
    tmp_path: Path,
) -> None:
    """copy_rate paces a shadow copy as it paces pair copies. A crash during the (slow) copy
    aborts it: the set comes back with its original members, and mounting the target again
    starts a new copy (the seed, for a standalone system)."""
    a, b = members(tmp_path, "a", "b")
    paced = replace(TUNING, copy_rate=2 * CHUNK)
    s = ShadowSet.create("dsa1", [a], state_dir=tmp_path / "state", tuning=paced)
    data = os.urandom(SIZE)
    write(s, 0, data)  # all data: every chunk is copied, none skipped as a hole
    s.add(b)
    deadline = time.monotonic() + 10
    while s.show()["operations"][0]["percent"] < 25:
        assert time.monotonic() < deadline, "the copy made no progress"
        time.sleep(0.02)
    crash(s)
    vols = reopen(tmp_path, "a", "b")
    (op,) = read_block(vols[0])[0].state.queue
    assert op.kind is OpKind.COPY and op.fence < SIZE  # paced: far from done at the crash
    s = open_set(tmp_path, vols)
    assert s.wait(10)
    assert states(s)["b.img"] != "ShadowSetMember"
    assert read(s, 0, SIZE) == data
    s.add(vols[1])
    assert s.wait(10)
    assert data_of(tmp_path, "a") == data_of(tmp_path, "b") == data
    s.close()
