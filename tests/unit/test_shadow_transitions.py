"""The seed's transitions on a real set of member files: copies, crashes (the set abandoned
without its clean dismount, then reassembled from the member files alone), merges and
minimerges, and how they queue behind each other.

Members stall on purpose (`Member.stall_after`) so an operation is caught half way through.
The master member `a` is the source of copies and merges.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from tests.unit.test_shadow_support import (
    CHUNK,
    CONTROL_READS,
    GRAIN,
    SIZE,
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
from vscsi.shadow import MemberState, OpKind
from vscsi.shadow.control import read_block


def crashed_steady_set(tmp_path: Path, offsets: tuple[int, ...] = (0, 2 << 20)) -> None:
    """A two-member set, written at `offsets` (each in its own log region), then crashed."""
    s = create(tmp_path, members(tmp_path, "a", "b"))
    for off in offsets:
        write(s, off, os.urandom(8192))
    crash(s)


def kinds(s) -> list[str]:
    return [op["kind"] for op in s.show()["operations"]]


def test_row1_member_added_to_steady_set_gets_a_full_copy(tmp_path: Path) -> None:
    a, b, c = members(tmp_path, "a", "b", "c")
    s = create(tmp_path, [a, b])
    payload = os.urandom(SIZE)
    write(s, 0, payload)
    s.add(c)
    assert s.wait(10)
    assert s.stats.copied == SIZE and s.stats.merge_scanned == 0
    assert data_of(tmp_path, "c") == payload
    assert [m["state"] for m in s.show()["members"]] == ["ShadowSetMember"] * 3
    s.close()


def test_row2_crash_of_steady_set_minimerges_only_logged_regions(tmp_path: Path) -> None:
    crashed_steady_set(tmp_path)
    scribble(tmp_path, "b", (2 << 20) + 100, b"in flight on b only")
    s = open_set(tmp_path, reopen(tmp_path, "a", "b"))
    assert s.log_valid
    assert s.wait(10)
    assert s.stats.finished == [(OpKind.MINIMERGE, None)]
    assert s.stats.merge_scanned == 2 * CHUNK  # two log regions, not the volume
    assert s.stats.merge_written == CHUNK and s.stats.copied == 0
    assert data_of(tmp_path, "a") == data_of(tmp_path, "b")
    s.close()


def test_row2_crash_without_log_merges_the_whole_volume(tmp_path: Path) -> None:
    crashed_steady_set(tmp_path)
    scribble(tmp_path, "b", SIZE - 4096, b"far from any write")
    s = open_set(tmp_path, reopen(tmp_path, "a", "b"), wil=False)
    assert s.wait(10)
    assert s.stats.finished == [(OpKind.MERGE, None)]
    assert s.stats.merge_scanned == SIZE and s.stats.copied == 0
    assert data_of(tmp_path, "a") == data_of(tmp_path, "b")
    s.close()


def test_row3_second_added_member_waits_for_the_running_copy(tmp_path: Path) -> None:
    a, b, c = members(tmp_path, "a", "b", "c")
    s = create(tmp_path, [a])
    a.stall_after(CHUNK)
    s.add(b)
    assert a.stalled.wait(5)
    s.add(c)
    assert s.show()["state"] == "Copy Active (6%),Copy Pending (0%)"
    a.release.set()
    assert s.wait(10)
    assert [t for _, t in s.stats.finished] == [m["id"] for m in s.show()["members"][1:]]
    assert s.stats.copied == 2 * SIZE
    assert data_of(tmp_path, "a") == data_of(tmp_path, "b") == data_of(tmp_path, "c")
    s.close()


def test_row4_crash_during_copy_aborts_it_and_add_restarts_it(tmp_path: Path) -> None:
    a, b, c = members(tmp_path, "a", "b", "c")
    s = create(tmp_path, [a, b])
    a.stall_after(2 * CHUNK)
    s.add(c)
    assert a.stalled.wait(5)
    crash(s, a)
    vols = reopen(tmp_path, "a", "b", "c")
    s = open_set(tmp_path, vols)
    states = {m["name"]: m["state"] for m in s.show()["members"]}
    assert states == {"a.img": "ShadowSetMember", "b.img": "ShadowSetMember", "c.img": "Stale"}
    assert s.wait(10)
    assert s.stats.finished == [(OpKind.MINIMERGE, None)]
    s.add(vols[2])
    assert s.wait(10)
    assert s.stats.copied == SIZE  # from block 0
    assert s.state.members[s.show()["members"][2]["id"]] is MemberState.FULL
    s.close()


def test_row5_member_added_during_minimerge_waits_for_it(tmp_path: Path) -> None:
    crashed_steady_set(tmp_path)
    vols = reopen(tmp_path, "a", "b")
    vols[0].stall_after(CONTROL_READS)
    s = open_set(tmp_path, vols)
    assert vols[0].stalled.wait(5)
    (c,) = members(tmp_path, "c")
    s.add(c)
    assert kinds(s) == ["MiniMerge", "Copy"]
    assert s.show()["state"].startswith("MiniMerge Active")
    vols[0].release.set()
    assert s.wait(10)
    assert [k for k, _ in s.stats.finished] == [OpKind.MINIMERGE, OpKind.COPY]
    assert data_of(tmp_path, "a") == data_of(tmp_path, "b") == data_of(tmp_path, "c")
    s.close()


def _crash_during_minimerge(tmp_path: Path) -> None:
    """Crash a set whose minimerge (regions 0 and 8) is half done, after a write to region 12."""
    crashed_steady_set(tmp_path)
    vols = reopen(tmp_path, "a", "b")
    vols[0].stall_after(CONTROL_READS)
    s = open_set(tmp_path, vols)
    assert vols[0].stalled.wait(5)
    write(s, 3 << 20, os.urandom(4096))  # a new log entry while the minimerge is pending
    crash(s, vols[0])


def test_row6_crash_before_minimerge_completes_restarts_it_over_the_union(
    tmp_path: Path,
) -> None:
    _crash_during_minimerge(tmp_path)
    scribble(tmp_path, "b", 3 << 20, b"only b got it")
    s = open_set(tmp_path, reopen(tmp_path, "a", "b"))
    assert s.wait(10)
    assert s.stats.finished == [(OpKind.MINIMERGE, None)]
    assert s.stats.merge_scanned == 3 * CHUNK  # from the beginning: old regions and the new
    assert data_of(tmp_path, "a") == data_of(tmp_path, "b")
    s.close()


def test_row6_crash_before_minimerge_completes_without_log_merges(tmp_path: Path) -> None:
    _crash_during_minimerge(tmp_path)
    s = open_set(tmp_path, reopen(tmp_path, "a", "b"), wil=False)
    assert s.wait(10)
    assert s.stats.finished == [(OpKind.MERGE, None)]
    assert s.stats.merge_scanned == SIZE
    s.close()


def test_row7_member_added_during_merge_interrupts_it_merge_resumes(tmp_path: Path) -> None:
    crashed_steady_set(tmp_path)
    vols = reopen(tmp_path, "a", "b")
    vols[0].stall_after(CONTROL_READS + CHUNK)
    s = open_set(tmp_path, vols, wil=False)
    assert vols[0].stalled.wait(5)
    (c,) = members(tmp_path, "c")
    s.add(c)
    assert kinds(s) == ["Copy", "Merge"]
    vols[0].release.set()
    assert s.wait(10)
    assert [k for k, _ in s.stats.finished] == [OpKind.COPY, OpKind.MERGE]
    assert s.stats.merge_scanned == SIZE  # resumed where it stopped, not restarted
    assert s.stats.copied == SIZE
    assert data_of(tmp_path, "a") == data_of(tmp_path, "b") == data_of(tmp_path, "c")
    s.close()


def test_row8_crash_during_merge_abandons_it_for_a_new_one(tmp_path: Path) -> None:
    crashed_steady_set(tmp_path)
    vols = reopen(tmp_path, "a", "b")
    vols[0].stall_after(CONTROL_READS + 2 * CHUNK)  # past the checkpoint at 2 chunks
    s = open_set(tmp_path, vols, wil=False)
    assert vols[0].stalled.wait(5)
    crash(s, vols[0])
    vols = reopen(tmp_path, "a", "b")
    blk, _ = read_block(vols[0])
    assert [(op.kind, op.fence) for op in blk.state.queue] == [(OpKind.MERGE, 2 * CHUNK)]
    s = open_set(tmp_path, vols, wil=False)
    assert s.wait(10)
    assert s.stats.merge_scanned == SIZE  # a new merge from block 0, not the checkpoint
    s.close()


def test_row10_interrupted_minicopy_continues_as_full_copy(tmp_path: Path) -> None:
    a, b = members(tmp_path, "a", "b")
    s = create(tmp_path, [a, b])
    s.remove("b.img", minicopy=True)
    for i in range(0, SIZE, 4 * CHUNK):
        write(s, i, os.urandom(4096))
    a.stall_after(GRAIN)  # b returns: the set still holds (and claims) its volume
    s.add(b)
    assert kinds(s) == ["MiniCopy"]
    assert a.stalled.wait(5)
    threading.Timer(0.2, a.release.set).start()
    s.close()
    vols = reopen(tmp_path, "a", "b")
    blk, _ = read_block(vols[0])
    fence = 4 * CHUNK + GRAIN  # the second bitmap extent was being copied at the dismount
    assert [(op.kind, op.fence) for op in blk.state.queue] == [(OpKind.COPY, fence)]
    s = open_set(tmp_path, vols)
    assert s.wait(10)
    assert s.stats.copied == SIZE - fence
    assert data_of(tmp_path, "a") == data_of(tmp_path, "b")
    assert read(s, 0, 4096) == data_of(tmp_path, "b")[:4096]
    s.close()
