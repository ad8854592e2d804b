"""The resync engine every copy and merge runs through: what it moves, what it skips, and
that a chunk in progress is still to do until it was moved (the records rely on that). Pairs
on sparse files show the hole skipping a user sees: a thin S-VOL stays thin."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path

from tests.unit.memvolume import MemVolume
from vscsi.pair.manager import PairManager
from vscsi.pair.states import Status
from vscsi.resync.engine import Resync, Settings
from vscsi.resync.holes import Mapped, Run, copy_kind
from vscsi.store.file import FileVolume
from vscsi.store.locks import RegionLocks
from vscsi.tracker import DirtyMap

MIB = 1 << 20
GRAIN = 65536


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def sparse(path: Path, size: int, data: dict[int, bytes]) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, chunk in data.items():
            f.seek(offset)
            f.write(chunk)


def files(tmp_path: Path, size: int) -> dict[str, FileVolume]:
    return {n: FileVolume(n, str(tmp_path / f"{n}.img"), size=size) for n in ("p", "s", "t")}


def test_pair_create_keeps_a_thin_svol_thin_and_clears_its_old_data(tmp_path: Path) -> None:
    size = 64 * MIB
    written = {3 * MIB: os.urandom(MIB), 40 * MIB + 4096: os.urandom(5 * 4096)}
    sparse(tmp_path / "p.img", size, written)
    sparse(tmp_path / "s.img", size, {20 * MIB: b"stale" * 1000})  # garbage under a P hole
    sparse(tmp_path / "t.img", size, {})
    m = PairManager(str(tmp_path / "state"), files(tmp_path, size), {})
    m.create("ps", "p", "s", 0)
    assert m.wait("ps", 30) and m.pair("ps").status is Status.PAIR
    d = m.display("ps")[0]
    m.close()
    p, s = (tmp_path / "p.img").read_bytes(), (tmp_path / "s.img").read_bytes()
    assert p == s
    assert allocated(tmp_path / "s.img") <= allocated(tmp_path / "p.img")
    assert d["copied"] < 3 * MIB and d["skipped"] > size - 3 * MIB, d


def test_restore_deallocates_where_the_svol_has_a_hole_and_marks_other_mus(
    tmp_path: Path,
) -> None:
    size = 16 * MIB
    sparse(tmp_path / "p.img", size, {MIB: os.urandom(MIB)})
    sparse(tmp_path / "s.img", size, {})
    sparse(tmp_path / "t.img", size, {})
    m = PairManager(str(tmp_path / "state"), files(tmp_path, size), {})
    m.create("ps", "p", "s", 0)
    assert m.wait("ps", 30)
    m.create("pt", "p", "t", 1)
    assert m.wait("pt", 30)
    m.split("ps")
    m.split("pt")
    m.volume("p").write(8 * MIB, [memoryview(b"new" * 4096)])  # after the split: S has a hole
    m.restore("ps")
    assert m.wait("ps", 30) and m.pair("ps").status is Status.PSUS
    assert m.display("pt")[0]["pvol"]["changed_bytes"] == GRAIN  # the restored grain
    m.close()
    assert (tmp_path / "p.img").read_bytes() == (tmp_path / "s.img").read_bytes()
    with open(tmp_path / "p.img", "rb") as f:
        assert os.lseek(f.fileno(), 8 * MIB, os.SEEK_HOLE) == 8 * MIB  # deallocated again


class Recorder:
    """A copy job over two in-memory volumes that records what it was asked to move and
    checks, during each move, that the chunk is still to do."""

    paced = False

    def __init__(self, todo: DirtyMap, source: MemVolume, target: MemVolume) -> None:
        self.todo, self.source, self.target = todo, source, target
        self.moves: list[tuple[int, int, Run]] = []
        self.still_to_do: list[bool] = []
        self.finished = 0
        self.mark_behind: tuple[int, int] | None = None

    def involved(self) -> Sequence[Mapped]:
        return [self.source, self.target]

    def kind(self, mapped: tuple[bool, ...]) -> Run:
        return copy_kind(mapped)

    def move(self, offset: int, length: int, run: Run) -> bool:
        self.moves.append((offset, length, run))
        self.still_to_do.append(self.todo.test(offset, length))
        if self.mark_behind is not None:  # a failed host write behind the fence
            self.todo.mark(*self.mark_behind)
            self.mark_behind = None
        return True

    def checkpoint(self) -> bool:
        return True

    def finish(self) -> bool:
        self.finished += 1
        return True


class Fence:
    fence = 0


def run_engine(job: Recorder, todo: DirtyMap, chunk: int = MIB) -> Fence:
    cursor = Fence()
    engine = Resync(job, todo, cursor, regions=RegionLocks(chunk), lock=threading.RLock(),
                    block_size=512, settings=Settings(chunk=chunk, grain=GRAIN))  # fmt: skip
    assert engine.run(threading.Event())
    return cursor


def test_a_chunk_stays_to_do_while_it_moves_and_marks_behind_the_fence_are_found() -> None:
    source, target = MemVolume(16 * MIB), MemVolume(16 * MIB)
    source.write(0, [memoryview(b"x" * 16 * MIB)])
    todo = DirtyMap(16 * MIB, GRAIN)
    todo.mark(4 * MIB, 2 * MIB)
    job = Recorder(todo, source, target)
    job.mark_behind = (0, GRAIN)
    run_engine(job, todo)
    assert all(job.still_to_do)
    assert [(o, n) for o, n, _ in job.moves] == [(4 * MIB, MIB), (5 * MIB, MIB), (0, GRAIN)]
    assert todo.count() == 0 and job.finished == 1


def test_holes_on_both_sides_are_skipped_in_one_step_and_garbage_is_zeroed() -> None:
    size = 256 * MIB
    source, target = MemVolume(size), MemVolume(size)
    source.write(200 * MIB, [memoryview(b"d" * 4096)])
    target.write(100 * MIB, [memoryview(b"g" * 4096)])
    todo = DirtyMap(size, GRAIN)
    todo.mark(0, size)
    job = Recorder(todo, source, target)
    run_engine(job, todo)
    moved = [(o, n, r) for o, n, r in job.moves if r is not Run.SKIP]
    assert moved == [(100 * MIB, 4096, Run.ZERO), (200 * MIB, 4096, Run.DATA)]
    skipped = sum(n for _, n, r in job.moves if r is Run.SKIP)
    assert skipped == size - 2 * 4096
    assert len(job.moves) < 12  # a hole is skipped in large steps, not chunk by chunk
