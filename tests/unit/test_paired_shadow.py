"""A shadow set as a pair's P-VOL pays for one write gate, one set of region locks and one
write-intent log: the pair layer takes the set's. After a crash that one log drives both the
set's minimerge and the pair's recovery copy, and S ends equal to the merged set."""

from __future__ import annotations

import os
from pathlib import Path

from tests.unit.crashmodel import abandon
from tests.unit.test_shadow_support import (
    CHUNK,
    SIZE,
    crash,
    create,
    data_of,
    members,
    open_set,
    read,
    reopen,
    scribble,
)
from vscsi.pair.manager import PairManager
from vscsi.pair.states import Status
from vscsi.shadow import OpKind, ShadowSet
from vscsi.store.file import FileVolume


def manager(tmp_path: Path, s: ShadowSet) -> PairManager:
    s1 = FileVolume("v1", str(tmp_path / "v1.img"), size=SIZE, create=True)
    return PairManager(str(tmp_path / "pairs"), {"dsa1": s, "v1": s1}, {}, wil_idle=3600)


def test_one_log_for_the_set_and_its_pairs_drives_both_recoveries(tmp_path: Path) -> None:
    s = create(tmp_path, members(tmp_path, "a", "b"))
    m = manager(tmp_path, s)
    pv = m.volume("dsa1")
    assert pv.gate is s.guards.gate and pv.regions is s.guards.regions and pv.wil is s.guards.wil
    m.create("p", "dsa1", "v1", 0)
    assert m.wait("p", 30) and m.pair("p").status is Status.PAIR
    pv.write(CHUNK + 4096, [memoryview(os.urandom(8192))])
    assert not (tmp_path / "pairs" / "wil" / "dsa1.wil").exists()  # no second log
    assert s.guards.wil is not None and s.guards.wil.dirty_regions() == 1
    # the process dies with a write on member a only (in flight: logged, not mirrored)
    s.guards.wil.begin(3 * CHUNK, 4096)
    scribble(tmp_path, "a", 3 * CHUNK, b"only a" * 100)
    abandon(m.volumes["v1"].wil)
    m.volumes["v1"].base.close()
    crash(s)

    s2 = open_set(tmp_path, reopen(tmp_path, "a", "b"))
    m2 = manager(tmp_path, s2)
    assert m2.pair("p").status is Status.COPY  # re-copying the logged regions
    assert m2.display("p")[0]["copy_total"] == 2 * CHUNK
    assert m2.wait("p", 30) and s2.wait(30)
    assert m2.pair("p").status is Status.PAIR
    assert (OpKind.MINIMERGE, None) in s2.stats.finished
    assert data_of(tmp_path, "a") == data_of(tmp_path, "b")
    assert (tmp_path / "v1.img").read_bytes() == read(s2, 0, SIZE)
    m2.close()


def test_restore_onto_a_paired_set_goes_through_its_guards(tmp_path: Path) -> None:
    s = create(tmp_path, members(tmp_path, "a", "b"))
    m = manager(tmp_path, s)
    m.create("p", "dsa1", "v1", 0)
    assert m.wait("p", 30)
    m.split("p")
    m.volume("v1").write(2 * CHUNK, [memoryview(b"S" * 4096)])
    m.restore("p")
    assert m.wait("p", 30) and m.pair("p").status is Status.PSUS
    assert read(s, 2 * CHUNK, 4096) == b"S" * 4096
    m.close()
    assert data_of(tmp_path, "a") == data_of(tmp_path, "b") == (tmp_path / "v1.img").read_bytes()
