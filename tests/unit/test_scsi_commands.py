"""The SCSI core without any transport: CDB in, status / sense / data out."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from vscsi.scsi.buffer import DataBuffer
from vscsi.scsi.cdb import BY_NAME, RW10, RW16, Rw10, Rw16
from vscsi.scsi.identity import Identity
from vscsi.scsi.lun import Lun
from vscsi.scsi.result import CHECK_CONDITION, GOOD, Result
from vscsi.store.base import MediumError
from vscsi.store.file import FileVolume

IDENT = Identity(vendor="VSCSI", product="OPEN-V", serial=410001, volume_id=0x100)


class FailingVolume(FileVolume):
    """Reads of one block fail like a bad sector."""

    bad_offset = -1

    def readinto(self, offset: int, bufs: list[memoryview]) -> None:  # type: ignore[override]
        total = sum(len(b) for b in bufs)
        if offset <= self.bad_offset < offset + total:
            raise MediumError("read", self.bad_offset, 512, 5)
        super().readinto(offset, bufs)


@pytest.fixture
def lun(tmp_path: Path) -> Lun:
    vol = FailingVolume("t", str(tmp_path / "t.img"), size=8 << 20, create=True)
    return Lun(vol, IDENT)


def run(lun: Lun, cdb: bytes, data: bytes = b"", size: int = 0) -> tuple[Result, bytes]:
    buf = DataBuffer.of_bytes(data) if data else DataBuffer.of_size(size)
    r = lun.execute(cdb, buf)
    return r, buf.tobytes()[: r.data_len]


def sense_of(r: Result) -> tuple[int, int, int]:
    assert r.status == CHECK_CONDITION
    if r.sense[0] & 0x7F == 0x72:
        return r.sense[1], r.sense[2], r.sense[3]
    return r.sense[2] & 0xF, r.sense[12], r.sense[13]


def cdb(name: str, **fields: object) -> bytes:
    return BY_NAME[name].build(**fields)


def test_invalid_opcode_and_reserved_bits(lun: Lun) -> None:
    r, _ = run(lun, bytes([0xC5, 0, 0, 0, 0, 0]))
    assert sense_of(r) == (0x5, 0x20, 0x00)
    r, _ = run(lun, bytes([0x28, 0xE0, 0, 0, 0, 0, 0, 0, 1, 0]), size=512)  # RDPROTECT
    assert sense_of(r) == (0x5, 0x24, 0x00)
    assert r.sense[15] == 0xCF and r.sense[16:18] == b"\x00\x01"  # SKSV, C/D, BPV, bit 7, byte 1
    r, _ = run(lun, cdb("TEST UNIT READY")[:5] + b"\x04")  # NACA
    assert sense_of(r) == (0x5, 0x24, 0x00)


def test_inquiry_standard_vpd_and_truncation(lun: Lun) -> None:
    r, data = run(lun, cdb("INQUIRY", alloc_len=96), size=96)
    assert r.status == GOOD and data[2] == 0x06 and data[8:16] == b"VSCSI   "
    r, data = run(lun, cdb("INQUIRY", alloc_len=5), size=96)
    assert r.data_len == 5 and data[4] == 91  # ADDITIONAL LENGTH still the full length
    r, data = run(lun, cdb("INQUIRY", b1={"evpd": True}, page_code=0, alloc_len=64), size=64)
    assert list(data[4:]) == [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]
    r, _ = run(lun, cdb("INQUIRY", page_code=0x80, alloc_len=64), size=64)
    assert sense_of(r) == (0x5, 0x24, 0x00) and r.sense[16:18] == b"\x00\x02"
    r, _ = run(lun, cdb("INQUIRY", b1={"evpd": True}, page_code=0x99, alloc_len=64), size=64)
    assert sense_of(r) == (0x5, 0x24, 0x00)


def test_naa_is_stable_and_unique(tmp_path: Path) -> None:
    def naa(ident: Identity) -> bytes:
        vol = FileVolume("n", str(tmp_path / f"{ident.volume_id}.img"), size=1 << 20, create=True)
        _, data = run(
            Lun(vol, ident),
            cdb("INQUIRY", b1={"evpd": True}, page_code=0x83, alloc_len=255),
            size=255,
        )
        return data[8:24]

    a = naa(IDENT)
    assert a[0] >> 4 == 6 and a == naa(IDENT)
    assert a != naa(Identity(serial=410001, volume_id=0x101))


def test_read_write_round_trip_fua_and_range(lun: Lun) -> None:
    payload = bytes(range(256)) * 8
    r, _ = run(lun, cdb("WRITE(10)", lba=10, length=4, b1={"fua": True}), data=payload)
    assert r.status == GOOD
    r, data = run(lun, cdb("READ(16)", lba=10, length=4), size=2048)
    assert r.status == GOOD and data == payload
    r, _ = run(lun, cdb("READ(10)", lba=(8 << 20) // 512, length=1), size=512)
    assert sense_of(r) == (0x5, 0x21, 0x00)
    r, data = run(lun, bytes([0x08, 0, 0, 10, 4, 0]), size=2048)  # READ(6)
    assert data == payload


def test_fast_decoders_match_declarations() -> None:
    import random

    rng = random.Random(2)
    for _ in range(500):
        b = rng.randbytes(16)
        p10, p16 = Rw10.parse(b[:10]), Rw16.parse(b)
        assert RW10.unpack_from(b)[2:] == (p10.lba, p10.length)
        assert RW16.unpack_from(b)[2:] == (p16.lba, p16.length)


def test_medium_error_reports_the_lba(lun: Lun) -> None:
    lun.volume.bad_offset = 100 * 512  # type: ignore[attr-defined]
    r, _ = run(lun, cdb("READ(10)", lba=96, length=8), size=4096)
    assert sense_of(r) == (0x3, 0x11, 0x00)
    assert r.sense[0] & 0x80 and int.from_bytes(r.sense[3:7], "big") == 100


def test_read_capacity(lun: Lun) -> None:
    r, data = run(lun, cdb("READ CAPACITY(10)"), size=8)
    assert r.status == GOOD and int.from_bytes(data[:4], "big") == (8 << 20) // 512 - 1
    _r, data = run(lun, cdb("READ CAPACITY(16)", alloc_len=32), size=32)
    assert int.from_bytes(data[8:12], "big") == 512 and data[14] & 0xC0 == 0xC0


def test_unmap_write_same_and_lba_status(lun: Lun) -> None:
    run(lun, cdb("WRITE(10)", lba=0, length=64), data=b"\xaa" * 64 * 512)
    param = (22).to_bytes(2, "big") + (16).to_bytes(2, "big") + bytes(4)
    param += (8).to_bytes(8, "big") + (16).to_bytes(4, "big") + bytes(4)
    r, _ = run(lun, cdb("UNMAP", param_len=24), data=param)
    assert r.status == GOOD
    r, data = run(lun, cdb("READ(10)", lba=8, length=16), size=16 * 512)
    assert data == bytes(16 * 512)
    r, data = run(lun, cdb("GET LBA STATUS", lba=8, alloc_len=64), size=64)
    assert r.status == GOOD and int.from_bytes(data[8:16], "big") == 8 and data[20] == 1
    r, _ = run(lun, cdb("WRITE SAME(10)", lba=30, length=4), data=b"\x5a" * 512)
    _, data = run(lun, cdb("READ(10)", lba=30, length=4), size=2048)
    assert data == b"\x5a" * 2048
    r, _ = run(lun, cdb("WRITE SAME(16)", lba=30, length=4, b1={"ndob": True, "unmap": True}))
    _, data = run(lun, cdb("READ(10)", lba=30, length=4), size=2048)
    assert r.status == GOOD and data == bytes(2048)
    r, _ = run(lun, cdb("WRITE SAME(10)", lba=0, length=1, b1={"anchor": True}), data=bytes(512))
    assert sense_of(r) == (0x5, 0x24, 0x00)
    r, _ = run(lun, cdb("UNMAP", param_len=4), data=bytes(4))
    assert sense_of(r) == (0x5, 0x1A, 0x00)


def test_compare_and_write_and_verify_miscompare(lun: Lun) -> None:
    run(lun, cdb("WRITE(10)", lba=5, length=1), data=b"\x11" * 512)
    r, _ = run(lun, cdb("COMPARE AND WRITE", lba=5, nblocks=1), data=b"\x11" * 512 + b"\x22" * 512)
    assert r.status == GOOD
    wrong = b"\x22" * 100 + b"\x33" + b"\x22" * 411
    r, _ = run(lun, cdb("COMPARE AND WRITE", lba=5, nblocks=1), data=wrong + bytes(512))
    assert sense_of(r) == (0xE, 0x1D, 0x00) and int.from_bytes(r.sense[3:7], "big") == 100
    r, _ = run(lun, cdb("VERIFY(10)", lba=5, length=1, b1={"bytchk": 1}), data=b"\x22" * 512)
    assert r.status == GOOD
    r, _ = run(lun, cdb("VERIFY(16)", lba=5, length=1, b1={"bytchk": 1}), data=wrong)
    assert sense_of(r) == (0xE, 0x1D, 0x00)


def test_mode_sense_select_and_descriptor_sense(lun: Lun) -> None:
    r, data = run(lun, cdb("MODE SENSE(6)", b2={"page": 0x08}, alloc_len=255), size=255)
    assert r.status == GOOD and data[12 + 2] & 0x04  # WCE after header + block descriptor
    page = bytearray(data[12:32])
    page[2] &= ~0x04
    r, _ = run(lun, cdb("MODE SELECT(6)", b1={"pf": True}, param_len=24), data=bytes(4) + page)
    assert r.status == GOOD and lun.volume.write_cache is False
    page[3] = 0xFF  # not changeable
    r, _ = run(lun, cdb("MODE SELECT(6)", b1={"pf": True}, param_len=24), data=bytes(4) + page)
    assert sense_of(r) == (0x5, 0x26, 0x00)
    _, ctl = run(
        lun, cdb("MODE SENSE(6)", b1={"dbd": True}, b2={"page": 0x0A}, alloc_len=255), size=255
    )
    new = bytearray(ctl[4:16])
    new[2] |= 0x04
    r, _ = run(lun, cdb("MODE SELECT(6)", b1={"pf": True}, param_len=16), data=bytes(4) + new)
    assert r.status == GOOD
    r, _ = run(lun, bytes([0xC5, 0, 0, 0, 0, 0]))
    assert r.sense[0] == 0x72 and sense_of(r) == (0x5, 0x20, 0x00)
    r, _ = run(lun, cdb("MODE SENSE(6)", b2={"page": 0x08, "pc": 3}, alloc_len=255), size=255)
    assert sense_of(r) == (0x5, 0x39, 0x00)


def test_unit_attention_once_and_request_sense(lun: Lun) -> None:
    lun.add_unit_attention(0x3F, 0x03)
    r, _ = run(lun, cdb("INQUIRY", alloc_len=36), size=36)
    assert r.status == GOOD  # INQUIRY is not blocked
    r, _ = run(lun, cdb("TEST UNIT READY"))
    assert sense_of(r) == (0x6, 0x3F, 0x03)
    assert run(lun, cdb("TEST UNIT READY"))[0].status == GOOD
    lun.reset()
    r, data = run(lun, cdb("REQUEST SENSE", alloc_len=18), size=18)
    assert r.status == GOOD and data[2] == 0x6 and data[12:14] == b"\x29\x03"
    _, data = run(lun, cdb("REQUEST SENSE", alloc_len=18), size=18)
    assert data[2] == 0 and data[12] == 0


def test_report_supported_opcodes(lun: Lun) -> None:
    r, data = run(lun, cdb("REPORT SUPPORTED OPERATION CODES", alloc_len=4096), size=4096)
    n = int.from_bytes(data[:4], "big") // 8
    ops = {data[4 + 8 * i] for i in range(n)}
    assert {0x28, 0x2A, 0x89, 0x93, 0x42, 0x12} <= ops
    r, data = run(
        lun,
        cdb("REPORT SUPPORTED OPERATION CODES", b2={"options": 1}, req_opcode=0x93, alloc_len=64),
        size=64,
    )
    assert r.status == GOOD and data[1] & 0x07 == 0x03 and data[4] == 0x93 and data[5] == 0x09
    _r, data = run(
        lun,
        cdb("REPORT SUPPORTED OPERATION CODES", b2={"options": 1}, req_opcode=0xC5, alloc_len=64),
        size=64,
    )
    assert data[1] & 0x07 == 0x01


def test_sg3_utils_decodes_our_pages(lun: Lun, tmp_path: Path) -> None:
    """sg3_utils as an independent decoder of what we send."""
    _, data = run(lun, cdb("INQUIRY", b1={"evpd": True}, page_code=0xB0, alloc_len=255), size=255)
    f = tmp_path / "bl.bin"
    f.write_bytes(data)
    out = subprocess.run(
        ["sg_vpd", f"--inhex={f}", "--raw", "-p", "bl"], capture_output=True, text=True
    ).stdout
    assert "Maximum unmap LBA count: 2097152" in out, out
    _, data = run(lun, cdb("INQUIRY", alloc_len=96), size=96)
    f.write_bytes(data)
    out = subprocess.run(["sg_inq", f"--inhex={f}", "--raw"], capture_output=True, text=True).stdout
    assert "VSCSI" in out and "SPC-4" in out, out
