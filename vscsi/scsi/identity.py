"""How a volume presents itself on the wire: INQUIRY strings and the NAA designator source."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Identity:
    """Configured identity of one emulated volume (array serial + volume id make it unique)."""

    vendor: str = "VSCSI"
    product: str = "VIRTUAL-ARRAY"
    revision: str = "0100"
    serial: int = 410001  # array serial number
    volume_id: int = 0  # LDEV-like number within the array
    port: str = "CL1-A"

    @property
    def unit_serial(self) -> str:
        """VPD 0x80 unit serial: array serial and volume id, as arrays print them."""
        return f"{self.serial:d}{self.volume_id:05X}"
