"""Remote (TrueCopy) pairs between two arrays, through the pair manager a daemon serves its
LUNs from: create and mirror, the S-VOL read only, each fence level when the link fails,
resync of only what changed, swap-takeover, SVOL-takeover with the old primary refused after
its restart and `resync --swaps`, a split brain reported, an S side crash never trusted."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.unit.remotepeers import SIZE, Site, two_sites
from vscsi.pair.manager import PairManager
from vscsi.pair.states import Access, PairError, Status, StatusRefused
from vscsi.pair.volume import GRAIN
from vscsi.pair.vpd import FLAG_FENCED, parse_page
from vscsi.remote.states import Fence, Takeover
from vscsi.store.base import WriteProtectedError


def write(m: PairManager, volume: str, offset: int, data: bytes) -> None:
    m.volume(volume).write(offset, [memoryview(data)])


def paired(a: Site, b: Site, fence: Fence = Fence.NEVER) -> tuple[PairManager, PairManager]:
    assert a.m is not None and b.m is not None
    a.vols["Av0"].write(0, [memoryview(os.urandom(SIZE))])
    a.m.remote.create("tc", "Av0", "B:Bv0", fence)
    assert a.m.wait("tc", 10)
    assert a.m.remote.pair("tc").status is Status.PAIR
    assert b.m.remote.pair("tc").status is Status.PAIR
    return a.m, b.m


def same(a: Site, b: Site) -> bool:
    return a.vols["Av0"].data == b.vols["Bv0"].data


def test_create_mirrors_and_the_svol_is_read_only(tmp_path: Path) -> None:
    a, b, _ = two_sites(tmp_path)
    ma, mb = paired(a, b)
    assert same(a, b)
    write(ma, "Av0", 4096, b"w" * 4096)
    assert same(a, b)
    assert mb.access("Bv0") is Access.READ_ONLY
    with pytest.raises(WriteProtectedError):
        write(mb, "Bv0", 0, b"x" * 512)
    page = parse_page(ma.vpd_page("Av0")).body.slots[0]
    assert (page.role.value, page.status.value, page.partner_serial) == ("P-VOL", "PAIR", 410002)
    page = parse_page(mb.vpd_page("Bv0")).body.slots[0]
    assert (page.role.value, page.status.value) == ("S-VOL", "PAIR")


@pytest.mark.parametrize(
    ("fence", "write_ok", "p_access"),
    [(Fence.DATA, False, Access.READ_ONLY), (Fence.STATUS, False, Access.READ_WRITE),
     (Fence.NEVER, True, Access.READ_WRITE)],
)  # fmt: skip
def test_link_failure_under_each_fence_level(tmp_path, fence, write_ok, p_access) -> None:
    """Brief §3.1; with the link down the S side cannot be marked suspended, so `status`
    fails the write like `data` does, but leaves the P-VOL writable for later writes."""
    a, b, link = two_sites(tmp_path)
    ma, _ = paired(a, b, fence)
    link.up = False
    if write_ok:
        write(ma, "Av0", 8 * GRAIN, b"n" * 4096)
    else:
        with pytest.raises(WriteProtectedError):
            write(ma, "Av0", 8 * GRAIN, b"n" * 4096)
    pair = ma.remote.pair("tc")
    assert pair.status is Status.PSUE and ma.access("Av0") is p_access
    fenced = parse_page(ma.vpd_page("Av0")).body.slots[0].flags & FLAG_FENCED
    assert bool(fenced) is (fence is Fence.DATA)  # what a host's page 0xC0 shows
    assert pair.rec.pdiff is not None and pair.rec.pdiff.test(8 * GRAIN, 4096)
    link.up = True
    if fence is Fence.DATA:
        with pytest.raises(WriteProtectedError):
            write(ma, "Av0", 0, b"d" * 512)  # fenced until a resync or a PVOL-takeover
    ma.remote.resync("tc")
    assert pair.wait(10) and pair.status is Status.PAIR
    assert ma.display("tc")[0]["copy_total"] == GRAIN  # only the changed grain
    assert same(a, b)


def test_a_flush_the_link_failed_counts_only_the_writes_as_changed(tmp_path: Path) -> None:
    """The S array's own write-intent log answers for its cache, so a SYNCHRONIZE CACHE that
    the link failed does not make the resync copy the whole volume (a flush the S array
    failed does: any write since the last flush may be gone)."""
    a, b, link = two_sites(tmp_path)
    ma, _ = paired(a, b)
    link.up = False
    ma.volume("Av0").flush()  # the first command after the cut: PAIR -> PSUE
    pair = ma.remote.pair("tc")
    assert pair.status is Status.PSUE
    write(ma, "Av0", 5 * GRAIN, b"f" * 4096)
    assert pair.rec.pdiff is not None and pair.rec.pdiff.dirty_bytes() == GRAIN
    link.up = True
    ma.remote.resync("tc")
    assert pair.wait(10) and ma.display("tc")[0]["copy_total"] == GRAIN
    assert same(a, b)


def test_swap_takeover_with_both_sides_up_moves_the_primary(tmp_path: Path) -> None:
    a, b, _ = two_sites(tmp_path)
    ma, mb = paired(a, b)
    assert mb.remote.takeover("tc") is Takeover.SWAP
    assert mb.remote.pair("tc").status is Status.PAIR and mb.access("Bv0") is Access.READ_WRITE
    assert ma.access("Av0") is Access.READ_ONLY
    write(mb, "Bv0", 0, b"B" * 4096)  # now mirrored B -> A
    assert same(a, b)


def test_svol_takeover_old_primary_refused_after_restart_then_swapped_back(
    tmp_path: Path,
) -> None:
    a, b, _ = two_sites(tmp_path)
    _, mb = paired(a, b)
    a.crash()  # the P site's daemon dies
    assert mb.remote.takeover("tc") is Takeover.SVOL_E  # 225: P side unknown
    assert mb.remote.pair("tc").status is Status.SSWS
    write(mb, "Bv0", 3 * GRAIN, b"S" * 4096)
    ma = a.start(b)  # the old primary comes back
    assert ma.remote.pair("tc").exchange() is not None
    assert ma.access("Av0") is Access.READ_ONLY  # never two primaries
    slot = parse_page(ma.vpd_page("Av0")).body.slots[0]
    assert slot.role.value == "P-VOL" and slot.flags & FLAG_FENCED  # a host sees it demoted
    with pytest.raises(WriteProtectedError):
        write(ma, "Av0", 0, b"old" * 100)
    with pytest.raises(PairError, match="resync --swaps"):
        ma.remote.takeover("tc")
    mb.remote.resync("tc", swaps=True)
    pair = mb.remote.pair("tc")
    assert pair.wait(10) and pair.status is Status.PAIR
    assert mb.display("tc")[0]["copy_total"] == GRAIN  # B's change only
    assert same(a, b)
    assert ma.access("Av0") is Access.READ_ONLY and mb.access("Bv0") is Access.READ_WRITE


def test_an_update_copy_routed_before_an_svol_takeover_is_refused_after_it(
    tmp_path: Path,
) -> None:
    """The link routes an update copy, then may wait before applying it (behind other
    writes in flight): a takeover in between must win, or the old primary's write would land
    on a volume the S site now owns."""
    a, b, _ = two_sites(tmp_path)
    _, mb = paired(a, b)
    target = mb.remote.replica_target("Bv0", a.serial)  # routed while in PAIR
    a.crash()
    assert mb.remote.takeover("tc") is Takeover.SVOL_E
    before = bytes(b.vols["Bv0"].data)
    with pytest.raises(StatusRefused, match="takes no update copies"):
        target.write(0, [memoryview(b"late" * 1024)])
    with pytest.raises(StatusRefused, match="takes no update copies"):
        target.unmap(0, 4096)
    assert b.vols["Bv0"].data == before


def test_a_split_brain_is_reported_on_both_sides_and_stops_the_old_primary(
    tmp_path: Path,
) -> None:
    a, b, link = two_sites(tmp_path)
    ma, mb = paired(a, b)
    link.up = False
    write(ma, "Av0", 0, b"A" * 4096)  # fence never: PSUE, written alone
    assert mb.remote.takeover("tc") is Takeover.SVOL_E
    write(mb, "Bv0", GRAIN, b"B" * 4096)  # written alone too
    link.up = True
    ma.remote.pair("tc").exchange()
    mb.remote.pair("tc").exchange()
    for m in (ma, mb):
        assert m.remote.pair("tc").info["split_brain"] is True
    assert ma.access("Av0") is Access.READ_ONLY


def test_an_s_side_crash_suspends_the_pair_and_the_resync_copies_its_logged_regions(
    tmp_path: Path,
) -> None:
    a, b, _ = two_sites(tmp_path)
    ma, _ = paired(a, b)
    write(ma, "Av0", 5 * GRAIN, b"c" * 4096)  # acknowledged by B, maybe only in its cache
    b.vols["Bv0"].data[5 * GRAIN : 5 * GRAIN + 4096] = bytes(4096)  # ... and lost with it
    b.crash()
    mb = b.start(a)
    assert mb.remote.pair("tc").status is Status.PSUE
    ma.remote.pair("tc").exchange()
    assert ma.remote.pair("tc").status is Status.PSUE
    ma.remote.resync("tc")
    assert ma.remote.pair("tc").wait(10)
    assert same(a, b)


def test_the_periodic_exchange_demotes_a_returning_old_primary_by_itself(
    tmp_path: Path,
) -> None:
    a, b, _ = two_sites(tmp_path)
    _, mb = paired(a, b)
    a.crash()
    assert mb.remote.takeover("tc") is Takeover.SVOL_E
    ma = a.start(b)
    ma.remote.watch(0.05)
    deadline = time.monotonic() + 10
    while ma.access("Av0") is not Access.READ_ONLY:
        assert time.monotonic() < deadline, "the old primary was not demoted"
        time.sleep(0.05)
    ma.close()


def test_a_primary_restarted_without_its_peer_is_fenced_until_a_takeover_here(
    tmp_path: Path,
) -> None:
    """It cannot know whether the S side took over meanwhile: no writes on an unconfirmed
    state. With the link up the restart changes nothing."""
    a, b, link = two_sites(tmp_path)
    paired(a, b)
    a.crash()
    ma = a.start(b)
    ma.remote.check_peers()
    assert ma.remote.pair("tc").status is Status.PAIR and ma.access("Av0") is Access.READ_WRITE
    a.crash()
    link.up = False
    ma = a.start(b)
    ma.remote.check_peers()
    assert ma.remote.pair("tc").status is Status.PSUE and ma.access("Av0") is Access.READ_ONLY
    assert ma.remote.takeover("tc") is Takeover.PVOL_PSUE  # the operator's (or agent's) call
    write(ma, "Av0", 0, b"p" * 4096)


def test_a_create_refused_after_the_peer_answered_withdraws_the_peers_s_vol(
    tmp_path: Path,
) -> None:
    """The peer records its S-VOL before the P side adopts the pair; a local pair that takes
    the P-VOL as its S-VOL meanwhile makes the create fail here, and the peer's record is
    withdrawn, so no S-VOL stays read only for a pair that does not exist. Forced: the local
    pair is created inside the peer's answer."""
    a, b, _ = two_sites(tmp_path)
    assert a.m is not None and b.m is not None
    ma, mb = a.m, b.m
    real = a.peer.call

    def meanwhile(op: str, **args: object) -> dict[str, object]:
        answer = real(op, **args)
        if op == "create":
            ma.create("si", "Av1", "Av0", 0)
        return answer

    a.peer.call = meanwhile  # type: ignore[method-assign]
    with pytest.raises(PairError, match="already in a remote pair or an S-VOL"):
        ma.remote.create("tc", "Av0", "B:Bv0", Fence.NEVER)
    assert "tc" not in ma.remote.pairs and "tc" not in mb.remote.pairs
    assert mb.access("Bv0") is Access.READ_WRITE  # SMPL again
    assert ma.wait("si", 10) and ma.pair("si").status is Status.PAIR
