"""SCSI commands from the host through the SG_IO ioctl (include/scsi/sg.h, sg v3 interface).

Works on /dev/sdX and /dev/sgN alike. Every failure is a one-line `SgIoError`, so a caller
probing many devices can report each one and go on with the others.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from construct import Container, Int8ul, Int16ul, Int32sl, Int32ul, Int64ul, Padding, Struct

from vscsi.scsi import sense as sn
from vscsi.scsi.cdb import BY_NAME

SG_IO = 0x2285
SG_INTERFACE_ID = ord("S")
SG_DXFER_FROM_DEV = -3
SG_INFO_OK_MASK = 0x1
TIMEOUT_MS = 5000
SENSE_LEN = 96  # SCSI_SENSE_BUFFERSIZE
VPD_ALLOC = 255  # what Linux itself asks for; some old devices reject more

Buffer = ctypes.Array[ctypes.c_char]  # what SG_IO's pointers point into

GOOD = 0x00
CHECK_CONDITION = 0x02
DRIVER_MASK = 0x0F
DRIVER_SENSE = 0x08  # "sense data is valid", not a failure by itself

# struct sg_io_hdr, x86_64 (LP64): pointers are 8 bytes, hence the padding after pack_id.
SgIoHdr = Struct(
    "interface_id" / Int32sl,
    "dxfer_direction" / Int32sl,
    "cmd_len" / Int8ul,
    "mx_sb_len" / Int8ul,
    "iovec_count" / Int16ul,
    "dxfer_len" / Int32ul,
    "dxferp" / Int64ul,
    "cmdp" / Int64ul,
    "sbp" / Int64ul,
    "timeout" / Int32ul,
    "flags" / Int32ul,
    "pack_id" / Int32sl,
    Padding(4),
    "usr_ptr" / Int64ul,
    "status" / Int8ul,
    "masked_status" / Int8ul,
    "msg_status" / Int8ul,
    "sb_len_wr" / Int8ul,
    "host_status" / Int16ul,
    "driver_status" / Int16ul,
    "resid" / Int32sl,
    "duration" / Int32ul,
    "info" / Int32ul,
    Padding(4),
)

STATUS_NAMES = {
    0x04: "CONDITION MET",
    0x08: "BUSY",
    0x18: "RESERVATION CONFLICT",
    0x28: "TASK SET FULL",
    0x30: "ACA ACTIVE",
    0x40: "TASK ABORTED",
}
HOST_NAMES = {
    0x01: "DID_NO_CONNECT",
    0x02: "DID_BUS_BUSY",
    0x03: "DID_TIME_OUT",
    0x04: "DID_BAD_TARGET",
    0x05: "DID_ABORT",
    0x07: "DID_ERROR",
    0x08: "DID_RESET",
    0x0E: "DID_TRANSPORT_DISRUPTED",
    0x0F: "DID_TRANSPORT_FAILFAST",
}
DRIVER_NAMES = {
    0x01: "DRIVER_BUSY",
    0x02: "DRIVER_SOFT",
    0x03: "DRIVER_MEDIA",
    0x04: "DRIVER_ERROR",
    0x05: "DRIVER_INVALID",
    0x06: "DRIVER_TIMEOUT",
    0x07: "DRIVER_HARD",
}


class SgIoError(Exception):
    """A command could not be run or did not end GOOD: one line, without the device path."""


class DeviceOpenError(SgIoError):
    """The path cannot be opened (missing, permission)."""


class NotScsiDevice(SgIoError):
    """The path opens but does not take SG_IO (a regular file, /dev/null, a partition…)."""


class TransportError(SgIoError):
    """The command did not reach a SCSI status we can use: host, driver or SCSI status."""


@dataclass(frozen=True, slots=True)
class Sense:
    """The part of sense data a host acts on."""

    key: int
    asc: int
    ascq: int

    def __str__(self) -> str:
        key = sn.KEY_NAMES.get(self.key, f"SENSE KEY 0x{self.key:X}")
        name = sn.NAMES.get((self.asc, self.ascq))
        code = f"{self.asc:02X}/{self.ascq:02X}"
        return f"{key} {code} {name}" if name else f"{key} {code}"


class CheckCondition(SgIoError):
    """CHECK CONDITION; `sense` is None when the device sent none we can decode."""

    def __init__(self, what: str, sense: Sense | None) -> None:
        detail = str(sense) if sense else "no sense data"
        super().__init__(f"{what}: CHECK CONDITION, {detail}")
        self.sense = sense


def decode_sense(data: bytes) -> Sense | None:
    """Key/ASC/ASCQ from fixed (0x70/0x71) or descriptor (0x72/0x73) sense data."""
    if not data:
        return None
    code = data[0] & 0x7F
    if code in (0x70, 0x71) and len(data) >= 3:
        tail = data[12:14].ljust(2, b"\0")  # ASC/ASCQ may be cut off by a short buffer
        return Sense(data[2] & 0x0F, tail[0], tail[1])
    if code in (0x72, 0x73) and len(data) >= 4:
        return Sense(data[1] & 0x0F, data[2], data[3])
    return None


@contextmanager
def device(path: str) -> Iterator[int]:
    """Read-only is enough for INQUIRY; O_NONBLOCK so open never waits (sg) or needs a medium."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise DeviceOpenError(f"cannot open: {e.strerror}") from None
    try:
        yield fd
    finally:
        os.close(fd)


def execute(fd: int, cdb: bytes, alloc: int, what: str, timeout_ms: int = TIMEOUT_MS) -> bytes:
    """Run a data-in command; returns only the bytes the device transferred (alloc - resid)."""
    data = ctypes.create_string_buffer(alloc)
    cmd = ctypes.create_string_buffer(cdb, len(cdb))
    sense = ctypes.create_string_buffer(SENSE_LEN)
    hdr = bytearray(_request(cmd, data, sense, timeout_ms))
    try:
        fcntl.ioctl(fd, SG_IO, hdr, True)
    except OSError as e:
        if e.errno in (errno.ENOTTY, errno.EINVAL):
            raise NotScsiDevice("not a SCSI device (SG_IO not supported)") from None
        raise SgIoError(f"{what}: SG_IO failed: {e.strerror}") from None
    reply = SgIoHdr.parse(bytes(hdr))
    _check(reply, sense.raw[: reply.sb_len_wr], what)
    return data.raw[: max(0, min(alloc, alloc - reply.resid))]


def _request(cmd: Buffer, data: Buffer, sense: Buffer, timeout_ms: int) -> bytes:
    """A data-in request whose pointers are the addresses of our ctypes buffers."""
    return SgIoHdr.build(
        {
            "interface_id": SG_INTERFACE_ID,
            "dxfer_direction": SG_DXFER_FROM_DEV,
            "cmd_len": len(cmd),
            "mx_sb_len": len(sense),
            "iovec_count": 0,
            "dxfer_len": len(data),
            "dxferp": ctypes.addressof(data),
            "cmdp": ctypes.addressof(cmd),
            "sbp": ctypes.addressof(sense),
            "timeout": timeout_ms,
            "flags": 0,
            "pack_id": 0,
            "usr_ptr": 0,
            "status": 0,
            "masked_status": 0,
            "msg_status": 0,
            "sb_len_wr": 0,
            "host_status": 0,
            "driver_status": 0,
            "resid": 0,
            "duration": 0,
            "info": 0,
        }
    )


def _check(reply: Container, sense: bytes, what: str) -> None:
    """Raise unless the command ended GOOD; the transport's verdict comes before the target's."""
    if reply.info & SG_INFO_OK_MASK == 0:
        return
    host = reply.host_status
    if host:
        name = HOST_NAMES.get(host, "")
        raise TransportError(f"{what}: host status 0x{host:02X} {name}".rstrip())
    driver = reply.driver_status & DRIVER_MASK
    if driver not in (0, DRIVER_SENSE):
        name = DRIVER_NAMES.get(driver, "")
        raise TransportError(f"{what}: driver status 0x{driver:02X} {name}".rstrip())
    status = reply.status
    if status == CHECK_CONDITION:
        raise CheckCondition(what, decode_sense(sense))
    if status != GOOD:
        name = STATUS_NAMES.get(status, "")
        raise TransportError(f"{what}: SCSI status 0x{status:02X} {name}".rstrip())


def inquiry(
    fd: int, page: int | None = None, alloc: int = VPD_ALLOC, timeout_ms: int = TIMEOUT_MS
) -> bytes:
    """Standard INQUIRY data (`page` None) or the VPD page `page`, as far as transferred;
    a poller passes a short `timeout_ms` so one dead LUN costs it little."""
    evpd = page is not None
    cdb = BY_NAME["INQUIRY"].build(b1={"evpd": evpd}, page_code=page or 0, alloc_len=alloc)
    what = f"INQUIRY VPD 0x{page:02X}" if evpd else "INQUIRY"
    return execute(fd, cdb, alloc, what, timeout_ms)
