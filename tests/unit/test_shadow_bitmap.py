"""Every write a removed member missed is in its minicopy bitmap, whatever the interleaving:
a host write that chose its targets before another I/O removed the member, and a member
removed while a merge has not yet made it identical."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from vscsi.shadow import ShadowSet
from vscsi.store.base import MediumError

from .test_shadow_support import (
    CHUNK,
    CONTROL_READS,
    GRAIN,
    SIZE,
    Member,
    crash,
    create,
    data_of,
    members,
    open_set,
    reopen,
    scribble,
    write,
)

W2 = 40 * GRAIN  # in another chunk than offset 0


class Gated(Member):
    """A member whose write at `at` waits (`entered` set) until `go`, then succeeds."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.at: int | None = None
        self.entered = threading.Event()
        self.go = threading.Event()

    def gate(self, offset: int) -> bool:
        """Hold a write at `at` until `go`; True when this write was held."""
        if offset != self.at or self.go.is_set():
            return False
        self.entered.set()
        assert self.go.wait(10)
        return True


class Dying(Gated):
    """A member whose write at `at` waits until `go`, then fails: the write chose this member
    as a target, and the member fails under it."""

    def write(self, offset: int, bufs: Sequence[memoryview], fua: bool = False) -> None:
        if self.gate(offset):
            raise MediumError("write", offset, 4096, 5)
        super().write(offset, bufs, fua)


def _member(s: ShadowSet, name: str) -> dict[str, object]:
    return next(m for m in s.show()["members"] if m["name"] == name)


def test_write_in_flight_on_a_member_another_write_removes_is_in_its_bitmap(
    tmp_path: Path,
) -> None:
    a = Member(tmp_path / "a.img")
    b = Dying(tmp_path / "b.img")
    s = create(tmp_path, [a, b])
    b.at = W2
    host = threading.Thread(target=write, args=(s, W2, b"W" * 4096))
    host.start()  # W2 is on a, and waits on b
    assert b.entered.wait(5)
    b.bad_write.append((0, 4096))
    write(s, 0, b"X" * 4096)  # another write fails on b first: b is removed
    assert _member(s, "b.img")["state"] == "Removed"
    b.go.set()  # W2 now fails on b too: it is acknowledged from a alone
    host.join(5)
    assert not host.is_alive()
    b.bad_write.clear()
    s.add(b)  # the minicopy back must copy W2
    assert s.wait(10)
    assert data_of(tmp_path, "a") == data_of(tmp_path, "b")
    s.close()


def test_member_removed_during_a_merge_gets_everything_copied_back(tmp_path: Path) -> None:
    s = create(tmp_path, members(tmp_path, "a", "b"))
    write(s, 0, b"a" * SIZE)
    crash(s)
    scribble(tmp_path, "b", 3 * CHUNK, b"b" * 4096)  # differs where the merge has not been
    a, b = reopen(tmp_path, "a", "b")
    a.stall_after(CONTROL_READS)  # the merge stalls in its first chunk
    s = open_set(tmp_path, [a, b], wil=False)
    assert a.stalled.wait(5)
    b.bad_write.append((CHUNK, 4096))
    write(s, CHUNK, b"h" * 4096)  # b fails and leaves the set, not yet merged
    assert _member(s, "b.img")["display"] == f"Removed, {SIZE} bytes changed since"
    a.release.set()
    assert s.wait(10)
    b.bad_write.clear()
    s.add(b)
    assert s.wait(10)
    assert data_of(tmp_path, "a") == data_of(tmp_path, "b")
    s.close()


def test_no_write_is_acknowledged_before_a_removal_it_depends_on_is_durable(
    tmp_path: Path,
) -> None:
    s = create(tmp_path, members(tmp_path, "a", "b"))
    (b,) = [v for v in s._volumes() if v.name == "b.img"]
    entered, go = threading.Event(), threading.Event()
    commit = s._commit

    def slow_commit(clean: bool = False) -> None:  # the removal's commit starts late
        entered.set()
        assert go.wait(10)
        commit(clean)

    s._commit = slow_commit  # type: ignore[method-assign]
    b.bad_write.append((0, 4096))
    failing = threading.Thread(target=write, args=(s, 0, b"X" * 4096))
    failing.start()  # b fails and leaves the set in memory; its commit waits
    assert entered.wait(5)
    s._commit = commit  # type: ignore[method-assign]
    host = threading.Thread(target=write, args=(s, W2, b"W" * 4096))
    host.start()  # must not go to a alone and be acknowledged while b is current on disk
    host.join(0.5)
    acknowledged_early = not host.is_alive()
    go.set()
    failing.join(5)
    host.join(5)
    assert not acknowledged_early
    s.close()


def test_writes_not_yet_flushed_are_in_the_bitmap_of_a_member_that_fails(
    tmp_path: Path,
) -> None:
    s = create(tmp_path, members(tmp_path, "a", "b"))
    s.flush()
    (b,) = [v for v in s._volumes() if v.name == "b.img"]
    write(s, W2, b"W" * 4096)  # acknowledged by a and b, in b's cache only
    b.bad_write.append((0, 4096))
    write(s, 0, b"X" * 4096)  # b fails: its cache, W2 with it, may be gone
    scribble(tmp_path, "b", W2, bytes(4096))  # and it is
    write(s, 2 * W2, b"Y" * 4096)
    s.flush()  # flushed after b left: vouches for nothing b missed
    b.bad_write.clear()
    s.add(b)
    assert s.wait(10)
    assert data_of(tmp_path, "a") == data_of(tmp_path, "b")
    s.close()


def test_a_flush_of_every_member_empties_what_a_later_failure_copies(tmp_path: Path) -> None:
    s = create(tmp_path, members(tmp_path, "a", "b"))
    (b,) = [v for v in s._volumes() if v.name == "b.img"]
    write(s, W2, b"W" * 4096)
    s.flush()  # W2 is durable on b
    b.bad_write.append((0, 4096))
    write(s, 0, b"X" * 4096)
    assert _member(s, "b.img")["display"] == f"Removed, {GRAIN} bytes changed since"
    s.close()


class Slow(Gated):
    """A member whose first write at `at` waits until `go`, then succeeds."""

    def write(self, offset: int, bufs: Sequence[memoryview], fua: bool = False) -> None:
        if self.gate(offset):
            self.at = None
        super().write(offset, bufs, fua)


@pytest.mark.parametrize("fails_before_it_lands", [False, True])
def test_a_write_in_flight_during_a_flush_is_not_taken_as_flushed(
    tmp_path: Path, fails_before_it_lands: bool
) -> None:
    a, b = Member(tmp_path / "a.img"), Slow(tmp_path / "b.img")
    s = create(tmp_path, [a, b])
    b.at = W2
    host = threading.Thread(target=write, args=(s, W2, b"W" * 4096))
    host.start()  # W2 is on a, and in flight on b
    assert b.entered.wait(5)
    s.flush()  # started before W2 reached b: it does not vouch for W2 there
    b.bad_write.append((0, 4096))
    if fails_before_it_lands:
        write(s, 0, b"X" * 4096)  # b leaves; W2 then lands in its cache only
    b.go.set()
    host.join(5)
    assert not host.is_alive()
    if not fails_before_it_lands:
        write(s, 0, b"X" * 4096)  # b leaves with W2 in its cache only
    scribble(tmp_path, "b", W2, bytes(4096))  # the cache is lost
    b.bad_write.clear()
    s.add(b)
    assert s.wait(10)
    assert data_of(tmp_path, "a") == data_of(tmp_path, "b")
    s.close()
