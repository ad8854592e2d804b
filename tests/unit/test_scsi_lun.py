"""Lun-level properties: never raises, never fails internally on any CDB, sane results."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.memvolume import MemVolume
from tests.unit.scsi_harness import IDENT, Sense
from vscsi.scsi.buffer import DataBuffer
from vscsi.scsi.cdb import COMMANDS
from vscsi.scsi.lun import Lun
from vscsi.scsi.result import CHECK_CONDITION, GOOD

LUN = Lun(MemVolume(size=1 << 20), IDENT, max_transfer_blocks=64)
OPCODES = sorted({c.opcode for c in COMMANDS})


@settings(max_examples=600, deadline=None)
@given(
    op=st.sampled_from(OPCODES),
    body=st.binary(min_size=15, max_size=15),
    data=st.binary(max_size=600),
    sa=st.sampled_from([0x10, 0x12, 0x0C, None]),
)
def test_any_cdb_ends_in_a_well_formed_result(
    op: int, body: bytes, data: bytes, sa: int | None
) -> None:
    """Random CDBs of every opcode we know: no internal target failure, ever."""
    raw = bytearray([op]) + body
    if sa is not None:
        raw[1] = sa
    raw[-1] = 0
    buf = DataBuffer.of_bytes(data) if data else DataBuffer.of_size(512)
    r = LUN.execute(bytes(raw), buf)
    assert r.status in (GOOD, CHECK_CONDITION)
    if r.status == CHECK_CONDITION:
        s = Sense.parse(r.sense)
        assert len(r.sense) <= 96 and r.data_len == 0
        assert s.code != (0x4, 0x44, 0x00)
    else:
        assert 0 <= r.data_len <= buf.length


def test_internal_errors_are_logged_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(MemVolume):
        def flush(self) -> None:
            raise ZeroDivisionError

    lun = Lun(Broken(), IDENT)
    r = lun.execute(bytes([0x35]) + bytes(9), DataBuffer.of_size(0))
    assert Sense.parse(r.sense).code == (0x4, 0x44, 0x00)
    assert "internal error" in caplog.text


def test_add_unit_attention_from_another_thread_is_seen() -> None:
    import threading

    lun = Lun(MemVolume(), IDENT)
    t = threading.Thread(target=lun.add_unit_attention, args=(0x3F, 0x03))
    t.start()
    t.join()
    r = lun.execute(bytes(6), DataBuffer.of_size(0))
    assert Sense.parse(r.sense).code == (0x6, 0x3F, 0x03)


@settings(max_examples=1500, deadline=None)
@given(
    c=st.sampled_from(COMMANDS),
    body=st.binary(min_size=16, max_size=16),
    small=st.booleans(),
    data=st.binary(max_size=1100),
)
def test_any_cdb_within_the_usage_data_is_handled(
    c: object, body: bytes, small: bool, data: bytes
) -> None:
    """Random values in exactly the fields we advertise: the handlers' own checks only."""
    usage = c.usage  # type: ignore[attr-defined]
    raw = bytes(b & u for b, u in zip(body, usage, strict=False))
    raw = bytes([usage[0]]) + raw[1:]
    if len(usage) > 1 and c.service_action is not None:  # type: ignore[attr-defined]
        raw = raw[:1] + bytes([usage[1]]) + raw[2:]
    if small:  # small numbers reach past the range checks
        raw = bytes(b if i < 2 or i == len(raw) - 2 else b & 0x03 for i, b in enumerate(raw))
    buf = DataBuffer.of_bytes(data) if data else DataBuffer.of_size(1024)
    r = LUN.execute(raw, buf)
    if r.status == CHECK_CONDITION:
        assert Sense.parse(r.sense).code != (0x4, 0x44, 0x00), raw.hex()
        assert Sense.parse(r.sense).code[0] in (0x5, 0xE), raw.hex()
    else:
        assert r.status == GOOD and 0 <= r.data_len <= buf.length


def test_linux_sd_attach_sequence() -> None:
    """What sd sends when a disk appears: all GOOD but the control extension subpage."""
    from tests.unit.scsi_harness import cdb, check, good

    lun = Lun(MemVolume(), IDENT)
    good(lun, cdb("TEST UNIT READY"))
    good(lun, cdb("READ CAPACITY(16)", alloc_len=32), size=32)
    good(lun, cdb("READ CAPACITY(10)"), size=8)
    pages = good(lun, cdb("INQUIRY", b1={"evpd": True}, page_code=0, alloc_len=255), size=255)
    for page in pages[4:]:
        good(lun, cdb("INQUIRY", b1={"evpd": True}, page_code=page, alloc_len=255), size=255)
    good(lun, cdb("MODE SENSE(6)", b2={"page": 0x3F}, alloc_len=4), size=4)
    good(lun, cdb("MODE SENSE(6)", b1={"dbd": True}, b2={"page": 0x08}, alloc_len=255), size=255)
    for op in (0x12, 0x93, 0x41):
        raw = cdb(
            "REPORT SUPPORTED OPERATION CODES", b2={"options": 1}, req_opcode=op, alloc_len=512
        )
        assert good(lun, raw, size=512)[1] & 0x07 == 3
    raw = cdb("MODE SENSE(10)", b1={"dbd": True}, b2={"page": 0x0A}, subpage=0x05, alloc_len=64)
    assert check(lun, raw, size=64).code == (0x5, 0x24, 0x00)
    good(lun, cdb("MODE SENSE(6)", b2={"page": 0x3F}, subpage=0xFF, alloc_len=255), size=255)
