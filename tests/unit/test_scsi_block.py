"""SBC-3 commands of the LUN over an in-memory volume: data, ranges and exact sense."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tests.unit.memvolume import MemVolume
from tests.unit.scsi_harness import BS, IDENT, Sense, cdb, check, good, make_lun, run
from vscsi.scsi import cdb as C
from vscsi.scsi.buffer import DataBuffer
from vscsi.scsi.inquiry import COMMAND_BYTES
from vscsi.scsi.lun import Lun
from vscsi.scsi.result import CHECK_CONDITION, GOOD
from vscsi.store.file import FileVolume

BLOCKS = (8 << 20) // BS
ILLEGAL_INVALID_CDB = (0x5, 0x24, 0x00)
LBA_OUT_OF_RANGE = (0x5, 0x21, 0x00)


@pytest.fixture
def lun() -> Lun:
    return make_lun()


MAX_CMD = COMMAND_BYTES // BS  # MAXIMUM WRITE SAME LENGTH and MAXIMUM UNMAP LBA COUNT


class HugeVolume(MemVolume):
    """Claims 4 GiB while holding 1 MiB: for limits checked before any I/O."""

    @property
    def size(self) -> int:
        return 4 << 30


def huge_lun() -> Lun:
    return Lun(HugeVolume(size=1 << 20), IDENT)


def vol(lun: Lun) -> MemVolume:
    assert isinstance(lun.volume, MemVolume)
    return lun.volume


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n * BS))


# -- READ / WRITE ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [10, 12, 16])
def test_write_read_round_trip(lun: Lun, size: int) -> None:
    data = pattern(4)
    good(lun, cdb(f"WRITE({size})", lba=100, length=4), data=data)
    assert good(lun, cdb(f"READ({size})", lba=100, length=4), size=len(data)) == data
    assert vol(lun).writes[-1] == (100 * BS, 4 * BS, False)


def test_read6_write6_and_length_zero_means_256(lun: Lun) -> None:
    data = pattern(256)
    good(lun, cdb("WRITE(6)", b1={"lba_hi": 0}, lba_lo=7, length=0), data=data)
    assert vol(lun).writes[-1] == (7 * BS, 256 * BS, False)
    assert good(lun, cdb("READ(6)", lba_lo=7, length=0), size=len(data)) == data
    high = cdb("READ(6)", b1={"lba_hi": 0x1F}, lba_lo=0xFFFF, length=1)  # LBA 0x1FFFFF
    assert check(lun, high, size=BS).code == LBA_OUT_OF_RANGE


@pytest.mark.parametrize("size", [10, 12, 16])
def test_fua_reaches_the_volume(lun: Lun, size: int) -> None:
    good(lun, cdb(f"WRITE({size})", lba=1, length=1, b1={"fua": True}), data=pattern(1))
    assert vol(lun).writes[-1] == (BS, BS, True)


def test_zero_length_transfers_do_nothing(lun: Lun) -> None:
    r, _ = run(lun, cdb("READ(10)", lba=0, length=0))
    assert r.status == GOOD and r.data_len == 0
    good(lun, cdb("WRITE(16)", lba=5, length=0))
    assert vol(lun).writes == []


@pytest.mark.parametrize(
    ("name", "lba", "n"),
    [
        ("READ(10)", BLOCKS - 1, 2),
        ("READ(16)", BLOCKS, 1),
        ("WRITE(10)", BLOCKS + 1, 0),  # LBA == capacity with length 0 is fine (as in LIO)
        ("WRITE(16)", 2**64 - 1, 2),
        ("READ(12)", BLOCKS - 4, 5),
    ],
)
def test_lba_out_of_range(lun: Lun, name: str, lba: int, n: int) -> None:
    s = check(lun, cdb(name, lba=lba, length=n), data=bytes(max(n, 1) * BS))
    assert s.code == LBA_OUT_OF_RANGE and s.sks is None


def test_transfer_beyond_max_transfer_length_points_at_length() -> None:
    lun = Lun(MemVolume(), IDENT, max_transfer_blocks=16)
    s = check(lun, cdb("READ(10)", lba=0, length=17), size=17 * BS)
    assert s.code == ILLEGAL_INVALID_CDB and s.pointer == (True, 7, None)
    s = check(lun, cdb("WRITE(16)", lba=0, length=17), data=bytes(17 * BS))
    assert s.pointer == (True, 10, None)
    good(lun, cdb("READ(16)", lba=0, length=16), size=16 * BS)


@pytest.mark.parametrize(("byte1", "bit"), [(0x20, 5), (0x80, 7), (0x04, 2), (0x01, 0)])
def test_protection_and_reserved_bits_are_refused(lun: Lun, byte1: int, bit: int) -> None:
    raw = bytearray(cdb("READ(10)", lba=0, length=1))
    raw[1] = byte1
    s = check(lun, bytes(raw), size=BS)
    assert s.code == ILLEGAL_INVALID_CDB and s.pointer == (True, 1, bit)


def test_group_number_and_dpo_are_accepted(lun: Lun) -> None:
    good(lun, cdb("READ(16)", lba=0, length=1, group=0x3F, b1={"dpo": True}), size=BS)


def test_naca_and_link_in_control_byte(lun: Lun) -> None:
    raw = bytearray(cdb("WRITE(10)", lba=0, length=1))
    raw[9] = 0x04
    s = check(lun, bytes(raw), data=bytes(BS))
    assert s.code == ILLEGAL_INVALID_CDB and s.pointer == (True, 9, 2)
    raw[9] = 0x01
    assert check(lun, bytes(raw), data=bytes(BS)).pointer == (True, 9, 0)


def test_short_cdb_is_invalid(lun: Lun) -> None:
    s = check(lun, cdb("READ(16)", lba=0, length=1)[:10], size=BS)
    assert s.code == ILLEGAL_INVALID_CDB


def test_read_medium_error_reports_the_failing_lba(lun: Lun) -> None:
    vol(lun).bad_read.add(1000 * BS)
    s = check(lun, cdb("READ(16)", lba=990, length=20), size=20 * BS)
    assert s.code == (0x3, 0x11, 0x00) and s.info == 1000
    good(lun, cdb("READ(16)", lba=1001, length=20), size=20 * BS)


def test_write_medium_error(lun: Lun) -> None:
    vol(lun).bad_write.add(7 * BS)
    s = check(lun, cdb("WRITE(10)", lba=7, length=1), data=bytes(BS))
    assert s.code == (0x3, 0x0C, 0x00) and s.info == 7


def test_medium_error_in_descriptor_format_keeps_64_bit_lba() -> None:
    lun = Lun(MemVolume(size=1 << 20), IDENT)
    lun.mode_state.d_sense = True
    vol(lun).bad_read.add(3 * BS)
    s = check(lun, cdb("READ(16)", lba=0, length=8), size=8 * BS)
    assert s.fmt == 0x72 and s.code == (0x3, 0x11, 0x00) and s.info == 3


@pytest.mark.parametrize("name", ["WRITE(10)", "WRITE(6)", "WRITE AND VERIFY(16)", "UNMAP"])
def test_write_protected_volume(name: str) -> None:
    lun = make_lun(read_only=True)
    fields = {"param_len": 24} if name == "UNMAP" else {"length": 1}
    s = check(lun, cdb(name, **fields), data=_unmap_list((0, 1)) if name == "UNMAP" else pattern(1))
    assert s.code == (0x7, 0x27, 0x00)
    good(lun, cdb("READ(10)", lba=0, length=1), size=BS)


def test_short_data_out_is_refused_not_half_written(lun: Lun) -> None:
    s = check(lun, cdb("WRITE(10)", lba=0, length=4), data=pattern(2))
    assert s.code == (0x5, 0x0E, 0x03)
    assert vol(lun).writes == []


def test_short_data_in_buffer_gets_what_fits(lun: Lun) -> None:
    good(lun, cdb("WRITE(10)", lba=0, length=4), data=pattern(4))
    r, out = run(lun, cdb("READ(10)", lba=0, length=4), size=2 * BS)
    assert r.status == GOOD and r.data_len == 2 * BS and out == pattern(4)[: 2 * BS]


def test_memoryview_cdb_and_scattered_buffers(lun: Lun) -> None:
    from vscsi.scsi.buffer import DataBuffer

    data = pattern(3)
    views = [memoryview(bytearray(data[:100])), memoryview(bytearray(data[100:]))]
    assert lun.execute(memoryview(cdb("WRITE(10)", lba=9, length=3)), DataBuffer(views)).status == 0
    out = DataBuffer([memoryview(bytearray(1000)), memoryview(bytearray(536))])
    assert lun.execute(cdb("READ(10)", lba=9, length=3), out).data_len == 3 * BS
    assert out.tobytes() == data


# -- READ CAPACITY ------------------------------------------------------------------------


def test_read_capacity_10_and_16(lun: Lun) -> None:
    out = good(lun, cdb("READ CAPACITY(10)"), size=8)
    assert out == (BLOCKS - 1).to_bytes(4, "big") + BS.to_bytes(4, "big")
    out = good(lun, cdb("READ CAPACITY(16)", alloc_len=32), size=32)
    assert int.from_bytes(out[:8], "big") == BLOCKS - 1
    assert int.from_bytes(out[8:12], "big") == BS and out[14] & 0xC0 == 0xC0  # LBPME, LBPRZ
    assert out[13] == 3  # 8 logical blocks per 4 KiB physical block
    out = good(make_lun(unmap=False), cdb("READ CAPACITY(16)", alloc_len=32), size=32)
    assert out[14] == 0
    assert len(good(lun, cdb("READ CAPACITY(16)", alloc_len=12), size=32)) == 12


def test_read_capacity_10_saturates_for_huge_volumes() -> None:
    class Huge(MemVolume):
        @property
        def size(self) -> int:
            return (1 << 32) * BS + BS * 10

    lun = Lun(Huge(size=4096), IDENT)  # 2 TiB + 10 blocks: the last LBA needs 33 bits
    assert good(lun, cdb("READ CAPACITY(10)"), size=8)[:4] == b"\xff\xff\xff\xff"
    out = good(lun, cdb("READ CAPACITY(16)", alloc_len=32), size=32)
    assert int.from_bytes(out[:8], "big") == (1 << 32) + 9


def test_read_capacity_lba_requires_pmi(lun: Lun) -> None:
    s = check(lun, cdb("READ CAPACITY(10)", lba=5), size=8)
    assert s.code == ILLEGAL_INVALID_CDB and s.pointer == (True, 2, None)
    good(lun, cdb("READ CAPACITY(10)", lba=5, b8={"pmi": True}), size=8)
    assert check(lun, cdb("READ CAPACITY(16)", lba=5, alloc_len=32), size=32).pointer[1] == 2
    good(lun, cdb("READ CAPACITY(16)", lba=5, b14=1, alloc_len=32), size=32)


def test_unknown_service_action_in(lun: Lun) -> None:
    raw = bytearray(cdb("READ CAPACITY(16)", alloc_len=32))
    raw[1] = 0x13
    s = check(lun, bytes(raw), size=32)
    assert s.code == ILLEGAL_INVALID_CDB and s.pointer == (True, 1, 4)


# -- VERIFY / WRITE AND VERIFY ------------------------------------------------------------


def test_verify_bytchk_0_1_3(lun: Lun) -> None:
    good(lun, cdb("WRITE(10)", lba=20, length=2), data=b"\x5a" * 2 * BS)
    good(lun, cdb("VERIFY(10)", lba=20, length=2))
    good(lun, cdb("VERIFY(10)", lba=20, length=2, b1={"bytchk": 1}), data=b"\x5a" * 2 * BS)
    good(lun, cdb("VERIFY(16)", lba=20, length=2, b1={"bytchk": 3}), data=b"\x5a" * BS)
    s = check(lun, cdb("VERIFY(16)", lba=20, length=2, b1={"bytchk": 3}), data=b"\x5b" * BS)
    assert s.code == (0xE, 0x1D, 0x00) and s.info == 0


def test_verify_miscompare_reports_the_offset(lun: Lun) -> None:
    data = pattern(4)
    good(lun, cdb("WRITE(10)", lba=0, length=4), data=data)
    wrong = bytearray(data)
    wrong[1234] ^= 0xFF
    s = check(lun, cdb("VERIFY(10)", lba=0, length=4, b1={"bytchk": 1}), data=bytes(wrong))
    assert s.code == (0xE, 0x1D, 0x00) and s.info == 1234


def test_verify_bytchk_2_is_invalid_and_medium_errors_surface(lun: Lun) -> None:
    s = check(lun, cdb("VERIFY(10)", lba=0, length=1, b1={"bytchk": 2}), data=bytes(BS))
    assert s.code == ILLEGAL_INVALID_CDB and s.pointer == (True, 1, 2)
    vol(lun).bad_read.add(5 * BS)
    assert check(lun, cdb("VERIFY(16)", lba=4, length=2)).info == 5
    assert check(lun, cdb("VERIFY(10)", lba=BLOCKS, length=1)).code == LBA_OUT_OF_RANGE


def test_write_and_verify(lun: Lun) -> None:
    data = pattern(2, seed=9)
    good(lun, cdb("WRITE AND VERIFY(10)", lba=3, length=2, b1={"b1_bit1": True}), data=data)
    good(lun, cdb("WRITE AND VERIFY(16)", lba=5, length=2), data=data)
    assert good(lun, cdb("READ(10)", lba=3, length=4), size=4 * BS) == data * 2
    assert vol(lun).writes[-1][2] is True  # written through before being verified


# -- SYNCHRONIZE CACHE ----------------------------------------------------------------------


def test_synchronize_cache(lun: Lun) -> None:
    good(lun, cdb("SYNCHRONIZE CACHE(10)"))
    good(lun, cdb("SYNCHRONIZE CACHE(16)", lba=10, length=10, b1={"immed": True}))
    assert vol(lun).flushes == 2
    s = check(lun, cdb("SYNCHRONIZE CACHE(16)", lba=BLOCKS, length=1))
    assert s.code == LBA_OUT_OF_RANGE


# -- WRITE SAME ---------------------------------------------------------------------------


def test_write_same_writes_the_pattern(lun: Lun) -> None:
    block = bytes(range(256)) * 2
    good(lun, cdb("WRITE SAME(10)", lba=40, length=3000), data=block)
    assert good(lun, cdb("READ(16)", lba=40, length=3000), size=3000 * BS) == block * 3000
    assert len(vol(lun).writes) == 2  # 1 MiB chunks, not block by block
    good(lun, cdb("WRITE SAME(16)", lba=10, length=2), data=b"\x77" * BS)
    assert good(lun, cdb("READ(10)", lba=10, length=2), size=2 * BS) == b"\x77" * 2 * BS


def test_write_same_unmap_deallocates(lun: Lun) -> None:
    good(lun, cdb("WRITE(10)", lba=0, length=64), data=b"\xaa" * 64 * BS)
    good(lun, cdb("WRITE SAME(16)", lba=8, length=16, b1={"unmap": True}), data=bytes(BS))
    v = vol(lun)
    assert v.mapped[:8] == b"\1" * 8 and v.mapped[8:24] == bytes(16) and v.mapped[24] == 1
    assert good(lun, cdb("READ(10)", lba=8, length=16), size=16 * BS) == bytes(16 * BS)


def test_write_same_unmap_with_unaligned_edges_zeroes_them(lun: Lun) -> None:
    good(lun, cdb("WRITE(10)", lba=0, length=32), data=b"\xaa" * 32 * BS)
    good(lun, cdb("WRITE SAME(10)", lba=3, length=20, b1={"unmap": True}), data=bytes(BS))
    out = good(lun, cdb("READ(10)", lba=0, length=32), size=32 * BS)
    assert out == b"\xaa" * 3 * BS + bytes(20 * BS) + b"\xaa" * 9 * BS
    assert vol(lun).mapped[8:16] == bytes(8)  # the aligned granules really went away


def test_write_same_unmap_with_nonzero_data_writes(lun: Lun) -> None:
    good(lun, cdb("WRITE SAME(10)", lba=0, length=8, b1={"unmap": True}), data=b"\x01" * BS)
    assert vol(lun).mapped[:8] == b"\1" * 8


def test_write_same_unmap_without_volume_support_writes_zeroes() -> None:
    lun = make_lun(unmap=False)
    good(lun, cdb("WRITE(10)", lba=0, length=8), data=b"\xaa" * 8 * BS)
    good(lun, cdb("WRITE SAME(16)", lba=0, length=8, b1={"unmap": True}), data=bytes(BS))
    assert good(lun, cdb("READ(10)", lba=0, length=8), size=8 * BS) == bytes(8 * BS)


def test_write_same_16_ndob(lun: Lun) -> None:
    good(lun, cdb("WRITE(10)", lba=0, length=16), data=b"\xaa" * 16 * BS)
    good(lun, cdb("WRITE SAME(16)", lba=0, length=8, b1={"ndob": True}))
    good(lun, cdb("WRITE SAME(16)", lba=8, length=8, b1={"ndob": True, "unmap": True}))
    assert good(lun, cdb("READ(10)", lba=0, length=16), size=16 * BS) == bytes(16 * BS)
    assert vol(lun).mapped[:16] == b"\1" * 8 + bytes(8)


def test_write_same_number_of_blocks_zero_means_to_the_end() -> None:
    lun = make_lun(size=1 << 20)
    good(lun, cdb("WRITE SAME(16)", lba=2040, length=0), data=b"\x11" * BS)
    out = good(lun, cdb("READ(10)", lba=2039, length=9), size=9 * BS)
    assert out == bytes(BS) + b"\x11" * 8 * BS
    assert check(lun, cdb("WRITE SAME(10)", lba=2048, length=0), data=bytes(BS)).code == (
        LBA_OUT_OF_RANGE
    )


@pytest.mark.parametrize(("name", "bit"), [("WRITE SAME(10)", 4), ("WRITE SAME(16)", 4)])
def test_write_same_anchor_is_unsupported(lun: Lun, name: str, bit: int) -> None:
    s = check(lun, cdb(name, lba=0, length=1, b1={"anchor": True, "unmap": True}), data=bytes(BS))
    assert s.code == ILLEGAL_INVALID_CDB and s.pointer == (True, 1, bit)


def test_write_same_10_has_no_ndob_and_pbdata_lbdata_are_refused(lun: Lun) -> None:
    for flag, bit in (("ndob", 0), ("lbdata", 1), ("pbdata", 2)):
        s = check(lun, cdb("WRITE SAME(10)", lba=0, length=1, b1={flag: True}), data=bytes(BS))
        assert s.pointer == (True, 1, bit), flag


def test_write_same_errors(lun: Lun) -> None:
    assert check(lun, cdb("WRITE SAME(16)", lba=BLOCKS - 1, length=2), data=bytes(BS)).code == (
        LBA_OUT_OF_RANGE
    )
    s = check(huge_lun(), cdb("WRITE SAME(16)", lba=0, length=MAX_CMD + 1), data=bytes(BS))
    assert s.code == ILLEGAL_INVALID_CDB and s.pointer == (True, 10, None)
    assert check(lun, cdb("WRITE SAME(10)", lba=0, length=1)).code == (0x5, 0x0E, 0x03)


# -- UNMAP ----------------------------------------------------------------------------------


def _unmap_list(*extents: tuple[int, int], desc_len: int | None = None) -> bytes:
    """An UNMAP parameter list built from its declaration in cdb.py."""
    body = b"".join(C.UnmapDescriptor.build({"lba": lba, "nblocks": n}) for lba, n in extents)
    dl = len(body) if desc_len is None else desc_len
    return C.UnmapHeader.build({"data_len": dl + 6, "desc_len": dl}) + body


def test_unmap_descriptors(lun: Lun) -> None:
    good(lun, cdb("WRITE(10)", lba=0, length=64), data=b"\xaa" * 64 * BS)
    param = _unmap_list((8, 8), (32, 16), (50, 0))
    good(lun, cdb("UNMAP", param_len=len(param)), data=param)
    v = vol(lun)
    assert v.mapped[:64] == b"\1" * 8 + bytes(8) + b"\1" * 16 + bytes(16) + b"\1" * 16
    assert good(lun, cdb("READ(10)", lba=32, length=16), size=16 * BS) == bytes(16 * BS)


def test_unmap_parameter_errors(lun: Lun) -> None:
    assert check(lun, cdb("UNMAP", param_len=4), data=bytes(4)).code == (0x5, 0x1A, 0x00)
    param = _unmap_list((0, 1))
    s = check(lun, cdb("UNMAP", param_len=len(param) + 8), data=param)
    assert s.code == (0x5, 0x1A, 0x00)
    param = _unmap_list((BLOCKS - 1, 2))
    assert check(lun, cdb("UNMAP", param_len=len(param)), data=param).code == LBA_OUT_OF_RANGE
    too_many = _unmap_list(*[(i, 1) for i in range(257)])
    s = check(lun, cdb("UNMAP", param_len=len(too_many)), data=too_many)
    assert s.code == (0x5, 0x26, 0x00) and s.pointer == (False, 2, None)
    huge = _unmap_list((0, 1), (8, MAX_CMD))  # the maximum + 1 block in all
    s = check(huge_lun(), cdb("UNMAP", param_len=len(huge)), data=huge)
    assert s.code == (0x5, 0x26, 0x00) and s.pointer == (False, 8 + 16 + 8, None)


def test_unmap_validates_everything_before_deallocating(lun: Lun) -> None:
    good(lun, cdb("WRITE(10)", lba=0, length=8), data=b"\xaa" * 8 * BS)
    param = _unmap_list((0, 8), (BLOCKS, 1))
    check(lun, cdb("UNMAP", param_len=len(param)), data=param)
    assert vol(lun).mapped[:8] == b"\1" * 8


def test_unmap_zero_length_and_partial_descriptor(lun: Lun) -> None:
    good(lun, cdb("UNMAP", param_len=0))
    good(lun, cdb("WRITE(10)", lba=0, length=8), data=b"\xaa" * 8 * BS)
    param = _unmap_list((0, 8), desc_len=20)  # 16 + 4 bytes: the partial one is ignored
    good(lun, cdb("UNMAP", param_len=len(param)), data=param)
    assert vol(lun).mapped[:8] == bytes(8)


def test_unmap_anchor_and_unsupported_volume(lun: Lun) -> None:
    raw = bytearray(cdb("UNMAP", param_len=24))
    raw[1] = 0x01
    s = check(lun, bytes(raw), data=_unmap_list((0, 1)))
    assert s.code == ILLEGAL_INVALID_CDB and s.pointer == (True, 1, 0)
    thick = make_lun(unmap=False)
    assert check(thick, cdb("UNMAP", param_len=24), data=_unmap_list((0, 1))).code == (
        0x5,
        0x20,
        0x00,
    )


# -- COMPARE AND WRITE ------------------------------------------------------------------------


def test_compare_and_write(lun: Lun) -> None:
    good(lun, cdb("WRITE(10)", lba=5, length=2), data=b"\x11" * 2 * BS)
    good(lun, cdb("COMPARE AND WRITE", lba=5, nblocks=2), data=b"\x11" * 2 * BS + pattern(2))
    assert good(lun, cdb("READ(10)", lba=5, length=2), size=2 * BS) == pattern(2)


def test_compare_and_write_miscompare_offset_and_no_write(lun: Lun) -> None:
    good(lun, cdb("WRITE(10)", lba=5, length=1), data=b"\x11" * BS)
    wrong = b"\x11" * 300 + b"\x12" + b"\x11" * (BS - 301)
    n = len(vol(lun).writes)
    s = check(lun, cdb("COMPARE AND WRITE", lba=5, nblocks=1), data=wrong + bytes(BS))
    assert s.code == (0xE, 0x1D, 0x00) and s.info == 300
    assert len(vol(lun).writes) == n


def test_compare_and_write_fields(lun: Lun) -> None:
    good(lun, cdb("COMPARE AND WRITE", lba=5, nblocks=0))
    s = check(lun, cdb("COMPARE AND WRITE", lba=0, nblocks=129), data=bytes(258 * BS))
    assert s.code == ILLEGAL_INVALID_CDB and s.pointer == (True, 13, None)
    s = check(lun, cdb("COMPARE AND WRITE", lba=BLOCKS - 1, nblocks=2), data=bytes(4 * BS))
    assert s.code == LBA_OUT_OF_RANGE
    assert check(lun, cdb("COMPARE AND WRITE", lba=0, nblocks=1), data=bytes(BS)).code == (
        0x5,
        0x0E,
        0x03,
    )
    good(lun, cdb("COMPARE AND WRITE", lba=0, nblocks=1, b1={"fua": True}), data=bytes(2 * BS))
    assert vol(lun).writes[-1] == (0, BS, True)


def test_compare_and_write_is_atomic_against_writes(lun: Lun) -> None:
    """Many CAWs incrementing a counter block, racing plain writes to the same block."""
    good(lun, cdb("WRITE(10)", lba=9, length=1), data=(0).to_bytes(BS, "big"))
    done = []

    def increment() -> None:
        for _ in range(50):
            while True:
                cur = good(lun, cdb("READ(10)", lba=9, length=1), size=BS)
                nxt = (int.from_bytes(cur, "big") + 1).to_bytes(BS, "big")
                r, _ = run(lun, cdb("COMPARE AND WRITE", lba=9, nblocks=1), data=cur + nxt)
                if r.status == GOOD:
                    break
        done.append(1)

    threads = [threading.Thread(target=increment) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert int.from_bytes(good(lun, cdb("READ(10)", lba=9, length=1), size=BS), "big") == 200


def replayed_caw(lun: Lun, lba: int, verify: bytes, new: bytes) -> Sense | None:
    """COMPARE AND WRITE as a restarted daemon serves it from the ring; its sense if any."""
    r = lun.execute(
        cdb("COMPARE AND WRITE", lba=lba, nblocks=len(new) // BS),
        DataBuffer.of_bytes(verify + new),
        replayed=True,
    )
    assert r.status in (GOOD, CHECK_CONDITION)
    return Sense.of(r)


def test_replayed_compare_and_write_whose_write_landed_succeeds(lun: Lun) -> None:
    """Killed after the write, before the answer: the medium holds the command's own data."""
    old, new = pattern(2, 1), pattern(2, 2)
    good(lun, cdb("WRITE(10)", lba=5, length=2), data=new)
    assert replayed_caw(lun, 5, old, new) is None
    assert good(lun, cdb("READ(10)", lba=5, length=2), size=2 * BS) == new


def test_replayed_compare_and_write_completes_a_torn_write(lun: Lun) -> None:
    old, new = pattern(3, 1), pattern(3, 2)
    good(lun, cdb("WRITE(10)", lba=5, length=3), data=new[:BS] + old[BS:])
    assert replayed_caw(lun, 5, old, new) is None
    assert good(lun, cdb("READ(10)", lba=5, length=3), size=3 * BS) == new


def test_replayed_compare_and_write_whose_write_did_not_land_compares_and_writes(
    lun: Lun,
) -> None:
    old, new = pattern(2, 1), pattern(2, 2)
    good(lun, cdb("WRITE(10)", lba=5, length=2), data=old)
    n = len(vol(lun).writes)
    assert replayed_caw(lun, 5, old, new) is None
    assert vol(lun).writes[n:] == [(5 * BS, 2 * BS, False)]
    assert good(lun, cdb("READ(10)", lba=5, length=2), size=2 * BS) == new


def test_replayed_compare_and_write_still_miscompares_on_other_data(lun: Lun) -> None:
    old, new = pattern(2, 1), pattern(2, 2)
    other = old[: BS + 77] + b"\xee" + old[BS + 78 :]  # block 1 is neither old nor new
    good(lun, cdb("WRITE(10)", lba=5, length=2), data=other)
    n = len(vol(lun).writes)
    s = replayed_caw(lun, 5, old, new)
    assert s is not None and s.code == (0xE, 0x1D, 0x00) and s.info == BS + 77
    assert len(vol(lun).writes) == n


def test_fresh_compare_and_write_against_its_own_data_miscompares(lun: Lun) -> None:
    """SBC-3: only the verify data counts for a command the host just sent."""
    new = pattern(2, 2)
    old = new[: BS + 300] + b"\xee" + new[BS + 301 :]
    good(lun, cdb("WRITE(10)", lba=5, length=2), data=new)
    n = len(vol(lun).writes)
    s = check(lun, cdb("COMPARE AND WRITE", lba=5, nblocks=2), data=old + new)
    assert s.code == (0xE, 0x1D, 0x00) and s.info == BS + 300
    assert len(vol(lun).writes) == n


# -- GET LBA STATUS ---------------------------------------------------------------------------


def _lba_status(out: bytes) -> list[tuple[int, int, int]]:
    n = (int.from_bytes(out[:4], "big") - 4) // 16
    return [
        (
            int.from_bytes(out[8 + 16 * i : 16 + 16 * i], "big"),
            int.from_bytes(out[16 + 16 * i : 20 + 16 * i], "big"),
            out[20 + 16 * i] & 0xF,
        )
        for i in range(n)
    ]


def test_get_lba_status_after_unmap(lun: Lun) -> None:
    good(lun, cdb("WRITE(10)", lba=0, length=64), data=b"\xaa" * 64 * BS)
    param = _unmap_list((16, 16))
    good(lun, cdb("UNMAP", param_len=len(param)), data=param)
    out = good(lun, cdb("GET LBA STATUS", lba=0, alloc_len=1024), size=1024)
    descs = _lba_status(out)
    assert descs[:4] == [(0, 16, 0), (16, 16, 1), (32, 32, 0), (64, BLOCKS - 64, 1)]
    out = good(lun, cdb("GET LBA STATUS", lba=20, alloc_len=24), size=1024)
    assert len(out) == 24 and _lba_status(out)[0] == (20, 12, 1)


def test_get_lba_status_out_of_range(lun: Lun) -> None:
    assert check(lun, cdb("GET LBA STATUS", lba=BLOCKS, alloc_len=24), size=24).code == (
        LBA_OUT_OF_RANGE
    )


def test_unexpected_volume_exception_is_internal_target_failure(lun: Lun) -> None:
    def boom(offset: int, bufs: object) -> None:
        raise RuntimeError("bug")

    vol(lun).readinto = boom  # type: ignore[method-assign,assignment]
    s = check(lun, cdb("READ(10)", lba=0, length=1), size=BS)
    assert s.code == (0x4, 0x44, 0x00)


def test_not_ready_volume() -> None:
    from vscsi.store.base import NotReadyError

    lun = make_lun()

    def not_ready(offset: int, bufs: object, fua: bool = False) -> None:
        raise NotReadyError("pair suspended", 0x04, 0x0C)

    vol(lun).write = not_ready  # type: ignore[method-assign,assignment]
    assert check(lun, cdb("WRITE(10)", lba=0, length=1), data=bytes(BS)).code == (0x2, 0x04, 0x0C)


def test_sense_decoder_sanity() -> None:
    s = Sense.parse(bytes([0x70, 0, 5, 0, 0, 0, 0, 10] + [0] * 4 + [0x24, 0, 0, 0xC0, 0, 2]))
    assert s.code == ILLEGAL_INVALID_CDB and s.pointer == (True, 2, None)


def test_lun_over_a_real_file_volume(tmp_path: Path) -> None:
    """The same commands over the file backstore: hole punching and SEEK_HOLE extents."""
    v = FileVolume("f", str(tmp_path / "f.img"), size=8 << 20, create=True)
    lun = Lun(v, IDENT)
    data = pattern(64)
    good(lun, cdb("WRITE(16)", lba=0, length=64, b1={"fua": True}), data=data)
    assert good(lun, cdb("READ(10)", lba=0, length=64), size=64 * BS) == data
    param = _unmap_list((16, 16))
    good(lun, cdb("UNMAP", param_len=len(param)), data=param)
    assert good(lun, cdb("READ(10)", lba=16, length=16), size=16 * BS) == bytes(16 * BS)
    descs = _lba_status(good(lun, cdb("GET LBA STATUS", lba=0, alloc_len=256), size=256))
    assert (16, 16, 1) in descs and descs[0][2] == 0
    good(lun, cdb("SYNCHRONIZE CACHE(10)"))
    v.close()
