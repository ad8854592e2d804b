"""INQUIRY data: the standard page and the vital product data pages (SPC-4 §6.6, §7.8; SBC-3 §6.6).

docs/vpd.md describes every field we fill.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from vscsi.scsi.identity import Identity
from vscsi.store.base import Volume

SPC4 = 0x06
LIO_OUI = 0x001405  # IEEE company id used by Linux-IO targets; ours live under it
MAX_COMPARE_AND_WRITE = 128  # blocks (VPD 0xB0), unless the LUN's maximum transfer is lower
# The most one WRITE SAME or UNMAP may write or deallocate: the 1 MiB pattern chunks, or the
# BLKZEROOUT a block device without hole punching falls back to, move at device speed, and
# 64 MiB at a slow 10 MiB/s still ends in about 6 s, a fifth of Linux's 30 s command timeout.
COMMAND_BYTES = 64 << 20
VERSION_DESCRIPTORS = (0x00A0, 0x0460, 0x04C0)  # SAM-5, SPC-4, SBC-3
MAX_UNMAP_DESCRIPTORS = 256
VENDOR_PAGES = range(0xC0, 0x100)


def _ascii(text: str, n: int) -> bytes:
    return text.encode("ascii", "replace")[:n].ljust(n, b" ")


def standard(ident: Identity) -> bytes:
    """Standard INQUIRY data (SPC-4 §6.6.2); fixed for the life of the LUN."""
    data = bytearray(96)
    data[0] = 0x00  # peripheral qualifier 0, direct access block device
    data[2] = SPC4
    data[3] = 0x12  # HISUP, response data format 2
    data[4] = len(data) - 5
    data[7] = 0x02  # CMDQUE
    data[8:16] = _ascii(ident.vendor, 8)
    data[16:32] = _ascii(ident.product, 16)
    data[32:36] = _ascii(ident.revision, 4)
    for i, v in enumerate(VERSION_DESCRIPTORS):
        data[58 + 2 * i : 60 + 2 * i] = v.to_bytes(2, "big")
    return bytes(data)


def _page(code: int, body: bytes) -> bytes:
    return bytes([0, code]) + len(body).to_bytes(2, "big") + body


def naa(ident: Identity) -> bytes:
    """NAA 6 (IEEE registered extended): OUI, then the array serial, then the volume id.

    The 36-bit vendor-specific identifier holds the serial and the 64-bit extension holds
    "VSCS" and the volume id, so the designator is stable and unique per (serial, volume).
    """
    value = (6 << 124) | (LIO_OUI << 100) | ((ident.serial & 0xFFFFFFFFF) << 64)
    value |= (int.from_bytes(b"VSCS", "big") << 32) | (ident.volume_id & 0xFFFF)
    return value.to_bytes(16, "big")


def _designator(code_set: int, assoc: int, kind: int, ident: bytes) -> bytes:
    return bytes([code_set, (assoc << 4) | kind, 0, len(ident)]) + ident


class VpdPages:
    """The VPD pages of one LUN; vendor pages (0xC0..) are plugged in by upper layers."""

    def __init__(
        self,
        ident: Identity,
        volume: Volume,
        max_transfer_blocks: int,
        vendor_pages: Mapping[int, Callable[[], bytes]] | None = None,
    ) -> None:
        self.ident = ident
        self.volume = volume
        self.max_transfer_blocks = max_transfer_blocks
        self.vendor = dict(vendor_pages or {})
        if any(code not in VENDOR_PAGES for code in self.vendor):
            raise ValueError("vendor VPD pages must be in 0xC0..0xFF")
        self.pages: dict[int, Callable[[], bytes]] = {
            0x00: self.supported,
            0x80: self.unit_serial,
            0x83: self.device_identification,
            0xB0: self.block_limits,
            0xB1: self.block_characteristics,
            0xB2: self.provisioning,
            **self.vendor,
        }

    def get(self, code: int) -> bytes | None:
        """The full page (header included), or None when we do not serve it."""
        page = self.pages.get(code)
        return page() if page else None

    def supported(self) -> bytes:
        return _page(0x00, bytes(sorted(self.pages)))

    def unit_serial(self) -> bytes:
        return _page(0x80, self.ident.unit_serial.encode())

    def device_identification(self) -> bytes:
        t10 = (
            _ascii(self.ident.vendor, 8) + f"{self.ident.product}-{self.ident.unit_serial}".encode()
        )
        body = _designator(1, 0, 3, naa(self.ident)) + _designator(2, 0, 1, t10)
        return _page(0x83, body)

    def unmap_granularity(self) -> int:
        """OPTIMAL UNMAP GRANULARITY and physical block: 4 KiB (page / hole-punch unit)."""
        return max(4096 // self.volume.block_size, 1)

    def max_unmap_blocks(self) -> int:
        """MAXIMUM UNMAP LBA COUNT: COMMAND_BYTES bounds the time one UNMAP takes."""
        return COMMAND_BYTES // self.volume.block_size

    def max_unmap_descriptors(self) -> int:
        return MAX_UNMAP_DESCRIPTORS

    def max_write_same_blocks(self) -> int:
        """MAXIMUM WRITE SAME LENGTH: COMMAND_BYTES, written in 1 MiB chunks."""
        return COMMAND_BYTES // self.volume.block_size

    def max_compare_and_write_blocks(self) -> int:
        """MAXIMUM COMPARE AND WRITE LENGTH: never above the MAXIMUM TRANSFER LENGTH, which
        COMPARE AND WRITE is held to as well."""
        return min(MAX_COMPARE_AND_WRITE, self.max_transfer_blocks)

    def block_limits(self) -> bytes:
        b = bytearray(0x3C)
        bs = self.volume.block_size
        b[1] = self.max_compare_and_write_blocks()
        b[2:4] = max(4096 // bs, 1).to_bytes(2, "big")  # optimal transfer length granularity
        b[4:8] = self.max_transfer_blocks.to_bytes(4, "big")
        b[8:12] = min(self.max_transfer_blocks, (1 << 20) // bs).to_bytes(4, "big")
        if self.volume.supports_unmap:
            b[16:20] = self.max_unmap_blocks().to_bytes(4, "big")
            b[20:24] = self.max_unmap_descriptors().to_bytes(4, "big")
            b[24:28] = self.unmap_granularity().to_bytes(4, "big")
        b[32:40] = self.max_write_same_blocks().to_bytes(8, "big")
        return _page(0xB0, bytes(b))

    def block_characteristics(self) -> bytes:
        b = bytearray(0x3C)
        b[0:2] = (1).to_bytes(2, "big")  # non-rotating medium
        return _page(0xB1, bytes(b))

    def provisioning(self) -> bytes:
        if self.volume.supports_unmap:
            return _page(0xB2, bytes([0, 0xE4, 0x02, 0]))  # LBPU LBPWS LBPWS10 LBPRZ; thin
        return _page(0xB2, bytes(4))
