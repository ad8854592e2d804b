"""Holes and the read policy: merges and copies of sparse members read only where some volume
has data, stay exact where one does, and reads follow the set's read policy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.unit.test_shadow_support import (
    CONTROL_READS,
    GRAIN,
    TUNING,
    Member,
    crash,
    read,
    scribble,
    write,
)
from vscsi.shadow import AREA, ShadowError, ShadowSet
from vscsi.shadow.set import Stats

GIB = 1 << 30
WRITES = [(0, GRAIN), (300 << 20, 2 * GRAIN), (GIB // 2 + 4096 * 3, 4096), (GIB - GRAIN, GRAIN)]
WRITTEN = sum(n for _, n in WRITES)
STRAY = 700 << 20  # a hole on every member until a test puts data there on one of them


def sparse(tmp_path: Path, *names: str) -> list[Member]:
    return [Member(tmp_path / f"{n}.img", size=GIB + AREA, sparse=True) for n in names]


def crashed_sparse_set(tmp_path: Path) -> dict[int, bytes]:
    """A 1 GiB set over three sparse members with WRITES written, crashed (log kept)."""
    s = ShadowSet.create("dsa1", sparse(tmp_path, "a", "b", "c"), state_dir=tmp_path / "state",
                         tuning=TUNING)  # fmt: skip
    assert s.wait(10)
    data = {off: os.urandom(n) for off, n in WRITES}
    for off, buf in data.items():
        write(s, off, buf)
    crash(s)
    return data


def reopen_sparse(tmp_path: Path, wil: bool) -> tuple[ShadowSet, list[Member]]:
    vols = sparse(tmp_path, "a", "b", "c")
    s = ShadowSet.open("dsa1", vols, state_dir=tmp_path / "state", wil=wil, tuning=TUNING)
    assert s.wait(10)
    return s, vols


def on_member(tmp_path: Path, name: str, offset: int, length: int) -> bytes:
    with open(tmp_path / f"{name}.img", "rb") as f:
        return os.pread(f.fileno(), length, offset)


def assert_identical(tmp_path: Path, data: dict[int, bytes]) -> None:
    for off, buf in data.items():
        for name in "abc":
            assert on_member(tmp_path, name, off, len(buf)) == buf, (name, off)
    for name in "bc":
        assert on_member(tmp_path, name, STRAY, GRAIN) == bytes(GRAIN)


def test_full_merge_of_sparse_set_reads_only_where_a_member_has_data(tmp_path: Path) -> None:
    data = crashed_sparse_set(tmp_path)
    off, n = WRITES[1]
    scribble(tmp_path, "b", off + 4096, b"torn" * 1024)  # reached b only
    scribble(tmp_path, "c", STRAY, b"stray" * 800)  # data where the others have a hole
    s, vols = reopen_sparse(tmp_path, wil=False)
    stats = s.stats
    assert stats.merge_scanned + stats.merge_skipped == s.size
    assert stats.merge_scanned == WRITTEN + 4096  # what is mapped on some member
    assert stats.merge_written == n + 4096  # the torn write's run on b, the stray block on c
    assert [v.read_bytes for v in vols] == [CONTROL_READS + stats.merge_scanned] * 3
    assert_identical(tmp_path, data)
    assert read(s, STRAY, 4096) == bytes(4096)
    s.close()


def test_minimerge_of_sparse_set_stays_within_the_logged_regions(tmp_path: Path) -> None:
    data = crashed_sparse_set(tmp_path)
    scribble(tmp_path, "c", WRITES[2][0], b"x" * 4096)
    s, vols = reopen_sparse(tmp_path, wil=True)
    assert s.log_valid
    logged = len({off // TUNING.log_region for off, _ in WRITES}) * TUNING.log_region
    assert s.stats.merge_scanned + s.stats.merge_skipped == logged
    assert s.stats.merge_scanned == WRITTEN and s.stats.merge_written == 4096
    assert [v.read_bytes for v in vols] == [CONTROL_READS + WRITTEN] * 3
    assert_identical(tmp_path, data)
    s.close()


class NoUnmap(Member):
    @property
    def supports_unmap(self) -> bool:
        return False


@pytest.mark.parametrize("can_unmap", [True, False])
def test_copy_skips_holes_on_both_and_clears_garbage_under_a_source_hole(
    tmp_path: Path, can_unmap: bool
) -> None:
    a = sparse(tmp_path, "a")[0]
    kind = Member if can_unmap else NoUnmap
    b = kind(tmp_path / "b.img", size=GIB + AREA, sparse=True)
    scribble(tmp_path, "b", STRAY, b"garbage" * 1000)  # 7000 bytes: two blocks of 4 KiB
    s = ShadowSet.create("dsa1", [a], state_dir=tmp_path / "state", tuning=TUNING)
    data = {off: os.urandom(n) for off, n in WRITES}
    for off, buf in data.items():
        write(s, off, buf)
    s.stats = Stats()
    s.add(b)
    assert s.wait(10)
    assert s.stats.copied == WRITTEN + 2 * 4096
    assert s.stats.copied + s.stats.copy_skipped == s.size
    assert a.read_bytes < 2 * WRITTEN
    for off, buf in data.items():
        assert on_member(tmp_path, "b", off, len(buf)) == buf
    assert on_member(tmp_path, "b", STRAY, 8192) == bytes(8192)
    assert b.extent_at(STRAY).mapped is not can_unmap  # punched, or zeroes written
    s.close()


def test_master_read_policy_reads_the_first_full_member_only(tmp_path: Path) -> None:
    vols = [Member(tmp_path / f"{n}.img") for n in "abc"]
    s = ShadowSet.create("dsa1", vols, state_dir=tmp_path / "state", tuning=TUNING,
                         read_policy="master")  # fmt: skip
    assert s.wait(10) and s.show()["read_policy"] == "master"
    before = [v.read_bytes for v in vols]
    for i in range(6):
        read(s, i * 4096, 4096)
    assert [v.read_bytes - b for v, b in zip(vols, before, strict=True)] == [6 * 4096, 0, 0]
    s.remove("a.img")  # b is the master now
    read(s, 0, 4096)
    assert vols[1].read_bytes - before[1] == 4096 and vols[2].read_bytes == before[2]
    s.close()


def test_balanced_read_policy_is_the_default_and_spreads_reads(tmp_path: Path) -> None:
    vols = [Member(tmp_path / f"{n}.img") for n in "ab"]
    s = ShadowSet.create("dsa1", vols, state_dir=tmp_path / "state", tuning=TUNING)
    assert s.wait(10)
    s.close()
    vols = [Member(tmp_path / f"{n}.img") for n in "ab"]
    s = ShadowSet.open("dsa1", vols, state_dir=tmp_path / "state", tuning=TUNING)
    assert s.wait(10) and s.read_policy == "balanced"
    before = [v.read_bytes for v in vols]
    for i in range(4):
        read(s, i * 4096, 4096)
    assert [v.read_bytes - b for v, b in zip(vols, before, strict=True)] == [2 * 4096] * 2
    s.close()


def test_unknown_read_policy_is_refused_in_one_line(tmp_path: Path) -> None:
    vols = [Member(tmp_path / "a.img")]
    with pytest.raises(ShadowError) as e:
        ShadowSet.create("dsa1", vols, state_dir=tmp_path / "state",
                         read_policy="fastest")  # type: ignore[arg-type]  # fmt: skip
    assert str(e.value) == (
        "shadow set 'dsa1': read_policy must be 'balanced' or 'master', not 'fastest'"
    )
    assert not (tmp_path / "state").exists()  # refused before anything was written
    vols[0].close()
