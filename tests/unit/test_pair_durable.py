"""Pair state across checkpoints, crashes and restarts (issue 9, D2-D6, D9-D11): a checkpoint
never puts an older snapshot over a split nor brings a deleted pair back, concurrent saves
are atomic, restore marks and shutdown keep every change mark, a crash recovery copies in the
background, P-VOL reads during a restore and UNMAP while paired keep S == P."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.unit.pairvolumes import MIB, FaultyVolume, manager, read, volumes, write
from vscsi.pair.manager import PairManager
from vscsi.pair.replica import LocalReplica
from vscsi.pair.states import Status
from vscsi.pair.volume import GRAIN
from vscsi.scsi.identity import Identity
from vscsi.store.base import Volume, WriteProtectedError
from vscsi.store.file import FileVolume

SIZE = 4 * MIB


def paired(m: PairManager, name: str = "p", p: str = "v0", s: str = "v1", mu: int = 0) -> None:
    m.create(name, p, s, mu)
    assert m.wait(name, 10)
    assert m.pair(name).status is Status.PAIR


class CleanerHold:
    """Stops the write-intent log cleaner's checkpoint inside its S-VOL flush (its snapshot
    already taken) until `release` is set; `done` is set once that checkpoint returned."""

    def __init__(self, m: PairManager, svol: str) -> None:
        self.entered, self.release, self.done = (threading.Event() for _ in range(3))
        rep = m.replicas[svol]  # type: ignore[attr-defined]
        flush, checkpoint = rep.flush, m.checkpoint_volume

        def slow_flush() -> None:
            if threading.current_thread().name == "wil-cleaner" and not self.entered.is_set():
                self.entered.set()
                self.release.wait(10)
            flush()

        def checkpoint_volume(volume: str) -> None:
            try:
                checkpoint(volume)
            finally:
                if self.entered.is_set():
                    self.done.set()

        rep.flush = slow_flush
        m.checkpoint_volume = checkpoint_volume  # type: ignore[method-assign]


def test_split_during_checkpoint_stays_split_after_a_crash(tmp_path: Path) -> None:
    """D2: the cleaner's PAIR snapshot, written after the split, must not win: after a crash
    the pair is PSUS and the point-in-time S-VOL is not overwritten."""
    vols = volumes(2, SIZE)
    m = manager(str(tmp_path), vols)
    paired(m)
    hold = CleanerHold(m, "v1")
    write(m.volume("v0"), 0, b"a" * 4096)  # PAIR write: its region goes idle, cleaner runs
    assert hold.entered.wait(5)
    m.split("p")
    hold.release.set()
    assert hold.done.wait(5)
    snap = bytes(vols["v1"].data[3 * GRAIN : 3 * GRAIN + 4096])
    write(m.volume("v0"), 3 * GRAIN, b"N" * 4096)  # after the split: P only
    m2 = manager(str(tmp_path), vols)  # a crash: no close, a new daemon on the same state
    assert m2.pair("p").status is Status.PSUS
    assert m2.wait("p", 10)
    assert bytes(vols["v1"].data[3 * GRAIN : 3 * GRAIN + 4096]) == snap
    m2.close()
    m.close()


def test_delete_during_checkpoint_stays_deleted(tmp_path: Path) -> None:
    """D3: a checkpoint in flight when the pair is deleted cannot write it back; a new pair of
    the same name can still be created."""
    vols = volumes(2, SIZE)
    m = manager(str(tmp_path), vols)
    paired(m)
    hold = CleanerHold(m, "v1")
    write(m.volume("v0"), 0, b"a" * 4096)
    assert hold.entered.wait(5)
    m.delete("p")
    hold.release.set()
    assert hold.done.wait(5)
    m.close()
    m2 = manager(str(tmp_path), vols)
    assert list(m2.pairs) == []
    paired(m2)
    m2.close()
    m3 = manager(str(tmp_path), vols)
    assert m3.pair("p").status is Status.PAIR
    m3.close()


def test_concurrent_checkpoints_keep_the_record_whole(tmp_path: Path) -> None:
    """D4: two threads checkpointing one pair (copier and cleaner) never fail and the record
    on disk always parses."""
    vols = volumes(2, SIZE)
    m = manager(str(tmp_path), vols)
    paired(m)
    m.split("p")
    errors: list[BaseException] = []
    bad = [0]
    stop = threading.Event()
    record = tmp_path / "pairs" / "p.json"

    def saver() -> None:
        for _ in range(60):
            try:
                m.checkpoint_volume("v0")
            except BaseException as e:
                errors.append(e)

    def reader() -> None:
        while not stop.is_set():
            try:
                json.loads(record.read_bytes())
            except (ValueError, FileNotFoundError):
                bad[0] += 1

    r = threading.Thread(target=reader)
    r.start()
    savers = [threading.Thread(target=saver) for _ in range(2)]
    for t in savers:
        t.start()
    for t in savers:
        t.join()
    stop.set()
    r.join()
    assert errors == [] and bad == [0]
    m.close()


def test_copier_retries_a_record_it_could_not_write(tmp_path: Path, monkeypatch, caplog) -> None:
    """D4: a failed checkpoint write in the copier is logged and retried at the next
    checkpoint; the copy does not stop in COPY."""
    vols = volumes(2, SIZE)
    m = manager(str(tmp_path), vols, checkpoint_bytes=512 << 10)
    fsync, failures = os.fsync, [3]

    def failing_fsync(fd: int) -> None:
        if threading.current_thread().name.startswith("pair-copy") and failures[0]:
            failures[0] -= 1
            raise OSError(5, "Input/output error")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with caplog.at_level(logging.WARNING):
        m.create("p", "v0", "v1", 0)
        assert m.wait("p", 10)
    assert failures == [0]
    assert m.pair("p").status is Status.PAIR
    assert "retrying" in caplog.text
    m.close()
    assert manager(str(tmp_path), vols).pair("p").status is Status.PAIR


def test_restore_marks_on_other_mus_survive_a_restart(tmp_path: Path) -> None:
    """D5: grains a restore rewrote on the P-VOL are durable changes of its other pairs."""
    vols = volumes(3, SIZE)
    m = manager(str(tmp_path), vols)
    paired(m, "a", "v0", "v1", 0)
    paired(m, "b", "v0", "v2", 1)
    m.split("a")
    m.split("b")
    write(m.volume("v1"), 7 * GRAIN, b"R" * 4096)
    m.restore("a")
    assert m.wait("a", 10)
    m.close()
    m2 = manager(str(tmp_path), vols)
    assert m2.display("b")[0]["pvol"]["changed_bytes"] == GRAIN
    m2.resync("b")
    assert m2.wait("b", 10)
    assert vols["v2"].data == vols["v0"].data
    m2.close()


@pytest.mark.parametrize("pvol", ["a", "b"])
def test_clean_stop_keeps_every_change_mark(tmp_path: Path, pvol: str) -> None:
    """D6: volume "b" is written last and closed after "a"; whether it is the P-VOL or the
    S-VOL, a clean stop neither loses its change marks nor fails on "a", already closed."""
    svol = "b" if pvol == "a" else "a"
    ids = {"a": Identity(volume_id=1), "b": Identity(volume_id=2)}

    def vols() -> dict[str, Volume]:
        return {
            n: FileVolume(n, str(tmp_path / f"{n}.img"), size=4 * MIB, create=True)
            for n in ("a", "b")
        }

    m = PairManager(str(tmp_path / "state"), vols(), ids, wil_idle=0.2)
    m.create("p", pvol, svol, 0)
    assert m.wait("p", 10)
    m.split("p")
    m.volume("b").write(0, [memoryview(b"x" * 4096)])
    wil = m.volume("b").wil  # its cleaner stops with the region idle: close must clear it
    wil._stop.set()
    wil._cleaner.join()
    threading.Event().wait(0.3)
    m.close()
    m2 = PairManager(str(tmp_path / "state"), vols(), ids)
    d = m2.display("p")[0]
    assert d["pvol" if pvol == "b" else "svol"]["changed_bytes"] == GRAIN
    m2.close()


class HeldCopy(LocalReplica):
    """Writes and reads from the copier thread wait for `go`; host I/O passes."""

    go = threading.Event()

    def _wait(self) -> None:
        if threading.current_thread().name.startswith("pair-copy") or (
            threading.current_thread() is not threading.main_thread()
        ):
            assert self.go.wait(30)

    def write(self, offset: int, bufs: Sequence[memoryview], fua: bool = False) -> None:
        self._wait()
        super().write(offset, bufs, fua)

    def readinto(self, offset: int, bufs: Sequence[memoryview]) -> None:
        self._wait()
        super().readinto(offset, bufs)


def test_recovery_copy_of_a_lost_log_runs_in_the_background(tmp_path: Path) -> None:
    """D9: with the P-VOL's log lost, the whole volume is re-copied, but in the background:
    the manager is ready at once, the pair shows COPY, host I/O works, then S == P."""
    size = 64 * MIB
    paths = {n: str(tmp_path / f"{n}.img") for n in ("p", "s")}

    def vols() -> dict[str, Volume]:
        return {n: FileVolume(n, paths[n], size=size, create=True) for n in ("p", "s")}

    m = PairManager(str(tmp_path / "state"), vols(), {})
    m.create("x", "p", "s", 0)
    assert m.wait("x", 60)
    m.volume("p").write(5 * MIB, [memoryview(os.urandom(GRAIN))])
    m.close()
    Path(tmp_path / "state" / "wil" / "p.wil").write_bytes(b"\xff" * 4096)  # lost log
    with open(paths["p"], "r+b") as f:  # a write that reached P only before the crash
        f.seek(40 * MIB)
        f.write(b"z" * GRAIN)
    HeldCopy.go = threading.Event()
    started: list[PairManager] = []
    t = threading.Thread(
        target=lambda: started.append(
            PairManager(str(tmp_path / "state"), vols(), {}, replica_factory=HeldCopy)
        )
    )
    t.start()
    t.join(5)
    try:
        assert started, "PairManager() copied before returning"
        m2 = started[0]
        assert m2.pair("x").status is Status.COPY
        assert m2.display("x")[0]["progress"] < 100
        with pytest.raises(Exception, match="COPY, split needs PAIR"):
            m2.split("x")
        pv = m2.volume("p")  # (away from the chunk the held copier has locked)
        pv.write(32 * MIB, [memoryview(b"h" * 4096)])
        assert read(pv, 32 * MIB, 4096) == b"h" * 4096
    finally:
        HeldCopy.go.set()
        t.join(30)
    assert m2.wait("x", 60)
    assert m2.pair("x").status is Status.PAIR
    m2.close()
    assert Path(paths["p"]).read_bytes() == Path(paths["s"]).read_bytes()


class HeldRestore(LocalReplica):
    """The copier's reads at or past `limit` set `entered` and wait for `go` (host reads
    pass)."""

    def __init__(self, volume: Volume) -> None:
        super().__init__(volume)
        self.entered, self.go = threading.Event(), threading.Event()
        self.limit = 1 << 62

    def readinto(self, offset: int, bufs: Sequence[memoryview]) -> None:
        if threading.current_thread().name.startswith("pair-copy") and offset >= self.limit:
            self.entered.set()
            assert self.go.wait(30)
        super().readinto(offset, bufs)


def test_pvol_reads_during_restore_see_the_restored_image(tmp_path: Path) -> None:
    """D10: while RCPY runs, a P-VOL read of a grain not restored yet returns the S-VOL's
    data, never the old P-VOL data."""
    vols = volumes(2, SIZE)
    reps: dict[str, HeldRestore] = {}

    def factory(v: Volume) -> HeldRestore:
        reps[v.name] = HeldRestore(v)
        return reps[v.name]

    ids = {n: Identity(volume_id=i) for i, n in enumerate(vols)}
    m = PairManager(str(tmp_path), vols, ids, replica_factory=factory, chunk=256 << 10)
    paired(m)
    m.split("p")
    write(m.volume("v1"), 2 * GRAIN, b"S" * 4096)
    write(m.volume("v1"), 8 * GRAIN, b"U" * 4096)  # the copier stops here (other region)
    write(m.volume("v1"), 40 * GRAIN, b"T" * 4096)
    write(m.volume("v0"), 41 * GRAIN, b"P" * 4096)
    reps["v1"].limit = 8 * GRAIN
    m.restore("p")
    pv = m.volume("v0")
    assert reps["v1"].entered.wait(10)
    assert m.pair("p").status is Status.RCPY
    assert read(pv, 40 * GRAIN, 4096) == b"T" * 4096
    assert read(pv, 41 * GRAIN, 4096) == bytes(vols["v1"].data[41 * GRAIN : 41 * GRAIN + 4096])
    assert read(pv, 2 * GRAIN, 4096) == b"S" * 4096
    window = read(pv, 40 * GRAIN - 512, 3 * GRAIN)  # across grains, both sources
    assert window == bytes(vols["v1"].data[40 * GRAIN - 512 : 43 * GRAIN - 512])
    reps["v1"].go.set()
    assert m.wait("p", 10)
    assert m.pair("p").status is Status.PSUS
    assert vols["v0"].data == vols["v1"].data
    m.close()


def test_unmap_capability_is_constant_and_mirrored(tmp_path: Path) -> None:
    """D11b: `supports_unmap` does not change with pairing; UNMAP in PAIR reaches the S-VOL
    (as zeroes when it cannot deallocate), in PSUS it is tracked, on an S-VOL it follows the
    write rules."""
    vols = volumes(3, SIZE)
    vols["v2"] = FaultyVolume(SIZE, name="v2", unmap=False)
    vols["v2"].data[:] = os.urandom(SIZE)
    vols["v2"].mapped[:] = b"\1" * len(vols["v2"].mapped)
    m = manager(str(tmp_path), vols)
    p = m.volume("v0")
    assert p.supports_unmap
    paired(m, "a", "v0", "v1", 0)
    paired(m, "b", "v0", "v2", 1)
    assert p.supports_unmap
    p.unmap(4 * GRAIN, 2 * GRAIN)
    assert read(p, 4 * GRAIN, 2 * GRAIN) == bytes(2 * GRAIN)
    assert vols["v1"].data == vols["v0"].data == vols["v2"].data
    with pytest.raises(WriteProtectedError):
        m.volume("v1").unmap(0, GRAIN)
    m.split("a")
    p.unmap(10 * GRAIN, GRAIN)
    m.volume("v1").unmap(20 * GRAIN, GRAIN)
    d = m.display("a")[0]
    assert d["pvol"]["changed_bytes"] == GRAIN and d["svol"]["changed_bytes"] == GRAIN
    m.resync("a")
    assert m.wait("a", 10)
    assert vols["v1"].data == vols["v0"].data == vols["v2"].data
    m.close()


def test_records_and_notes_of_an_older_release_are_adopted(tmp_path: Path) -> None:
    """A state dir written before the committer: pair records are read as they are, the one
    `volumes.json` becomes one note per volume."""
    vols = volumes(3, SIZE)
    m = manager(str(tmp_path), vols)
    paired(m)
    m.split("p")
    rec = json.loads((tmp_path / "pairs" / "p.json").read_bytes())["payload"]
    m.close()
    (tmp_path / "pairs" / "p.json").write_text(json.dumps(rec))
    (tmp_path / "volumes.json").write_text(json.dumps({"v2": {"content": "undefined"}}))
    m2 = manager(str(tmp_path), vols)
    assert m2.pair("p").status is Status.PSUS
    assert m2.display_volume("v2")["content"] == "undefined"
    assert not (tmp_path / "volumes.json").exists()
    m2.close()
    assert manager(str(tmp_path), vols).display_volume("v2")["content"] == "undefined"


def test_suspend_without_a_writable_state_dir_stays_suspended(tmp_path: Path, monkeypatch) -> None:
    """An S-VOL error while the record cannot be written: the host write still succeeds, the
    pair is PSUE in memory, `checkpoint_volume` raises (the write-intent log keeps the region)
    until the record can be written, and then it is."""
    vols = volumes(2, SIZE)
    m = manager(str(tmp_path), vols, wil_idle=60)
    paired(m)
    fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    vols["v1"].failing = True
    monkeypatch.setattr(os, "fsync", failing_fsync)
    write(m.volume("v0"), 0, b"w" * 4096)
    assert m.pair("p").status is Status.PSUE
    with pytest.raises(OSError):
        m.checkpoint_volume("v0")
    monkeypatch.setattr(os, "fsync", fsync)
    m.checkpoint_volume("v0")
    m2 = manager(str(tmp_path), vols)  # a crash after that checkpoint
    assert m2.pair("p").status is Status.PSUE
    assert m2.display("p")[0]["pvol"]["changed_bytes"] >= GRAIN
    m2.close()
    m.close()
