"""Sense data (SPC-4 §4.5): the named conditions we report, in fixed or descriptor format."""

from __future__ import annotations

from dataclasses import dataclass

NO_SENSE = 0x0
RECOVERED_ERROR = 0x1
NOT_READY = 0x2
MEDIUM_ERROR = 0x3
HARDWARE_ERROR = 0x4
ILLEGAL_REQUEST = 0x5
UNIT_ATTENTION = 0x6
DATA_PROTECT = 0x7
ABORTED_COMMAND = 0xB
MISCOMPARE = 0xE

# (ASC, ASCQ) pairs, named as in SPC-4 Annex D.
NO_ADDITIONAL_SENSE = (0x00, 0x00)
LOGICAL_UNIT_NOT_READY_CAUSE_NOT_REPORTABLE = (0x04, 0x00)
INVALID_FIELD_IN_COMMAND_IU = (0x0E, 0x03)
WRITE_ERROR = (0x0C, 0x00)
UNRECOVERED_READ_ERROR = (0x11, 0x00)
PARAMETER_LIST_LENGTH_ERROR = (0x1A, 0x00)
INVALID_COMMAND_OPERATION_CODE = (0x20, 0x00)
LBA_OUT_OF_RANGE = (0x21, 0x00)
INVALID_FIELD_IN_CDB = (0x24, 0x00)
LOGICAL_UNIT_NOT_SUPPORTED = (0x25, 0x00)
INVALID_FIELD_IN_PARAMETER_LIST = (0x26, 0x00)
WRITE_PROTECTED = (0x27, 0x00)
POWER_ON_OCCURRED = (0x29, 0x01)
BUS_DEVICE_RESET_FUNCTION_OCCURRED = (0x29, 0x03)
MODE_PARAMETERS_CHANGED = (0x2A, 0x01)
SAVING_PARAMETERS_NOT_SUPPORTED = (0x39, 0x00)
INQUIRY_DATA_HAS_CHANGED = (0x3F, 0x03)
INTERNAL_TARGET_FAILURE = (0x44, 0x00)
MISCOMPARE_DURING_VERIFY = (0x1D, 0x00)

NAMES: dict[tuple[int, int], str] = {
    v: k.replace("_", " ") for k, v in dict(globals()).items() if isinstance(v, tuple)
}
KEY_NAMES = {
    NO_SENSE: "NO SENSE",
    RECOVERED_ERROR: "RECOVERED ERROR",
    NOT_READY: "NOT READY",
    MEDIUM_ERROR: "MEDIUM ERROR",
    HARDWARE_ERROR: "HARDWARE ERROR",
    ILLEGAL_REQUEST: "ILLEGAL REQUEST",
    UNIT_ATTENTION: "UNIT ATTENTION",
    DATA_PROTECT: "DATA PROTECT",
    ABORTED_COMMAND: "ABORTED COMMAND",
    MISCOMPARE: "MISCOMPARE",
}

MAX_SENSE = 96  # the TCMU sense buffer


@dataclass(frozen=True, slots=True)
class FieldPointer:
    """Sense-key-specific field pointer: which CDB / parameter byte (and bit) was wrong."""

    byte: int
    bit: int | None = None
    in_cdb: bool = True

    def encode(self) -> bytes:
        b0 = 0x80 | (0x40 if self.in_cdb else 0)
        if self.bit is not None:
            b0 |= 0x08 | (self.bit & 0x7)
        return bytes([b0]) + self.byte.to_bytes(2, "big")


class SenseError(Exception):
    """A command ends in CHECK CONDITION with this sense; handlers raise, the LUN encodes."""

    def __init__(
        self,
        key: int,
        asc_ascq: tuple[int, int],
        *,
        info: int | None = None,
        field: FieldPointer | None = None,
    ) -> None:
        name = NAMES.get(asc_ascq, "")
        super().__init__(f"{KEY_NAMES.get(key, key)} {asc_ascq[0]:02X}/{asc_ascq[1]:02X} {name}")
        self.key = key
        self.asc, self.ascq = asc_ascq
        self.info = info
        self.field = field

    def encode(self, descriptor: bool) -> bytes:
        return build_sense(
            self.key, (self.asc, self.ascq), info=self.info, field=self.field, descriptor=descriptor
        )


def invalid_cdb(byte: int, bit: int | None = None) -> SenseError:
    """INVALID FIELD IN CDB pointing at `byte` (and `bit`, for fields not byte aligned)."""
    return SenseError(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB, field=FieldPointer(byte, bit))


def invalid_param(byte: int, bit: int | None = None) -> SenseError:
    """INVALID FIELD IN PARAMETER LIST pointing into the data-out buffer."""
    return SenseError(
        ILLEGAL_REQUEST,
        INVALID_FIELD_IN_PARAMETER_LIST,
        field=FieldPointer(byte, bit, in_cdb=False),
    )


def parameter_list_length() -> SenseError:
    """The data-out is shorter than the parameter list length or a header needs."""
    return SenseError(ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)


def data_out_length() -> SenseError:
    """The data-out length (the transport's, not a CDB field) differs from what the CDB needs:
    05/0E/03, as LIO answers a write whose expected data transfer length is wrong."""
    return SenseError(ILLEGAL_REQUEST, INVALID_FIELD_IN_COMMAND_IU)


def lba_out_of_range() -> SenseError:
    return SenseError(ILLEGAL_REQUEST, LBA_OUT_OF_RANGE)


def build_sense(
    key: int,
    asc_ascq: tuple[int, int],
    *,
    info: int | None = None,
    field: FieldPointer | None = None,
    descriptor: bool = False,
) -> bytes:
    """Fixed format (0x70) unless `descriptor` (0x72, chosen by the control page's D_SENSE)."""
    asc, ascq = asc_ascq
    if descriptor:
        descs = b""
        if info is not None:
            descs += bytes([0x00, 0x0A, 0x80, 0]) + info.to_bytes(8, "big")
        if field is not None:
            descs += bytes([0x02, 0x06, 0, 0]) + field.encode() + b"\0"
        return bytes([0x72, key, asc, ascq, 0, 0, 0, len(descs)]) + descs
    sense = bytearray(18)
    sense[0] = 0x70
    sense[2] = key
    sense[7] = 10
    sense[12], sense[13] = asc, ascq
    if info is not None and info <= 0xFFFFFFFF:  # a larger value needs descriptor format
        sense[0] |= 0x80  # VALID: the INFORMATION field is meaningful
        sense[3:7] = info.to_bytes(4, "big")
    if field is not None:
        sense[15:18] = field.encode()
    return bytes(sense)
