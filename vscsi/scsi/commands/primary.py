"""SPC-4 commands every device type has: INQUIRY, MODE SENSE/SELECT, REQUEST SENSE, RSOC, ..."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vscsi.scsi import cdb as C
from vscsi.scsi import sense
from vscsi.scsi.buffer import DataBuffer

if TYPE_CHECKING:
    from vscsi.scsi.lun import Lun


def reply(buf: DataBuffer, data: bytes, alloc_len: int) -> int:
    """Data-in truncated to the allocation length (and to the buffer the initiator gave)."""
    return buf.scatter(data[:alloc_len])


def test_unit_ready(lun: Lun, cdb: bytes, buf: DataBuffer) -> int:
    """The medium is fixed; only a volume state that forbids all access makes it not ready."""
    lun.volume.check_ready()
    return 0


def request_sense(lun: Lun, cdb: bytes, buf: DataBuffer) -> int:
    p = C.RequestSense.parse(cdb)
    ua = lun.pop_unit_attention()
    descriptor = p.b1.desc
    if ua is not None:
        data = sense.build_sense(sense.UNIT_ATTENTION, ua, descriptor=descriptor)
    else:
        data = sense.build_sense(sense.NO_SENSE, sense.NO_ADDITIONAL_SENSE, descriptor=descriptor)
    return reply(buf, data, p.alloc_len)


def inquiry(lun: Lun, cdb: bytes, buf: DataBuffer) -> int:
    """Standard data or a VPD page; CMDDT is outside the usage data, so the LUN refused it."""
    p = C.Inquiry.parse(cdb)
    if not p.b1.evpd:
        if p.page_code:
            raise sense.invalid_cdb(2)
        return reply(buf, lun.standard_inquiry, p.alloc_len)
    page = lun.vpd.get(p.page_code)
    if page is None:
        raise sense.invalid_cdb(2)
    return reply(buf, page, p.alloc_len)


def _block_descriptor(lun: Lun, long: bool) -> bytes:
    bs = lun.volume.block_size
    blocks = lun.volume.size // bs
    if long:
        return blocks.to_bytes(8, "big") + bytes(4) + bs.to_bytes(4, "big")
    return min(blocks, 0xFFFFFFFF).to_bytes(4, "big") + b"\0" + bs.to_bytes(3, "big")


def _device_specific(lun: Lun) -> int:
    return (0x80 if lun.volume.read_only else 0) | 0x10  # WP, DPOFUA


def mode_sense6(lun: Lun, cdb: bytes, buf: DataBuffer) -> int:
    p = C.ModeSense6.parse(cdb)
    pages = lun.modes.page(p.b2.page, p.subpage, p.b2.pc)
    desc = b"" if p.b1.dbd else _block_descriptor(lun, False)
    header = bytes([3 + len(desc) + len(pages), 0, _device_specific(lun), len(desc)])
    return reply(buf, header + desc + pages, p.alloc_len)


def mode_sense10(lun: Lun, cdb: bytes, buf: DataBuffer) -> int:
    p = C.ModeSense10.parse(cdb)
    pages = lun.modes.page(p.b2.page, p.subpage, p.b2.pc)
    long = bool(p.b1.llbaa)
    desc = b"" if p.b1.dbd else _block_descriptor(lun, long)
    length = 6 + len(desc) + len(pages)
    header = length.to_bytes(2, "big") + bytes([0, _device_specific(lun), int(long), 0])
    header += len(desc).to_bytes(2, "big")
    return reply(buf, header + desc + pages, p.alloc_len)


def _param_list(buf: DataBuffer, length: int, header_len: int) -> bytes:
    """The parameter list; less data-out than PARAMETER LIST LENGTH, or no room for the
    mode parameter header, is a PARAMETER LIST LENGTH ERROR."""
    if buf.length < length or length < header_len:
        raise sense.parameter_list_length()
    return buf.gather(length)


def _select(lun: Lun, data: bytes, header_len: int, desc_len: int, sp: bool) -> None:
    """Apply a MODE SELECT list. SP=1 asks us to save pages, which we cannot (no page is
    saveable: PS=0), so it is refused with INVALID FIELD IN CDB on the SP bit (SPC-4 §6.9)."""
    if sp:
        raise sense.invalid_cdb(1, 0)
    if header_len + desc_len > len(data):
        raise sense.parameter_list_length()
    if desc_len not in (0, 8, 16):
        raise sense.invalid_param(header_len - 1)
    if desc_len:
        desc = data[header_len : header_len + desc_len]
        if int.from_bytes(desc[-3:], "big") != lun.volume.block_size:
            raise sense.invalid_param(header_len + desc_len - 3)
    lun.modes.select(data[header_len + desc_len :], header_len + desc_len)


def mode_select6(lun: Lun, cdb: bytes, buf: DataBuffer) -> int:
    p = C.ModeSelect6.parse(cdb)
    if p.param_len == 0:
        return 0
    data = _param_list(buf, p.param_len, 4)
    _select(lun, data, 4, data[3], p.b1.sp)
    return 0


def mode_select10(lun: Lun, cdb: bytes, buf: DataBuffer) -> int:
    p = C.ModeSelect10.parse(cdb)
    if p.param_len == 0:
        return 0
    data = _param_list(buf, p.param_len, 8)
    _select(lun, data, 8, int.from_bytes(data[6:8], "big"), p.b1.sp)
    return 0


def start_stop_unit(lun: Lun, cdb: bytes, buf: DataBuffer) -> int:
    C.StartStopUnit.parse(cdb)  # a fixed, non-removable medium: nothing to start or eject
    return 0


def prevent_allow(lun: Lun, cdb: bytes, buf: DataBuffer) -> int:
    return 0  # not removable (RMB=0): prevention has no effect


_TIMEOUTS = bytes([0, 0x0A, 0, 0]) + (30).to_bytes(4, "big") + (60).to_bytes(4, "big")


def _descriptor(c: C.Cdb, rctd: bool) -> bytes:
    sa = c.service_action or 0
    flags = (0x02 if rctd else 0) | (0x01 if c.service_action is not None else 0)
    d = bytes([c.opcode, 0]) + sa.to_bytes(2, "big") + bytes([0, flags])
    return d + c.size.to_bytes(2, "big") + (_TIMEOUTS if rctd else b"")


def report_opcodes(lun: Lun, cdb: bytes, buf: DataBuffer) -> int:
    """REPORT SUPPORTED OPERATION CODES (MAINTENANCE IN 0xA3/0x0C, SPC-4 §6.35)."""
    p = C.ReportOpcodes.parse(cdb)
    rctd, options = p.b2.rctd, p.b2.options
    if options == 0:
        body = b"".join(_descriptor(c, rctd) for c in C.COMMANDS if lun.supports(c))
        return reply(buf, len(body).to_bytes(4, "big") + body, p.alloc_len)
    if options == 1:
        if p.req_opcode in C.SERVICE_ACTION_OPCODES:
            raise sense.invalid_cdb(3)
        c = C.lookup(p.req_opcode)
    elif options in (2, 3):
        if options == 2 and p.req_opcode not in C.SERVICE_ACTION_OPCODES:
            raise sense.invalid_cdb(3)
        c = C.lookup(p.req_opcode, p.req_sa)
    else:
        raise sense.invalid_cdb(2, 2)
    if c is None or not lun.supports(c):
        data = bytes([0, 0x01, 0, 0])  # SUPPORT 001b: not supported
    else:
        data = bytes([0, 0x03 | (0x80 if rctd else 0)]) + c.size.to_bytes(2, "big") + c.usage
        data += _TIMEOUTS if rctd else b""
    return reply(buf, data, p.alloc_len)
