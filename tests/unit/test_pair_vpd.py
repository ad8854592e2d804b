"""Vendor VPD page 0xC0: construct round trip, and what the manager puts in it."""

from __future__ import annotations

from pathlib import Path

from tests.unit.pairvolumes import manager, volumes
from vscsi.pair.states import Role, Status
from vscsi.pair.vpd import PAGE_CODE, SLOTS, Slot, SlotInfo, build_page, parse_page


def test_round_trip_and_layout() -> None:
    info = SlotInfo(Role.PVOL, Status.PSUS, 97, 410002, 0x1234, 7, True)
    page = build_page(410001, 0x42, "CL1-A", {1: info})
    assert page[:2] == bytes([0, PAGE_CODE])
    assert int.from_bytes(page[2:4], "big") == len(page) - 4 == 24 + SLOTS * Slot.sizeof()
    body = parse_page(page).body
    assert (body.version, body.serial, body.volume_id, body.port) == (1, 410001, 0x42, "CL1-A")
    remote, mu0, mu1, mu2 = body.slots
    assert remote.kind == 0 and remote.role is Role.SMPL
    assert mu0.status is Status.SMPL and mu2.status is Status.SMPL
    assert (mu1.kind, mu1.mu, mu1.role, mu1.status, mu1.progress) == (
        1,
        1,
        Role.PVOL,
        Status.PSUS,
        97,
    )
    assert (mu1.partner_serial, mu1.partner_volume_id, mu1.generation, mu1.flags) == (
        410002, 0x1234, 7, 1,
    )  # fmt: skip


def test_manager_page_generation_increments(tmp_path: Path) -> None:
    vols = volumes(2)
    changed: list[str] = []
    m = manager(str(tmp_path), vols, on_change=changed.append)
    gens = []

    def slot(vol: str):
        return parse_page(m.vendor_pages(vol)[PAGE_CODE]()).body.slots[1]

    assert slot("v0").role is Role.SMPL
    m.create("p", "v0", "v1", 0)
    assert m.wait("p", 10)
    gens.append(slot("v0").generation)
    s = slot("v1")
    assert (s.role, s.status, s.partner_volume_id) == (Role.SVOL, Status.PAIR, 0x100)
    assert slot("v0").partner_volume_id == 0x101
    m.split("p")
    gens.append(slot("v0").generation)
    m.resync("p")
    assert m.wait("p", 10)
    gens.append(slot("v1").generation)
    assert gens == sorted(set(gens)) and gens[0] == 2
    assert changed.count("v0") == changed.count("v1") == 5  # create, done, split, resync, done
    m.delete("p")
    assert slot("v0").role is Role.SMPL
    m.close()
