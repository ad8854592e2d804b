"""Cascades: local (ShadowImage) pairs whose P-VOL is a volume of a remote (TrueCopy) pair, on
either array. Update copies reach the local pair like host writes; a local restore onto the
remote pair's volume runs only where that volume takes writes alone, keeps its source intact,
and reaches the other array through the remote pair (docs/pairs.md "Cascades")."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.unit.remotepeers import SIZE, Site, two_sites
from vscsi.pair.manager import PairManager
from vscsi.pair.states import Event as LocalEvent
from vscsi.pair.states import PairError, Role, Status
from vscsi.pair.volume import GRAIN
from vscsi.pair.vpd import parse_page
from vscsi.remote.states import Fence, PairState, cascade

A, B = 410001, 410002


def write(m: PairManager, volume: str, offset: int, data: bytes) -> None:
    m.volume(volume).write(offset, [memoryview(data)])


def data(site: Site, volume: str) -> bytes:
    return bytes(site.vols[volume].data)


def paired(a: Site, b: Site) -> tuple[PairManager, PairManager]:
    """TC pair `tc` Av0 -> B:Bv0 in PAIR, both volumes holding the same random image."""
    assert a.m is not None and b.m is not None
    a.vols["Av0"].write(0, [memoryview(os.urandom(SIZE))])
    a.m.remote.create("tc", "Av0", "B:Bv0", Fence.NEVER)
    assert a.m.wait("tc", 10) and b.m.remote.pair("tc").status is Status.PAIR
    return a.m, b.m


def si(m: PairManager, pvol: str, svol: str) -> None:
    """Local pair `si` pvol -> svol (MU#0) in PAIR."""
    m.create("si", pvol, svol, 0)
    assert m.wait("si", 10) and m.pair("si").status is Status.PAIR


def idle(m: PairManager) -> None:
    """Clear the write-intent logs' idle regions, as a daemon's cleaner does after wil_idle."""
    for pv in m.volumes.values():
        pv.wil.flush_idle(time.monotonic() + 7200)


def corrupt(m: PairManager, volume: str) -> None:
    """A host scribbles over a few grains (the "file system corruption" of the seed)."""
    for g in (1, 7, 30):
        write(m, volume, g * GRAIN, b"\xde\xad" * 2048)


def test_update_copies_reach_a_local_pair_on_the_svol_and_its_split_holds_that_instant(
    tmp_path: Path,
) -> None:
    a, b, _ = two_sites(tmp_path)
    ma, mb = paired(a, b)
    si(mb, "Bv0", "Bv1")
    assert data(b, "Bv1") == data(a, "Av0")
    write(ma, "Av0", 3 * GRAIN, b"u" * 4096)  # an update copy onto Bv0, mirrored to Bv1
    assert data(b, "Bv1") == data(b, "Bv0") == data(a, "Av0")
    ma.volume("Av0").unmap(GRAIN, GRAIN)  # deallocated on all three
    assert data(b, "Bv1")[GRAIN : 2 * GRAIN] == bytes(GRAIN) == data(b, "Bv0")[GRAIN : 2 * GRAIN]
    mb.split("si")
    instant = data(a, "Av0")
    write(ma, "Av0", 5 * GRAIN, b"v" * 4096)  # tracked by the split local pair
    assert data(b, "Bv1") == instant and data(b, "Bv0") == data(a, "Av0")
    changed = mb.pair("si").rec.pdiff
    assert changed is not None and changed.test(5 * GRAIN, 4096) and changed.count() == 1
    mb.resync("si")
    assert mb.wait("si", 10) and data(b, "Bv1") == data(a, "Av0")
    assert mb.display("si")[0]["copy_total"] == GRAIN  # only the tracked grain


def test_a_tc_pair_onto_a_local_pvol_feeds_it_and_never_onto_a_local_svol(
    tmp_path: Path,
) -> None:
    a, b, _ = two_sites(tmp_path)
    assert a.m is not None and b.m is not None
    si(b.m, "Bv0", "Bv1")
    with pytest.raises(PairError, match="Bv1"):
        a.m.remote.create("tc", "Av0", "B:Bv1", Fence.NEVER)  # an S-VOL of a local pair
    a.vols["Av0"].write(0, [memoryview(os.urandom(SIZE))])
    a.m.remote.create("tc", "Av0", "B:Bv0", Fence.NEVER)
    assert a.m.wait("tc", 10) and b.m.wait("si", 10)
    assert data(b, "Bv1") == data(b, "Bv0") == data(a, "Av0")  # the initial copy went through


def test_corruption_recovery_restore_onto_the_tc_pvol_reaches_the_other_array(
    tmp_path: Path,
) -> None:
    """The seed's recovery: the local copy (never shown to the host) is restored onto the TC
    primary and stays intact; the TC resync then carries the restored grains only."""
    a, b, _ = two_sites(tmp_path)
    ma, _ = paired(a, b)
    si(ma, "Av0", "Av1")
    ma.split("si")
    good = data(a, "Av1")
    corrupt(ma, "Av0")
    assert data(b, "Bv0") == data(a, "Av0") != good  # the corruption was mirrored too
    with pytest.raises(PairError, match="PAIR"):
        ma.restore("si")  # the TC pair mirrors the volume: split it first
    ma.remote.split("tc")
    ma.restore("si")
    assert ma.wait("si", 10) and ma.pair("si").status is Status.PSUS
    assert data(a, "Av1") == good  # the local copy untouched
    assert data(a, "Av0") == good
    ma.remote.resync("tc")
    assert ma.wait("tc", 10) and ma.remote.pair("tc").status is Status.PAIR
    assert ma.display("tc")[0]["copy_total"] == 3 * GRAIN  # the restored grains
    assert data(b, "Bv0") == good


def _gate_reads(site: Site, volume: str) -> threading.Event:
    """Hold every read of `volume`'s store until the returned event is set."""
    vol = site.vols[volume]
    opened = threading.Event()
    read = vol.readinto

    def gated(offset: int, bufs: Sequence[memoryview]) -> None:
        opened.wait(10)
        read(offset, bufs)

    vol.readinto = gated  # type: ignore[method-assign]
    return opened


def test_restore_onto_the_tc_svol_needs_a_takeover_and_resync_swaps_carries_it_back(
    tmp_path: Path,
) -> None:
    a, b, _ = two_sites(tmp_path)
    ma, mb = paired(a, b)
    si(mb, "Bv0", "Bv1")
    mb.split("si")
    good = data(b, "Bv1")
    corrupt(ma, "Av0")
    with pytest.raises(PairError, match=r"S-VOL.*\(PAIR\)"):
        mb.restore("si")
    ma.remote.split("tc")  # SSUS at B: the P side may resync over it at any time
    with pytest.raises(PairError, match="SSUS"):
        mb.restore("si")
    mb.remote.split("tc", force_ssws=True)  # B takes its volume over: SSWS
    opened = _gate_reads(b, "Bv1")
    mb.restore("si")
    with pytest.raises(PairError, match="restor"):
        mb.remote.resync("tc", swaps=True)  # would copy a half-restored volume
    opened.set()
    assert mb.wait("si", 10) and data(b, "Bv1") == good == data(b, "Bv0")
    mb.remote.resync("tc", swaps=True)
    assert mb.wait("tc", 10) and mb.remote.pair("tc").status is Status.PAIR
    assert data(a, "Av0") == good and data(b, "Bv1") == good


def test_a_tc_resync_waits_for_a_local_restore_of_its_pvol(tmp_path: Path) -> None:
    a, b, _ = two_sites(tmp_path)
    ma, _ = paired(a, b)
    si(ma, "Av0", "Av1")
    ma.split("si")
    corrupt(ma, "Av0")
    ma.remote.split("tc")
    opened = _gate_reads(a, "Av1")
    ma.restore("si")
    with pytest.raises(PairError, match="restor"):
        ma.remote.resync("tc")
    opened.set()
    assert ma.wait("si", 10)
    ma.remote.resync("tc")
    assert ma.wait("tc", 10) and data(b, "Bv0") == data(a, "Av1") == data(a, "Av0")


def test_a_swap_resync_at_the_peer_waits_for_a_local_restore_of_the_old_pvol(
    tmp_path: Path,
) -> None:
    a, b, _ = two_sites(tmp_path)
    ma, mb = paired(a, b)
    si(ma, "Av0", "Av1")
    ma.split("si")
    ma.remote.split("tc")  # PSUS at A, SSUS at B
    opened = _gate_reads(a, "Av1")
    ma.restore("si")
    with pytest.raises(PairError, match="array A: local pair 'si' is restoring 'Av0'"):
        mb.remote.resync("tc", swaps=True)  # would copy B over a volume being restored
    assert mb.remote.pair("tc").status is Status.SSUS
    assert ma.remote.pair("tc").status is Status.PSUS
    opened.set()
    assert ma.wait("si", 10)


def test_a_restart_keeps_both_pairs_and_the_cascade(tmp_path: Path) -> None:
    a, b, _ = two_sites(tmp_path)
    ma, mb = paired(a, b)
    si(mb, "Bv0", "Bv1")
    mb.split("si")
    instant = data(b, "Bv1")
    for m in (ma, mb):
        idle(m)
        m.close()
    mb, ma = b.start(a), a.start(b)
    assert ma.wait("tc", 10) and ma.remote.pair("tc").status is Status.PAIR
    assert mb.remote.pair("tc").status is Status.PAIR
    assert mb.pair("si").status is Status.PSUS
    write(ma, "Av0", 9 * GRAIN, b"r" * 4096)
    assert data(b, "Bv0") == data(a, "Av0") and data(b, "Bv1") == instant
    with pytest.raises(PairError, match="PAIR"):
        mb.restore("si")
    mb.resync("si")
    assert mb.wait("si", 10) and data(b, "Bv1") == data(a, "Av0")
    ma.close()
    mb.close()


MIRRORS = r"P-VOL of TC pair 'tc' \(PAIR\): the TC pair mirrors"
HALF_DONE = r"S-VOL of TC pair 'tc' \(COPY\): .*half-done"


def test_an_s_array_crash_recopies_its_logged_regions_to_the_local_pair_too(
    tmp_path: Path,
) -> None:
    """Update copies are logged like host writes, so after a crash of the S array its local
    pair in PAIR copies the logged regions again, as the remote pair's resync does."""
    a, b, _ = two_sites(tmp_path)
    ma, mb = paired(a, b)
    si(mb, "Bv0", "Bv1")
    idle(mb)
    write(ma, "Av0", 6 * GRAIN, b"c" * 4096)  # acknowledged by B, maybe only in its cache
    b.vols["Bv1"].data[6 * GRAIN : 6 * GRAIN + 4096] = bytes(4096)  # ... and lost there
    b.crash()
    mb = b.start(a)
    assert mb.wait("si", 10) and mb.pair("si").status is Status.PAIR
    assert data(b, "Bv1") == data(b, "Bv0")
    assert mb.display("si")[0]["copy_total"] == 16 * GRAIN  # the logged 1 MiB region
    ma.remote.pair("tc").exchange()
    ma.remote.resync("tc")
    assert ma.wait("tc", 10) and data(b, "Bv1") == data(b, "Bv0") == data(a, "Av0")


def _state(p: Status, s: Status, **kw: object) -> PairState:
    return PairState(A, B, p, s, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("state", "serial", "event", "refused"),
    [
        (_state(Status.PAIR, Status.PAIR), A, LocalEvent.SPLIT, None),
        (_state(Status.PAIR, Status.PAIR), A, LocalEvent.RESTORE, MIRRORS),
        (_state(Status.COPY, Status.COPY), A, LocalEvent.RESTORE, "COPY"),
        (_state(Status.PSUS, Status.SSUS), A, LocalEvent.RESTORE, None),
        (_state(Status.PSUE, Status.PSUE), A, LocalEvent.RESTORE, None),
        (_state(Status.PSUE, Status.PSUE, fenced=True), A, LocalEvent.RESTORE, "fenced"),
        (_state(Status.PSUE, Status.SSWS, demoted=True), A, LocalEvent.RESTORE, "410002 took"),
        (_state(Status.COPY, Status.COPY), B, LocalEvent.CREATE, None),
        (_state(Status.COPY, Status.COPY), B, LocalEvent.SPLIT, HALF_DONE),
        (_state(Status.COPY, Status.COPY), B, LocalEvent.RESYNC, "COPY"),
        (_state(Status.PAIR, Status.PAIR), B, LocalEvent.SPLIT, None),
        (_state(Status.PAIR, Status.PAIR), B, LocalEvent.RESTORE, "PAIR"),
        (_state(Status.PSUS, Status.SSUS, svol_rw=True), B, LocalEvent.RESTORE, "SSUS"),
        (_state(Status.PSUE, Status.PSUE), B, LocalEvent.SPLIT, None),
        (_state(Status.PSUE, Status.PSUE), B, LocalEvent.RESYNC, "PSUE"),
        (_state(Status.PSUE, Status.SSWS), B, LocalEvent.RESTORE, None),
        (_state(Status.PSUE, Status.SSWS), B, LocalEvent.DELETE, None),
        (_state(Status.SMPL, Status.SMPL), A, LocalEvent.RESTORE, None),
    ],
)  # fmt: skip
def test_the_cascade_table(
    state: PairState, serial: int, event: LocalEvent, refused: str | None
) -> None:
    if refused is None:
        cascade("tc", state, serial, "si", event)
        return
    with pytest.raises(PairError, match=refused) as e:
        cascade("tc", state, serial, "si", event)
    assert "\n" not in str(e.value) and "'si'" in str(e.value)


def test_page_c0_and_display_of_a_cascaded_svol_show_both_pairs(tmp_path: Path) -> None:
    a, b, _ = two_sites(tmp_path)
    _, mb = paired(a, b)
    si(mb, "Bv0", "Bv1")
    vol = mb.display_volume("Bv0")
    assert vol["role"] == "S-VOL"  # a shared volume reports its TC role (brief §2.2)
    assert [p["pair"] for p in vol["pairs"]] == ["tc", "si"]
    horc, mu0 = parse_page(mb.vpd_page("Bv0")).body.slots[:2]
    assert (horc.role, horc.status) == (Role.SVOL, Status.PAIR)
    assert (mu0.role, mu0.status) == (Role.PVOL, Status.PAIR)
