"""A mirrored write that waits for its devices (FUA, or the write cache off) runs its sides at
the same time: a P-VOL and its S-VOLs (local or over the link), a shadow set's members. Each
side waits, briefly, for the others to start; written one after another they never meet, and
the test fails after the meeting's timeout. A buffered write is written in turn, as before.

The answers stay those of a write done in turn: an S-VOL failure suspends its pair, a P-VOL
failure is the host's error and the range is copied again, a fence fails the write, a failed
member leaves the set; and nothing returns while a side still writes from the host's buffers.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.unit.pairvolumes import MIB, FaultyVolume, manager, read, volumes
from tests.unit.remotepeers import SIZE as SITE_SIZE
from tests.unit.remotepeers import two_sites
from tests.unit.test_shadow_support import CHUNK, create, data_of, members
from vscsi.durable.faults import Crash
from vscsi.pair.manager import PairManager
from vscsi.pair.states import Status
from vscsi.pair.volume import GRAIN
from vscsi.remote.states import Fence
from vscsi.store.base import MediumError, WriteProtectedError
from vscsi.store.fanout import Fanout
from vscsi.store.locks import RegionLocks, WriteGate
from vscsi.tracker.wil import WriteIntentLog

MEET_TIMEOUT = 2.0  # seconds a side waits for the others: the cost of a failing test


class Meeting:
    """Each write of the volumes that `join` it waits (at most MEET_TIMEOUT) until as many
    writes as the meeting has parties have started; `met` says, per write, whether they did."""

    def __init__(self, parties: int) -> None:
        self._barrier = threading.Barrier(parties, timeout=MEET_TIMEOUT)
        self.met: list[bool] = []

    def join(self, volume: Any) -> None:
        write: Callable[..., None] = volume.write

        def meeting_write(offset: int, bufs: Sequence[memoryview], fua: bool = False) -> None:
            try:
                self._barrier.wait()
                self.met.append(True)
            except threading.BrokenBarrierError:
                self.met.append(False)
            write(offset, bufs, fua)

        volume.write = meeting_write


def slowly(volume: Any, done: threading.Event, delay: float = 0.3) -> None:
    """`volume`'s writes take `delay` seconds, then set `done`."""
    write: Callable[..., None] = volume.write

    def slow_write(offset: int, bufs: Sequence[memoryview], fua: bool = False) -> None:
        time.sleep(delay)
        write(offset, bufs, fua)
        done.set()

    volume.write = slow_write


def write(vol: Any, offset: int, data: bytes, fua: bool = True) -> None:
    """A write-through write (FUA) unless told: the kind whose sides run side by side."""
    vol.write(offset, [memoryview(data)], fua)


def paired(m: PairManager, *pairs: tuple[str, str, int]) -> None:
    for i, (p, s, mu) in enumerate(pairs):
        m.create(f"p{i}", p, s, mu)
    for i in range(len(pairs)):
        assert m.wait(f"p{i}", 10) and m.pair(f"p{i}").status is Status.PAIR


# -- the sides overlap ---------------------------------------------------------------------------


def test_a_pvol_and_its_svols_are_written_at_once(tmp_path: Path) -> None:
    vols = volumes(3, 4 * MIB)
    m = manager(str(tmp_path), vols)
    paired(m, ("v0", "v1", 0), ("v0", "v2", 1))
    meeting = Meeting(3)
    for v in vols.values():
        meeting.join(v)
    data = os.urandom(GRAIN)
    write(m.volume("v0"), GRAIN, data)
    assert meeting.met == [True] * 3
    assert vols["v1"].data == vols["v2"].data == vols["v0"].data
    m.close()


def test_a_remote_pvol_write_overlaps_the_update_copy_on_the_link(tmp_path: Path) -> None:
    a, b, _ = two_sites(tmp_path)
    assert a.m is not None and b.m is not None
    a.vols["Av0"].write(0, [memoryview(os.urandom(SITE_SIZE))])
    a.m.remote.create("tc", "Av0", "B:Bv0", Fence.DATA)
    assert a.m.wait("tc", 10) and a.m.remote.pair("tc").status is Status.PAIR
    meeting = Meeting(2)
    meeting.join(a.vols["Av0"])
    meeting.join(b.vols["Bv0"])
    write(a.m.volume("Av0"), 4096, b"r" * 4096)
    assert meeting.met == [True, True]
    assert a.vols["Av0"].data == b.vols["Bv0"].data
    a.m.close()
    b.m.close()


def test_a_shadow_sets_members_are_written_at_once(tmp_path: Path) -> None:
    vols = members(tmp_path, "a", "b", "c")
    s = create(tmp_path, vols)
    meeting = Meeting(3)
    for v in vols:
        meeting.join(v)
    write(s, CHUNK, b"m" * 8192)
    assert meeting.met == [True] * 3
    s.close()
    assert data_of(tmp_path, "a") == data_of(tmp_path, "b") == data_of(tmp_path, "c")


def test_the_fanout_threads_end_when_the_volumes_close(tmp_path: Path) -> None:
    vols = volumes(2, 4 * MIB)
    m = manager(str(tmp_path), vols)
    paired(m, ("v0", "v1", 0))
    before = set(threading.enumerate())
    write(m.volume("v0"), 0, b"t" * 4096)
    started = [t for t in threading.enumerate() if t not in before and t.name == "mirror-v0_0"]
    assert started
    m.close()
    assert not started[0].is_alive()
    with pytest.raises(RuntimeError):
        m.volume("v0").fanout.start(lambda: None, True)


def test_buffered_writes_write_their_sides_in_turn_on_the_calling_thread(
    tmp_path: Path,
) -> None:
    """A copy into a write cache is quicker done in turn than handed to a thread; a failed
    P-VOL write then stops before the S-VOL, as it always did."""
    vols = volumes(2, 4 * MIB)
    m = manager(str(tmp_path), vols)
    paired(m, ("v0", "v1", 0))
    threads: list[str] = []
    s_write = vols["v1"].write

    def record(offset: int, bufs: Sequence[memoryview], fua: bool = False) -> None:
        threads.append(threading.current_thread().name)
        s_write(offset, bufs, fua)

    vols["v1"].write = record  # type: ignore[method-assign]
    write(m.volume("v0"), 0, b"b" * 4096, fua=False)
    assert threads == [threading.current_thread().name]
    vols["v0"].failing = True
    with pytest.raises(MediumError):
        write(m.volume("v0"), 0, b"x" * 4096, fua=False)
    assert len(threads) == 1
    vols["v0"].failing = False
    m.close()


def test_writers_zero_writes_the_sides_in_turn_on_the_calling_thread() -> None:
    order: list[tuple[str, str]] = []
    f = Fanout("t", 0)
    side = f.start(lambda: order.append(("side", threading.current_thread().name)), True)
    order.append(("own", threading.current_thread().name))
    side.result()
    me = threading.current_thread().name
    assert order == [("own", me), ("side", me)]
    with pytest.raises(ValueError, match="workers must be 0"):
        Fanout("t", -1)


# -- failures are answered as before ------------------------------------------------------------


def test_a_failed_pvol_write_waits_for_the_update_copy_and_fails_with_its_own_error(
    tmp_path: Path,
) -> None:
    """The S-VOL's write may land while P's fails: the command still fails with P's error,
    only once the S-VOL's write ended (it reads the host's buffers), and the range is copied
    again, so S ends equal to P."""
    vols = volumes(2, 4 * MIB)
    m = manager(str(tmp_path), vols)
    paired(m, ("v0", "v1", 0))
    s_done = threading.Event()
    slowly(vols["v1"], s_done)
    vols["v0"].failing = vols["v0"].torn = True
    with pytest.raises(MediumError):
        write(m.volume("v0"), 0, b"x" * 4096)
    assert s_done.is_set()
    vols["v0"].failing = False
    assert m.wait("p0", 10) and m.pair("p0").status is Status.PAIR
    assert vols["v1"].data == vols["v0"].data
    m.close()


def test_both_sides_failing_suspend_the_pair_and_the_host_gets_the_pvol_error(
    tmp_path: Path,
) -> None:
    vols = volumes(2, 4 * MIB)
    m = manager(str(tmp_path), vols)
    paired(m, ("v0", "v1", 0))
    vols["v0"].failing = vols["v0"].torn = True
    vols["v1"].failing = vols["v1"].torn = True
    with pytest.raises(MediumError):
        write(m.volume("v0"), 3 * GRAIN, b"x" * 4096)
    pair = m.pair("p0")
    assert pair.status is Status.PSUE
    assert pair.rec.pdiff is not None and pair.rec.pdiff.test(3 * GRAIN, 4096)
    vols["v0"].failing = vols["v1"].failing = False
    m.resync("p0")
    assert m.wait("p0", 10) and pair.status is Status.PAIR
    assert vols["v1"].data == vols["v0"].data
    m.close()


def test_a_crash_in_the_pvol_write_returns_only_after_the_update_copy(tmp_path: Path) -> None:
    vols = volumes(2, 4 * MIB)
    m = manager(str(tmp_path), vols)
    paired(m, ("v0", "v1", 0))
    s_done = threading.Event()
    slowly(vols["v1"], s_done)

    def die(_: Any, *__: Any) -> None:
        raise Crash("P-VOL write")

    vols["v0"].write = die  # type: ignore[method-assign]
    with pytest.raises(Crash):
        write(m.volume("v0"), 0, b"c" * 4096)
    assert s_done.is_set()
    del vols["v0"].write
    m.close()


@pytest.mark.parametrize("p_fails", [False, True])
def test_a_fence_data_pair_failing_its_update_copy(tmp_path: Path, p_fails: bool) -> None:
    """The failed update copy fences the pair either way; the host gets WRITE PROTECTED, or
    the P-VOL's own error when that failed too."""
    a, b, _ = two_sites(tmp_path)
    assert a.m is not None and b.m is not None
    a.m.remote.create("tc", "Av0", "B:Bv0", Fence.DATA)
    assert a.m.wait("tc", 10)
    b.vols["Bv0"].bad_write.add(0)
    if p_fails:
        a.vols["Av0"].bad_write.add(0)
    with pytest.raises(MediumError if p_fails else WriteProtectedError):
        write(a.m.volume("Av0"), 0, b"f" * 4096)
    pair = a.m.remote.pair("tc")
    assert pair.status is Status.PSUE and pair.state.fenced
    assert pair.rec.pdiff is not None and pair.rec.pdiff.test(0, 4096)
    a.m.close()
    b.m.close()


def test_a_member_failing_beside_the_others_leaves_the_set(tmp_path: Path) -> None:
    a, b, c = members(tmp_path, "a", "b", "c")
    s = create(tmp_path, [a, b, c])
    b.bad_write.append((CHUNK, 4096))
    c.bad_write.append((CHUNK, 4096))
    write(s, CHUNK, b"w" * 8192)
    assert [m["state"] for m in s.show()["members"]] == ["ShadowSetMember", "Removed", "Removed"]
    a.bad_write.append((0, 4096))
    with pytest.raises(MediumError):  # the last full member: its error is the host's
        write(s, 0, b"l" * 4096)
    s.close()


# -- a paired shadow set passes one of each guard ---------------------------------------------


def test_a_paired_shadow_set_write_passes_one_gate_one_region_lock_one_log_mark(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counted over every instance: the pair layer takes the set's guards and calls its
    `_held` methods; the S-VOL's update copy takes none (the P side's mark covers it)."""
    s = create(tmp_path, members(tmp_path, "a", "b"))
    s1 = FaultyVolume(s.size, name="s1")
    m = PairManager(str(tmp_path / "pairs"), {"dsa1": s, "s1": s1}, {}, wil_idle=3600)
    m.create("p", "dsa1", "s1", 0)
    assert m.wait("p", 10) and m.pair("p").status is Status.PAIR
    counts = {"gate": 0, "regions": 0, "log": 0}

    def counted(key: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kw: Any) -> Any:
            counts[key] += 1
            return method(*args, **kw)

        return call

    monkeypatch.setattr(WriteGate, "__enter__", counted("gate", WriteGate.__enter__))
    monkeypatch.setattr(RegionLocks, "hold", counted("regions", RegionLocks.hold))
    monkeypatch.setattr(WriteIntentLog, "begin", counted("log", WriteIntentLog.begin))
    m.volume("dsa1").write(CHUNK, [memoryview(b"p" * 4096)])
    assert counts == {"gate": 1, "regions": 1, "log": 1}
    monkeypatch.undo()
    assert read(m.volume("s1"), CHUNK, 4096) == b"p" * 4096
    m.close()
    assert data_of(tmp_path, "a")[CHUNK : CHUNK + 4096] == b"p" * 4096
