"""Mode pages (SPC-4 §7.5, SBC-3 §6.4) with current, changeable, default and saved values.

Only WCE (caching page) and D_SENSE (control page) are changeable: WCE switches the volume's
write cache, D_SENSE switches the LUN to descriptor-format sense.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vscsi.scsi import sense
from vscsi.scsi.sense import SenseError
from vscsi.store.base import Volume

PC_CURRENT, PC_CHANGEABLE, PC_DEFAULT, PC_SAVED = range(4)
ALL_PAGES = 0x3F


@dataclass
class ModeState:
    """What MODE SELECT can change; the rest is fixed."""

    d_sense: bool = False


class ModePages:
    def __init__(self, volume: Volume, state: ModeState) -> None:
        self.volume = volume
        self.state = state
        self.default_wce = volume.write_cache

    def error_recovery(self, pc: int) -> bytes:
        if pc == PC_CHANGEABLE:
            return bytes([0x01, 0x0A]) + bytes(10)
        return bytes([0x01, 0x0A, 0xC0]) + bytes(9)  # AWRE, ARRE

    def caching(self, pc: int) -> bytes:
        page = bytearray(20)
        page[0], page[1] = 0x08, 0x12
        if pc == PC_CHANGEABLE:
            page[2] = 0x04
        else:
            wce = self.volume.write_cache if pc == PC_CURRENT else self.default_wce
            page[2] = 0x04 if wce else 0
        return bytes(page)

    def control(self, pc: int) -> bytes:
        page = bytearray(12)
        page[0], page[1] = 0x0A, 0x0A
        if pc == PC_CHANGEABLE:
            page[2] = 0x04
            return bytes(page)
        d_sense = self.state.d_sense if pc == PC_CURRENT else False
        page[2] = 0x04 if d_sense else 0
        page[3] = 0x10  # QUEUE ALGORITHM MODIFIER 1: unrestricted reordering
        page[4] = 0x08 if self.volume.read_only else 0  # SWP
        page[8:10] = b"\xff\xff"  # BUSY TIMEOUT PERIOD: unlimited
        return bytes(page)

    def page(self, code: int, subpage: int, pc: int) -> bytes:
        """Page `code` (or all of them) for MODE SENSE; unknown pages are an error."""
        if pc == PC_SAVED:
            raise SenseError(sense.ILLEGAL_REQUEST, sense.SAVING_PARAMETERS_NOT_SUPPORTED)
        pages = self._pages()
        if code != ALL_PAGES and code not in pages:
            raise sense.invalid_cdb(2, 5)
        if subpage not in (0x00, 0xFF):  # we have no subpages (e.g. 0x0A/0x05 is refused)
            raise sense.invalid_cdb(3)
        if code == ALL_PAGES:
            return b"".join(pages[c](pc) for c in sorted(pages))
        return pages[code](pc)

    def _pages(self) -> dict[int, Callable[[int], bytes]]:
        return {0x01: self.error_recovery, 0x08: self.caching, 0x0A: self.control}

    def select(self, data: bytes, offset: int) -> None:
        """Apply the pages of a MODE SELECT parameter list (after header and descriptors).

        Every page is validated before any is applied, so a bad list changes nothing.
        `offset` is where `data` starts in the parameter list, for field pointers.
        """
        accepted: list[tuple[int, bytes]] = []
        pos = 0
        while pos < len(data):
            if pos + 2 > len(data):
                raise sense.parameter_list_length()
            code = data[pos] & 0x3F
            if data[pos] & 0x40:  # SPF: we have no subpages
                raise sense.invalid_param(offset + pos, 6)
            end = pos + 2 + data[pos + 1]
            if end > len(data):
                raise sense.parameter_list_length()
            self._validate(code, data[pos:end], offset + pos)
            accepted.append((code, data[pos:end]))
            pos = end
        for code, page in accepted:
            if code == 0x08:
                self.volume.write_cache = bool(page[2] & 0x04)
            elif code == 0x0A:
                self.state.d_sense = bool(page[2] & 0x04)

    def _validate(self, code: int, new: bytes, at: int) -> None:
        """Only bits in the changeable mask may differ from the current values (05/26/00)."""
        pages = self._pages()
        if code not in pages:
            raise sense.invalid_param(at, 5)
        current = pages[code](PC_CURRENT)
        mask = pages[code](PC_CHANGEABLE)
        if len(new) != len(current):
            raise sense.invalid_param(at + 1)
        for i in range(2, len(current)):
            bad = (new[i] ^ current[i]) & ~mask[i] & 0xFF
            if bad:
                raise sense.invalid_param(at + i, bad.bit_length() - 1)
