"""Sense data builders: fixed and descriptor format, INFORMATION and field pointers."""

from __future__ import annotations

from tests.unit.scsi_harness import Sense
from vscsi.scsi import sense


def test_fixed_format_with_field_pointer() -> None:
    s = sense.invalid_cdb(1, 5).encode(descriptor=False)
    assert len(s) == 18 and s[0] == 0x70 and s[2] == 0x05 and s[7] == 10
    assert s[12:14] == b"\x24\x00" and s[15:18] == bytes([0xCD, 0, 1])  # SKSV C/D BPV bit 5


def test_parameter_list_pointer_has_c_d_clear() -> None:
    s = sense.invalid_param(300).encode(descriptor=False)
    assert s[15:18] == bytes([0x80, 0x01, 0x2C])


def test_fixed_format_information() -> None:
    s = sense.SenseError(sense.MEDIUM_ERROR, sense.UNRECOVERED_READ_ERROR, info=0x1234)
    raw = s.encode(descriptor=False)
    assert raw[0] == 0xF0 and raw[3:7] == b"\x00\x00\x12\x34"
    big = sense.SenseError(sense.MEDIUM_ERROR, sense.UNRECOVERED_READ_ERROR, info=1 << 40)
    raw = big.encode(descriptor=False)
    assert raw[0] == 0x70 and raw[3:7] == bytes(4)  # does not fit: VALID stays 0


def test_descriptor_format() -> None:
    e = sense.SenseError(sense.MISCOMPARE, sense.MISCOMPARE_DURING_VERIFY, info=1 << 40)
    raw = e.encode(descriptor=True)
    assert raw[:4] == bytes([0x72, 0x0E, 0x1D, 0x00]) and raw[7] == 12
    assert raw[8:12] == bytes([0x00, 0x0A, 0x80, 0x00]) and Sense.parse(raw).info == 1 << 40
    raw = sense.invalid_cdb(2).encode(descriptor=True)
    assert raw[7] == 8 and raw[8:16] == bytes([0x02, 0x06, 0, 0, 0xC0, 0, 2, 0])


def test_no_sense_is_short() -> None:
    raw = sense.build_sense(sense.NO_SENSE, sense.NO_ADDITIONAL_SENSE, descriptor=True)
    assert raw == bytes([0x72, 0, 0, 0, 0, 0, 0, 0])
    assert len(sense.build_sense(sense.UNIT_ATTENTION, (0x29, 0x03))) == 18


def test_exception_message_names_the_condition() -> None:
    assert "INVALID FIELD IN CDB" in str(sense.invalid_cdb(1))
