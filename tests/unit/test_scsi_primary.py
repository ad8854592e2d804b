"""SPC-4 commands of the LUN: INQUIRY/VPD, MODE SENSE/SELECT, REQUEST SENSE, RSOC, UAs."""

from __future__ import annotations

import pytest

from tests.unit.memvolume import MemVolume
from tests.unit.scsi_harness import BS, IDENT, Sense, cdb, check, good, make_lun, run
from vscsi.scsi.identity import Identity
from vscsi.scsi.lun import Lun
from vscsi.scsi.result import GOOD

INVALID_CDB = (0x5, 0x24, 0x00)
INVALID_PARAM = (0x5, 0x26, 0x00)


@pytest.fixture
def lun() -> Lun:
    return make_lun()


def inquiry(lun: Lun, page: int | None = None, alloc: int = 255) -> bytes:
    if page is None:
        return good(lun, cdb("INQUIRY", alloc_len=alloc), size=alloc)
    return good(lun, cdb("INQUIRY", b1={"evpd": True}, page_code=page, alloc_len=alloc), size=alloc)


# -- TEST UNIT READY, START STOP, PREVENT ALLOW, unknown opcodes ----------------------------------


def test_simple_commands(lun: Lun) -> None:
    good(lun, cdb("TEST UNIT READY"))
    good(lun, cdb("START STOP UNIT", b4={"start": True}))
    good(lun, cdb("START STOP UNIT", b1={"immed": True}, b4={"start": False}))
    good(lun, cdb("PREVENT ALLOW MEDIUM REMOVAL", b4={"prevent": 1}))


@pytest.mark.parametrize("opcode", [0x01, 0x04, 0x1D, 0x37, 0x7F, 0xC5, 0xFF, 0xA0, 0x5E])
def test_unimplemented_opcodes(lun: Lun, opcode: int) -> None:
    assert check(lun, bytes([opcode]) + bytes(15)).code == (0x5, 0x20, 0x00)


def test_empty_cdb(lun: Lun) -> None:
    assert check(lun, b"").code == INVALID_CDB


def test_unknown_maintenance_in_service_action(lun: Lun) -> None:
    raw = bytes([0xA3, 0x0A]) + bytes(10)  # REPORT TARGET PORT GROUPS: not ours
    s = check(lun, raw, size=64)
    assert s.code == INVALID_CDB and s.pointer == (True, 1, 4)


# -- INQUIRY -----------------------------------------------------------------------------------


def test_standard_inquiry(lun: Lun) -> None:
    d = inquiry(lun)
    assert len(d) == 96 and d[0] == 0 and d[1] == 0 and d[2] == 0x06  # SPC-4, not removable
    assert d[3] == 0x12 and d[4] == 91 and d[7] == 0x02  # HISUP + format 2, CMDQUE
    assert d[8:16] == b"VSCSI   " and d[16:32] == b"OPEN-V".ljust(16) and d[32:36] == b"0100"
    assert [int.from_bytes(d[58 + 2 * i : 60 + 2 * i], "big") for i in range(3)] == [
        0x00A0,
        0x0460,
        0x04C0,
    ]


def test_inquiry_allocation_length_truncates(lun: Lun) -> None:
    d = inquiry(lun, alloc=5)
    assert len(d) == 5 and d[4] == 91
    assert inquiry(lun, alloc=0) == b""
    d = inquiry(lun, 0x83, alloc=6)
    assert len(d) == 6 and int.from_bytes(d[2:4], "big") > 2


def test_inquiry_field_errors(lun: Lun) -> None:
    s = check(lun, cdb("INQUIRY", page_code=0x80, alloc_len=64), size=64)
    assert s.code == INVALID_CDB and s.pointer == (True, 2, None)
    s = check(lun, cdb("INQUIRY", b1={"cmddt": True}, alloc_len=64), size=64)
    assert s.code == INVALID_CDB and s.pointer == (True, 1, 1)
    s = check(lun, cdb("INQUIRY", b1={"evpd": True}, page_code=0x99, alloc_len=64), size=64)
    assert s.code == INVALID_CDB and s.pointer == (True, 2, None)
    s = check(lun, cdb("INQUIRY", b1={"evpd": True}, page_code=0xC0, alloc_len=64), size=64)
    assert s.code == INVALID_CDB


def test_vpd_supported_pages(lun: Lun) -> None:
    d = inquiry(lun, 0x00)
    assert d[1] == 0 and list(d[4:]) == [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]
    assert int.from_bytes(d[2:4], "big") == 6


def test_vendor_pages_are_listed_and_served() -> None:
    page = bytes([0, 0xC0, 0, 4]) + b"PAIR"
    lun = Lun(MemVolume(), IDENT, vendor_pages={0xC0: lambda: page})
    assert list(inquiry(lun, 0x00)[4:]) == [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2, 0xC0]
    assert inquiry(lun, 0xC0) == page
    with pytest.raises(ValueError):
        Lun(MemVolume(), IDENT, vendor_pages={0x85: lambda: page})


def test_vpd_unit_serial(lun: Lun) -> None:
    d = inquiry(lun, 0x80)
    assert d[1] == 0x80 and d[4:] == b"41000100100" and d[3] == 11


def test_vpd_device_identification(lun: Lun) -> None:
    d = inquiry(lun, 0x83)
    assert d[1] == 0x83 and int.from_bytes(d[2:4], "big") == len(d) - 4
    # NAA designator: binary, association LU (0), PIV 0, type 3 (NAA), 16 bytes
    assert d[4:8] == bytes([0x01, 0x03, 0, 16])
    naa = d[8:24]
    assert naa[0] >> 4 == 6 and int.from_bytes(naa, "big") >> 100 & 0xFFFFFF == 0x001405
    assert int.from_bytes(naa, "big") >> 64 & 0xFFFFFFFFF == 410001
    assert int.from_bytes(naa[-2:], "big") == 0x100
    # T10 vendor id: ASCII, association LU, type 1
    assert d[24:27] == bytes([0x02, 0x01, 0]) and d[28:36] == b"VSCSI   "
    assert d[36 : 28 + d[27]] == b"OPEN-V-41000100100"


def test_naa_is_stable_and_unique_per_volume() -> None:
    def naa(ident: Identity) -> bytes:
        return inquiry(Lun(MemVolume(size=1 << 20), ident), 0x83)[8:24]

    a = naa(IDENT)
    assert a == naa(IDENT)
    assert a != naa(Identity(serial=410001, volume_id=0x101))
    assert a != naa(Identity(serial=410002, volume_id=0x100))


def test_vpd_block_limits(lun: Lun) -> None:
    d = inquiry(lun, 0xB0)
    assert d[1] == 0xB0 and int.from_bytes(d[2:4], "big") == 0x3C and len(d) == 0x40

    def u32(at: int) -> int:
        return int.from_bytes(d[at : at + 4], "big")

    assert d[5] == 128  # MAXIMUM COMPARE AND WRITE LENGTH
    assert u32(8) == (8 << 20) // BS and u32(12) == (1 << 20) // BS
    assert u32(20) == (64 << 20) // BS and u32(24) == 256 and u32(28) == 4096 // BS
    assert int.from_bytes(d[36:44], "big") == (64 << 20) // BS
    thick = inquiry(make_lun(unmap=False), 0xB0)
    assert thick[20:32] == bytes(12)
    custom = inquiry(Lun(MemVolume(), IDENT, max_transfer_blocks=64), 0xB0)
    assert int.from_bytes(custom[8:12], "big") == 64


def test_vpd_characteristics_and_provisioning(lun: Lun) -> None:
    d = inquiry(lun, 0xB1)
    assert int.from_bytes(d[2:4], "big") == 0x3C and int.from_bytes(d[4:6], "big") == 1
    d = inquiry(lun, 0xB2)
    assert d[5] == 0xE4 and d[6] & 0x07 == 2  # LBPU LBPWS LBPWS10 LBPRZ; thin
    d = inquiry(make_lun(unmap=False), 0xB2)
    assert d[5] == 0 and d[6] & 0x07 == 0


# -- MODE SENSE / MODE SELECT ----------------------------------------------------------------


def mode_sense6(lun: Lun, page: int, pc: int = 0, subpage: int = 0, dbd: bool = False) -> bytes:
    raw = cdb(
        "MODE SENSE(6)",
        b1={"dbd": dbd},
        b2={"page": page, "pc": pc},
        subpage=subpage,
        alloc_len=255,
    )
    return good(lun, raw, size=255)


def test_mode_sense6_all_pages(lun: Lun) -> None:
    d = mode_sense6(lun, 0x3F)
    assert d[0] == len(d) - 1 and d[1] == 0 and d[2] == 0x10 and d[3] == 8  # DPOFUA
    assert int.from_bytes(d[4:8], "big") == (8 << 20) // BS and d[9:12] == BS.to_bytes(3, "big")
    pages = d[12:]
    codes = []
    while pages:
        codes.append(pages[0] & 0x3F)
        pages = pages[2 + pages[1] :]
    assert codes == [0x01, 0x08, 0x0A]
    assert mode_sense6(lun, 0x3F, subpage=0xFF) == d


def test_mode_sense_caching_page_reflects_write_cache(lun: Lun) -> None:
    d = mode_sense6(lun, 0x08, dbd=True)
    assert d[3] == 0 and d[4] == 0x08 and d[5] == 0x12 and d[6] & 0x04
    lun.volume.write_cache = False
    assert not mode_sense6(lun, 0x08, dbd=True)[6] & 0x04
    assert mode_sense6(lun, 0x08, pc=1, dbd=True)[6] == 0x04  # changeable: WCE only
    assert mode_sense6(lun, 0x08, pc=2, dbd=True)[6] & 0x04  # default: as configured


def test_mode_sense_write_protect_bit() -> None:
    assert mode_sense6(make_lun(read_only=True), 0x08)[2] == 0x90


def test_mode_sense_errors(lun: Lun) -> None:
    raw = cdb("MODE SENSE(6)", b2={"page": 0x0A}, subpage=0x05, alloc_len=255)
    s = check(lun, raw, size=255)
    assert s.code == INVALID_CDB and s.pointer == (True, 3, None)
    s = check(lun, cdb("MODE SENSE(6)", b2={"page": 0x1C}, alloc_len=255), size=255)
    assert s.code == INVALID_CDB and s.pointer == (True, 2, 5)
    s = check(lun, cdb("MODE SENSE(10)", b2={"page": 0x08, "pc": 3}, alloc_len=255), size=255)
    assert s.code == (0x5, 0x39, 0x00)


def test_mode_sense10_and_llbaa(lun: Lun) -> None:
    d = good(lun, cdb("MODE SENSE(10)", b2={"page": 0x0A}, alloc_len=255), size=255)
    assert int.from_bytes(d[0:2], "big") == len(d) - 2 and d[3] == 0x10
    assert int.from_bytes(d[6:8], "big") == 8 and d[16] == 0x0A and d[17] == 0x0A
    d = good(
        lun, cdb("MODE SENSE(10)", b1={"llbaa": True}, b2={"page": 0x08}, alloc_len=255), size=255
    )
    assert d[4] & 1 and int.from_bytes(d[6:8], "big") == 16
    assert int.from_bytes(d[8:16], "big") == (8 << 20) // BS
    assert int.from_bytes(d[20:24], "big") == BS and d[24] == 0x08
    d = good(
        lun, cdb("MODE SENSE(10)", b1={"dbd": True}, b2={"page": 0x3F}, alloc_len=10), size=255
    )
    assert len(d) == 10 and int.from_bytes(d[0:2], "big") == 6 + 12 + 20 + 12


def test_mode_select_round_trip_caching(lun: Lun) -> None:
    page = bytearray(mode_sense6(lun, 0x08, dbd=True)[4:])
    page[2] &= ~0x04
    good(lun, cdb("MODE SELECT(6)", b1={"pf": True}, param_len=4 + len(page)), data=bytes(4) + page)
    assert lun.volume.write_cache is False
    assert mode_sense6(lun, 0x08, dbd=True)[4:] == page
    page[2] |= 0x04  # MODE SELECT(10), with a block descriptor this time
    desc = ((8 << 20) // BS).to_bytes(4, "big") + BS.to_bytes(4, "big")
    header = bytes(6) + (8).to_bytes(2, "big")
    data = header + desc + page
    good(lun, cdb("MODE SELECT(10)", b1={"pf": True}, param_len=len(data)), data=data)
    assert lun.volume.write_cache is True


def test_mode_select_unchangeable_field_points_into_the_parameter_list(lun: Lun) -> None:
    page = bytearray(mode_sense6(lun, 0x08, dbd=True)[4:])
    page[3] ^= 0xFF
    s = check(lun, cdb("MODE SELECT(6)", b1={"pf": True}, param_len=24), data=bytes(4) + page)
    assert s.code == INVALID_PARAM and s.pointer == (False, 4 + 3, 7)
    page = bytes([0x1C, 10]) + mode_sense6(lun, 0x01, dbd=True)[6:]
    s = check(lun, cdb("MODE SELECT(6)", param_len=4 + len(page)), data=bytes(4) + page)
    assert s.code == INVALID_PARAM and s.pointer == (False, 4, 5)


def test_mode_select_bad_page_changes_nothing(lun: Lun) -> None:
    caching = bytearray(mode_sense6(lun, 0x08, dbd=True)[4:])
    caching[2] &= ~0x04
    control = bytearray(mode_sense6(lun, 0x0A, dbd=True)[4:])
    control[3] ^= 0x01  # not changeable
    data = bytes(4) + caching + control
    s = check(lun, cdb("MODE SELECT(6)", b1={"pf": True}, param_len=len(data)), data=data)
    assert s.code == INVALID_PARAM and s.pointer == (False, 4 + 20 + 3, 0)
    assert lun.volume.write_cache is True
    both = bytes(4) + caching + mode_sense6(lun, 0x0A, dbd=True)[4:]
    good(lun, cdb("MODE SELECT(6)", b1={"pf": True}, param_len=len(both)), data=both)
    assert lun.volume.write_cache is False


def test_mode_select_length_errors(lun: Lun) -> None:
    s = check(lun, cdb("MODE SELECT(6)", b1={"pf": True}, param_len=24), data=bytes(10))
    assert s.code == (0x5, 0x1A, 0x00)
    s = check(lun, cdb("MODE SELECT(6)", b1={"pf": True}, param_len=3), data=bytes(3))
    assert s.code == (0x5, 0x1A, 0x00)
    s = check(
        lun,
        cdb("MODE SELECT(6)", b1={"pf": True}, param_len=8),
        data=bytes(4) + bytes([0x08, 0x12, 0, 0]),
    )  # page longer than the list
    assert s.code == (0x5, 0x1A, 0x00)
    good(lun, cdb("MODE SELECT(10)", b1={"pf": True}, param_len=0))


def test_mode_select_save_pages_is_refused(lun: Lun) -> None:
    page = mode_sense6(lun, 0x08, dbd=True)[4:]
    raw = cdb("MODE SELECT(6)", b1={"pf": True, "sp": True}, param_len=24)
    s = check(lun, raw, data=bytes(4) + page)
    assert s.code == INVALID_CDB and s.pointer == (True, 1, 0)


def test_d_sense_switches_to_descriptor_format(lun: Lun) -> None:
    ctl = bytearray(mode_sense6(lun, 0x0A, dbd=True)[4:])
    assert mode_sense6(lun, 0x0A, pc=1, dbd=True)[6] == 0x04  # D_SENSE changeable
    ctl[2] |= 0x04
    good(lun, cdb("MODE SELECT(6)", b1={"pf": True}, param_len=16), data=bytes(4) + ctl)
    s = check(lun, cdb("INQUIRY", page_code=1, alloc_len=64), size=64)
    assert s.fmt == 0x72 and s.code == INVALID_CDB and s.pointer == (True, 2, None)
    s = check(lun, cdb("READ(10)", lba=1 << 20, length=1), size=BS)
    assert s.fmt == 0x72 and s.code == (0x5, 0x21, 0x00)
    ctl[2] &= ~0x04
    good(lun, cdb("MODE SELECT(6)", b1={"pf": True}, param_len=16), data=bytes(4) + ctl)
    assert check(lun, bytes(10)[:1] + b"\x01" + bytes(4)).fmt == 0x70


# -- REQUEST SENSE and unit attentions ---------------------------------------------------------


def test_unit_attention_is_reported_once_and_inquiry_is_not_blocked(lun: Lun) -> None:
    lun.add_unit_attention(0x3F, 0x03)
    lun.add_unit_attention(0x3F, 0x03)  # queued once
    inquiry(lun)
    inquiry(lun, 0x00)
    assert check(lun, cdb("TEST UNIT READY")).code == (0x6, 0x3F, 0x03)
    good(lun, cdb("TEST UNIT READY"))


def test_unit_attention_comes_before_cdb_checks(lun: Lun) -> None:
    lun.reset()
    assert check(lun, bytes([0xC5]) + bytes(5)).code == (0x6, 0x29, 0x03)
    assert check(lun, bytes([0xC5]) + bytes(5)).code == (0x5, 0x20, 0x00)


def test_unit_attentions_queue_in_order(lun: Lun) -> None:
    lun.add_unit_attention(0x2A, 0x09)
    lun.reset()
    assert check(lun, cdb("READ(10)", lba=0, length=1), size=BS).code == (0x6, 0x2A, 0x09)
    assert check(lun, cdb("READ(10)", lba=0, length=1), size=BS).code == (0x6, 0x29, 0x03)
    good(lun, cdb("READ(10)", lba=0, length=1), size=BS)


def test_request_sense_returns_and_clears_the_unit_attention(lun: Lun) -> None:
    lun.reset()
    d = good(lun, cdb("REQUEST SENSE", alloc_len=252), size=252)
    assert len(d) == 18 and Sense.parse(d).code == (0x6, 0x29, 0x03)
    d = good(lun, cdb("REQUEST SENSE", alloc_len=252), size=252)
    assert Sense.parse(d).code == (0x0, 0x00, 0x00)
    good(lun, cdb("TEST UNIT READY"))


def test_request_sense_desc_and_truncation(lun: Lun) -> None:
    lun.add_unit_attention(0x3F, 0x03)
    d = good(lun, cdb("REQUEST SENSE", b1={"desc": True}, alloc_len=252), size=252)
    assert d[0] == 0x72 and Sense.parse(d).code == (0x6, 0x3F, 0x03)
    d = good(lun, cdb("REQUEST SENSE", alloc_len=8), size=252)
    assert len(d) == 8 and d[0] == 0x70 and d[7] == 10


# -- REPORT SUPPORTED OPERATION CODES ------------------------------------------------------


def rsoc(
    lun: Lun, options: int = 0, opcode: int = 0, sa: int = 0, rctd: bool = False, alloc: int = 8192
) -> tuple[int, bytes]:
    raw = cdb(
        "REPORT SUPPORTED OPERATION CODES",
        b2={"rctd": rctd, "options": options},
        req_opcode=opcode,
        req_sa=sa,
        alloc_len=alloc,
    )
    r, d = run(lun, raw, size=8192)
    return r.status, d


def test_rsoc_all_commands(lun: Lun) -> None:
    st, d = rsoc(lun)
    assert st == GOOD and int.from_bytes(d[:4], "big") == len(d) - 4
    descs = [d[4 + 8 * i : 12 + 8 * i] for i in range((len(d) - 4) // 8)]
    found = {(x[0], int.from_bytes(x[2:4], "big") if x[5] & 1 else None): x for x in descs}
    assert (0x9E, 0x10) in found and (0x9E, 0x12) in found and (0xA3, 0x0C) in found
    assert {0x00, 0x03, 0x08, 0x12, 0x28, 0x2A, 0x41, 0x42, 0x89, 0x93} <= {k[0] for k in found}
    assert int.from_bytes(found[(0x88, None)][6:8], "big") == 16
    assert 0x42 not in {x[0] for x in _all(make_lun(unmap=False))}


def _all(lun: Lun) -> list[bytes]:
    _, d = rsoc(lun)
    return [d[4 + 8 * i : 12 + 8 * i] for i in range((len(d) - 4) // 8)]


def test_rsoc_all_commands_with_timeouts(lun: Lun) -> None:
    _, d = rsoc(lun, rctd=True)
    assert (len(d) - 4) % 20 == 0
    first = d[4:24]
    assert first[5] & 0x02 and first[8:10] == b"\x00\x0a"


def test_rsoc_one_command_usage_data(lun: Lun) -> None:
    st, d = rsoc(lun, options=1, opcode=0x93)
    assert st == GOOD and d[1] & 0x07 == 3 and int.from_bytes(d[2:4], "big") == 16
    assert d[4] == 0x93 and d[5] == 0x09 and d[19] == 0  # UNMAP+NDOB; no NACA in CONTROL
    st, d = rsoc(lun, options=2, opcode=0x9E, sa=0x10)
    assert d[1] & 0x07 == 3 and d[4:6] == b"\x9e\x10" and len(d) == 4 + 16
    st, d = rsoc(lun, options=3, opcode=0x28, rctd=True)
    assert d[1] == 0x83 and len(d) == 4 + 10 + 12
    st, d = rsoc(lun, options=1, opcode=0xC5)
    assert st == GOOD and d[1] & 0x07 == 1
    st, d = rsoc(lun, options=1, opcode=0x28, alloc=6)
    assert len(d) == 6


def test_rsoc_option_errors(lun: Lun) -> None:
    raw = cdb("REPORT SUPPORTED OPERATION CODES", b2={"options": 1}, req_opcode=0x9E, alloc_len=64)
    s = check(lun, raw, size=64)
    assert s.code == INVALID_CDB and s.pointer == (True, 3, None)
    raw = cdb("REPORT SUPPORTED OPERATION CODES", b2={"options": 2}, req_opcode=0x28, alloc_len=64)
    assert check(lun, raw, size=64).code == INVALID_CDB
    raw = cdb("REPORT SUPPORTED OPERATION CODES", b2={"options": 4}, alloc_len=64)
    assert check(lun, raw, size=64).code == INVALID_CDB


def test_rsoc_usage_data_matches_what_the_lun_accepts(lun: Lun) -> None:
    """Every bit in the usage data is accepted; every bit outside it is refused (byte/bit)."""
    for desc in _all(lun):
        op, sa = desc[0], int.from_bytes(desc[2:4], "big")
        _, d = rsoc(lun, options=3, opcode=op, sa=sa)
        usage = d[4:]
        for byte in range(1, len(usage)):
            for bit in range(8):
                if usage[byte] >> bit & 1 or (op in (0x9E, 0xA3) and byte == 1):
                    continue
                raw = bytearray(len(usage))
                raw[0], raw[1] = op, sa if op in (0x9E, 0xA3) else 0
                raw[byte] |= 1 << bit
                s = check(lun, bytes(raw), data=bytes(BS))
                assert s.code == INVALID_CDB and s.pointer == (True, byte, bit), (op, byte, bit)
