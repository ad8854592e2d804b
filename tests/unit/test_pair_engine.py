"""Pair operations on in-memory volumes: data, single-instant split, resync and restore
copying only the changed grains, errors on either side, several MUs, racing host writes."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import pytest

from tests.unit.pairvolumes import MIB, manager, read, volumes, write
from vscsi.pair.manager import PairManager
from vscsi.pair.states import PairError, Status
from vscsi.pair.volume import GRAIN
from vscsi.store.base import MediumError, NotReadyError, WriteProtectedError

SIZE = 4 * MIB


@pytest.fixture
def env(tmp_path: Path):
    vols = volumes(5, SIZE)
    m = manager(str(tmp_path), vols)
    yield m, vols
    m.close()


def paired(m: PairManager, name: str = "p", p: str = "v0", s: str = "v1", mu: int = 0) -> None:
    m.create(name, p, s, mu)
    assert m.wait(name, 10)
    assert m.pair(name).status is Status.PAIR


def test_create_copies_everything(env) -> None:
    m, vols = env
    paired(m)
    assert vols["v1"].data == vols["v0"].data
    assert m.replicas["v1"].written == SIZE
    d = m.display("p")[0]
    assert (d["status"], d["progress"], d["pvol"]["role"], d["svol"]["role"]) == (
        "PAIR", 100, "P-VOL", "S-VOL",
    )  # fmt: skip
    assert d["svol"]["volume_id"] == 0x101 and d["svol"]["access"] == "read only"


def test_copy_progress_and_pair_writes_mirrored(tmp_path: Path) -> None:
    vols = volumes(2, SIZE)
    m = manager(str(tmp_path), vols, paused=frozenset({"v1"}))
    m.create("p", "v0", "v1", 0)
    assert m.pair("p").status is Status.COPY
    assert m.display("p")[0]["progress"] == 0
    assert m.volume("v1").read_only
    m.replicas["v1"].gate.set()
    assert m.wait("p", 10)
    assert m.display("p")[0]["progress"] == 100
    write(m.volume("v0"), 8192, b"x" * 4096)
    assert vols["v1"].data[8192 : 8192 + 4096] == b"x" * 4096
    m.close()


def test_split_is_a_single_instant(env) -> None:
    m, vols = env
    paired(m)
    p = m.volume("v0")
    stop = threading.Event()
    acked: list[int] = []

    def writer() -> None:
        i = 0
        while not stop.is_set():
            write(p, (i % 64) * 4096, i.to_bytes(4, "big") * 1024)
            acked.append(i)
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    while len(acked) < 128:  # every one of the 64 slots written before the split
        pass
    m.split("p")
    at_split = len(acked)
    while len(acked) < at_split + 50:
        pass
    stop.set()
    t.join()
    # every write acknowledged before the split is on S; the S-VOL holds a write <= the last
    # one acknowledged before split returned, never one issued after it
    s_data = vols["v1"].data
    last = max(int.from_bytes(s_data[k * 4096 : k * 4096 + 4], "big") for k in range(64))
    assert at_split - 1 <= last <= at_split
    assert m.pair("p").status is Status.PSUS
    assert m.volume("v1").read_only is False


def test_resync_copies_exactly_the_union(env) -> None:
    m, vols = env
    paired(m)
    m.split("p")
    p, s = m.volume("v0"), m.volume("v1")
    write(p, 0, b"a" * 4096)  # grain 0
    write(p, 5 * GRAIN + 512, b"b" * 512)  # grain 5
    write(s, 5 * GRAIN, b"c" * 512)  # grain 5 again (union)
    write(s, 9 * GRAIN, b"d" * GRAIN)  # grain 9
    d = m.display("p")[0]
    assert d["pvol"]["changed_bytes"] == 2 * GRAIN and d["svol"]["changed_bytes"] == 2 * GRAIN
    before = m.replicas["v1"].written
    m.resync("p")
    assert m.wait("p", 10)
    assert m.replicas["v1"].written - before == 3 * GRAIN
    assert vols["v1"].data == vols["v0"].data
    assert m.pair("p").status is Status.PAIR


def test_restore_rolls_back_and_keeps_s(env) -> None:
    m, vols = env
    paired(m)
    m.split("p")
    snapshot = bytes(vols["v1"].data)
    p = m.volume("v0")
    write(p, 3 * GRAIN, os.urandom(2 * GRAIN))  # "corruption" after the split
    m.replicas["v1"].reads = 0
    m.restore("p")
    assert m.wait("p", 10)
    assert m.replicas["v1"].reads == 2 * GRAIN
    assert vols["v0"].data == snapshot and vols["v1"].data == snapshot
    assert m.pair("p").status is Status.PSUS
    assert m.display("p")[0]["pvol"]["changed_bytes"] == 0


def test_rcpy_refuses_p_writes_not_ready(env) -> None:
    m, vols = env
    paired(m)
    m.split("p")
    write(m.volume("v0"), 0, b"z" * GRAIN)
    m.replicas["v1"].gate.clear()  # restore reads S, never writes it: pause via P instead
    vols["v0"].failing = False
    gate = threading.Event()
    orig = vols["v0"].write

    def slow_write(offset, bufs, fua=False):
        gate.wait()
        orig(offset, bufs, fua)

    vols["v0"].write = slow_write  # type: ignore[method-assign]
    m.restore("p")
    assert m.pair("p").status is Status.RCPY
    with pytest.raises(NotReadyError) as exc:
        write(m.volume("v0"), 0, b"q" * 512)
    assert (exc.value.asc, exc.value.ascq) == (0x04, 0x07)
    assert read(m.volume("v0"), 2 * MIB, 512)  # reads still served (outside the held chunk)
    with pytest.raises(WriteProtectedError):
        write(m.volume("v1"), 0, b"q" * 512)
    gate.set()
    assert m.wait("p", 10)
    m.replicas["v1"].gate.set()


def test_delete_during_copy(tmp_path: Path) -> None:
    vols = volumes(3, SIZE)
    m = manager(str(tmp_path), vols, paused=frozenset({"v1"}))
    m.create("p", "v0", "v1", 0)
    rep = m.replicas["v1"]
    threading.Timer(0.05, rep.gate.set).start()
    m.delete("p")
    assert m.display() == []
    v = m.display_volume("v1")
    assert v["role"] == "SMPL" and v["content"].startswith("undefined")
    write(m.volume("v1"), 0, b"w" * 512)  # simplex again: writable
    m.create("p", "v0", "v1", 0)  # and can be paired again; the note goes
    m.replicas["v1"].gate.set()
    assert m.wait("p", 10) and vols["v1"].data == vols["v0"].data
    assert "content" not in m.display_volume("v1")
    m.close()


def test_svol_error_suspends_and_host_write_succeeds(env) -> None:
    m, vols = env
    paired(m)
    vols["v1"].failing = True
    write(m.volume("v0"), 2 * GRAIN, b"e" * 4096)  # no exception for the host
    pair = m.pair("p")
    assert pair.status is Status.PSUE
    assert vols["v0"].data[2 * GRAIN : 2 * GRAIN + 4096] == b"e" * 4096
    with pytest.raises(NotReadyError) as exc:
        read(m.volume("v1"), 0, 512)
    assert (exc.value.asc, exc.value.ascq) == (0x04, 0x03)
    write(m.volume("v0"), 7 * GRAIN, b"f" * 512)
    assert m.display("p")[0]["pvol"]["changed_bytes"] == 2 * GRAIN
    vols["v1"].failing = False
    before = m.replicas["v1"].written
    m.resync("p")
    assert m.wait("p", 10)
    assert m.replicas["v1"].written - before == 2 * GRAIN
    assert vols["v1"].data == vols["v0"].data


def test_svol_error_during_copy_keeps_the_rest_to_copy(env) -> None:
    m, vols = env
    vols["v1"].failing = True
    m.create("p", "v0", "v1", 0)
    m.wait("p", 10)
    assert m.pair("p").status is Status.PSUE
    assert m.display("p")[0]["pvol"]["changed_bytes"] == SIZE
    vols["v1"].failing = False
    m.resync("p")
    assert m.wait("p", 10)
    assert vols["v1"].data == vols["v0"].data


def test_pvol_error_fails_the_command_and_the_range_is_copied_again(env) -> None:
    """D11a: half of the failed write is on the P-VOL, none on the S-VOL: the pair re-copies
    the range (COPY) instead of believing P == S."""
    m, vols = env
    paired(m)
    m.replicas["v1"].gate.clear()  # hold the re-copy so its status can be seen
    vols["v0"].failing = vols["v0"].torn = True
    with pytest.raises(MediumError):
        write(m.volume("v0"), 0, b"x" * 4096)
    vols["v0"].failing = False
    try:
        assert m.pair("p").status is Status.COPY
        assert m.display("p")[0]["copy_total"] == GRAIN
    finally:
        m.replicas["v1"].gate.set()
    assert m.wait("p", 10)
    assert m.pair("p").status is Status.PAIR
    assert vols["v1"].data == vols["v0"].data


def test_pvol_error_while_split_is_a_pvol_change(env) -> None:
    """D11a in PSUS: the failed range counts as changed, so a resync makes S == P."""
    m, vols = env
    paired(m)
    m.split("p")
    vols["v0"].failing = vols["v0"].torn = True
    with pytest.raises(MediumError):
        write(m.volume("v0"), 5 * GRAIN, b"x" * 4096)
    vols["v0"].failing = False
    assert m.display("p")[0]["pvol"]["changed_bytes"] == GRAIN
    m.resync("p")
    assert m.wait("p", 10)
    assert vols["v1"].data == vols["v0"].data


def test_three_mus_at_once(env) -> None:
    m, vols = env
    for mu, s in enumerate(["v1", "v2", "v3"]):
        m.create(f"p{mu}", "v0", s, mu)
    for mu in range(3):
        assert m.wait(f"p{mu}", 10)
    write(m.volume("v0"), 0, b"m" * 4096)
    for s in ("v1", "v2", "v3"):
        assert vols[s].data == vols["v0"].data
    m.split("p1")
    write(m.volume("v0"), GRAIN, b"n" * 512)
    assert vols["v2"].data != vols["v0"].data and vols["v1"].data == vols["v0"].data
    with pytest.raises(PairError, match="MU#0 of 'v0' is in use"):
        m.create("p9", "v0", "v4", 0)
    with pytest.raises(PairError, match="MU#3 does not exist"):
        m.create("p9", "v0", "v4", 3)
    with pytest.raises(PairError, match="split it"):
        m.restore("p1")  # p0 and p2 are still PAIR


def test_operation_refusals(env) -> None:
    m, _ = env
    with pytest.raises(PairError, match="no pair 'nope'"):
        m.split("nope")
    with pytest.raises(PairError, match="no volume 'vx'"):
        m.create("p", "v0", "vx", 0)
    with pytest.raises(PairError, match="itself"):
        m.create("p", "v0", "v0", 0)
    paired(m)
    with pytest.raises(PairError, match="already exists"):
        m.create("p", "v0", "v2", 1)
    with pytest.raises(PairError, match="not simplex"):
        m.create("q", "v2", "v1", 0)
    with pytest.raises(PairError, match="S-VOL of pair 'p'"):
        m.create("q", "v1", "v2", 0)
    with pytest.raises(PairError, match="cannot resync pair 'p': it is PAIR"):
        m.resync("p")
    with pytest.raises(PairError, match="cannot restore pair 'p': it is PAIR"):
        m.restore("p")
    m.split("p", read_only=True)
    with pytest.raises(PairError, match="cannot split pair 'p': it is PSUS"):
        m.split("p")
    with pytest.raises(WriteProtectedError):
        write(m.volume("v1"), 0, b"r" * 512)
    assert m.volume("v1").read_only


def test_small_svol_refused(tmp_path: Path) -> None:
    vols = volumes(2, SIZE)
    vols["v1"].data = bytearray(SIZE // 2)
    m = manager(str(tmp_path), vols)
    with pytest.raises(PairError, match="cannot hold"):
        m.create("p", "v0", "v1", 0)
    m.close()


def test_racing_host_writes_during_copy(env) -> None:
    m, vols = env
    p = m.volume("v0")
    stop = threading.Event()

    def writer(seed: int) -> None:
        rnd = random.Random(seed)
        while not stop.is_set():
            off = rnd.randrange(0, SIZE // 512 - 16) * 512
            write(p, off, rnd.randbytes(512 * rnd.randint(1, 16)))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for _ in range(3):
        m.create("p", "v0", "v1", 0)
        m.wait("p", 20)
        m.split("p")
        m.resync("p")
        m.wait("p", 20)
        m.split("p")
        stop.set()
        for t in threads:
            t.join()
        m.resync("p")
        assert m.wait("p", 20)
        assert vols["v1"].data == vols["v0"].data
        m.delete("p")
        stop.clear()
        threads = [threading.Thread(target=writer, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
    stop.set()
    for t in threads:
        t.join()


def test_svol_flush_error_during_copy_suspends_and_resync_copies_everything(
    tmp_path: Path,
) -> None:
    vols = volumes(2, SIZE)
    vols["v1"].flush_failing = True
    m = manager(str(tmp_path), vols, checkpoint_interval=0.0)
    m.create("p", "v0", "v1", 0)
    assert m.wait("p", 10)
    d = m.display("p")[0]
    assert d["status"] == "PSUE" and d["pvol"]["changed_bytes"] == SIZE  # anything may be lost
    vols["v1"].flush_failing = False
    m.resync("p")
    assert m.wait("p", 10) and m.pair("p").status is Status.PAIR
    assert m.display("p")[0]["copy_total"] == SIZE
    assert vols["v1"].data == vols["v0"].data
    m.close()


def crash_with_write_in_flight(m: PairManager, vols: dict, name: str, offset: int) -> None:
    """The write intent is durable and the write reached the volume, then the process died:
    no end of the intent, no mirror, no close."""
    m.volume(name).wil.begin(offset, 4096)
    vols[name].data[offset : offset + 4096] = b"n" * 4096


def test_crash_in_pair_with_a_write_in_flight_recopies_it(tmp_path: Path) -> None:
    vols = volumes(2, SIZE)
    m = manager(str(tmp_path), vols)
    paired(m)
    crash_with_write_in_flight(m, vols, "v0", 3 * GRAIN)
    assert vols["v1"].data != vols["v0"].data
    m2 = manager(str(tmp_path), vols)
    assert m2.wait("p", 10)  # the recovery copy runs in the background (COPY)
    assert m2.pair("p").status is Status.PAIR
    assert vols["v1"].data == vols["v0"].data
    m2.close()


def test_crash_in_psus_counts_writes_in_flight_as_changed_on_their_side(tmp_path: Path) -> None:
    vols = volumes(2, SIZE)
    m = manager(str(tmp_path), vols)
    paired(m)
    m.split("p")
    crash_with_write_in_flight(m, vols, "v0", 5 * GRAIN)
    crash_with_write_in_flight(m, vols, "v1", 9 * GRAIN)
    m2 = manager(str(tmp_path), vols)
    d = m2.display("p")[0]
    assert d["status"] == "PSUS"
    assert d["pvol"]["changed_bytes"] >= GRAIN and d["svol"]["changed_bytes"] >= GRAIN
    m2.resync("p")
    assert m2.wait("p", 10)
    assert vols["v1"].data == vols["v0"].data
    m2.close()
