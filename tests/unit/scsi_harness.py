"""Driving a `Lun` in unit tests: build CDBs from cdb.py, run them, decode sense."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tests.unit.memvolume import MemVolume
from vscsi.scsi.buffer import DataBuffer
from vscsi.scsi.cdb import BY_NAME
from vscsi.scsi.identity import Identity
from vscsi.scsi.lun import Lun
from vscsi.scsi.result import CHECK_CONDITION, GOOD, Result

IDENT = Identity(vendor="VSCSI", product="OPEN-V", revision="0100", serial=410001, volume_id=0x100)
BS = 512


def cdb(name: str, **fields: Any) -> bytes:
    """A CDB built from its single construct declaration."""
    return BY_NAME[name].build(**fields)


def make_lun(**volume: Any) -> Lun:
    return Lun(MemVolume(**volume), IDENT)


def run(lun: Lun, raw: bytes, data: bytes = b"", size: int = 0) -> tuple[Result, bytes]:
    """Execute with `data` as data-out or a `size`-byte data-in buffer; returns data-in."""
    buf = DataBuffer.of_bytes(data) if data else DataBuffer.of_size(size)
    r = lun.execute(raw, buf)
    return r, buf.tobytes()[: r.data_len]


def good(lun: Lun, raw: bytes, data: bytes = b"", size: int = 0) -> bytes:
    r, out = run(lun, raw, data, size)
    assert r.status == GOOD, Sense.of(r)
    return out


@dataclass(frozen=True)
class Sense:
    """Decoded sense, fixed or descriptor format."""

    fmt: int
    key: int
    asc: int
    ascq: int
    info: int | None = None
    sks: bytes | None = None  # the three sense-key-specific bytes when SKSV is set

    @property
    def code(self) -> tuple[int, int, int]:
        return self.key, self.asc, self.ascq

    @property
    def pointer(self) -> tuple[bool, int, int | None]:
        """(C/D, byte, bit or None) of a field pointer."""
        assert self.sks is not None and self.sks[0] & 0x80
        bit = self.sks[0] & 7 if self.sks[0] & 0x08 else None
        return bool(self.sks[0] & 0x40), int.from_bytes(self.sks[1:3], "big"), bit

    @classmethod
    def parse(cls, s: bytes) -> Sense:
        fmt = s[0] & 0x7F
        if fmt == 0x72:
            info = sks = None
            pos = 8
            while pos < 8 + s[7]:
                kind, n = s[pos], s[pos + 1]
                if kind == 0x00:
                    assert s[pos + 2] & 0x80  # VALID
                    info = int.from_bytes(s[pos + 4 : pos + 12], "big")
                elif kind == 0x02:
                    sks = s[pos + 4 : pos + 7]
                pos += 2 + n
            return cls(fmt, s[1] & 0xF, s[2], s[3], info, sks)
        assert fmt == 0x70 and s[7] + 8 == len(s)
        info = int.from_bytes(s[3:7], "big") if s[0] & 0x80 else None
        sks = s[15:18] if s[15] & 0x80 else None
        return cls(fmt, s[2] & 0xF, s[12], s[13], info, sks)

    @classmethod
    def of(cls, r: Result) -> Sense | None:
        return cls.parse(r.sense) if r.status == CHECK_CONDITION else None


def check(lun: Lun, raw: bytes, data: bytes = b"", size: int = 0) -> Sense:
    """Run a command that must end in CHECK CONDITION; its decoded sense."""
    r, _ = run(lun, raw, data, size)
    assert r.status == CHECK_CONDITION and r.data_len == 0, r
    assert len(r.sense) <= 96
    return Sense.parse(r.sense)
