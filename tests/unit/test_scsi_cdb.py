"""The CDB declarations: fast decoders, usage data and build/parse agree."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vscsi.scsi import cdb as C


@given(st.binary(min_size=16, max_size=16))
def test_fast_rw_decoders_match_the_construct_declarations(raw: bytes) -> None:
    p10, p16 = C.Rw10.parse(raw[:10]), C.Rw16.parse(raw)
    op, flags, lba, n = C.RW10.unpack_from(raw)
    assert (op, lba, n) == (p10.opcode, p10.lba, p10.length)
    assert bool(flags & 0x08) == p10.b1.fua
    op, flags, lba, n = C.RW16.unpack_from(raw)
    assert (op, lba, n) == (p16.opcode, p16.lba, p16.length)
    assert bool(flags & 0x08) == p16.b1.fua


@pytest.mark.parametrize("c", C.COMMANDS, ids=lambda c: c.name)
def test_usage_data_only_covers_declared_fields(c: C.Cdb) -> None:
    """Padding in a declaration is never advertised (or accepted) as a usable bit."""
    declared = c.decl.build(c.decl.parse(b"\xff" * c.size))
    assert len(c.usage) == c.decl.sizeof() == c.size
    assert c.usage[0] == c.opcode
    for u, d in zip(c.usage[1:], declared[1:], strict=True):
        assert u & ~d == 0, c.name
    assert c.usage[-1] == 0  # CONTROL: neither NACA nor LINK


@pytest.mark.parametrize("c", C.COMMANDS, ids=lambda c: c.name)
def test_build_parse_round_trip(c: C.Cdb) -> None:
    raw = c.build()
    assert len(raw) == c.size and raw[0] == c.opcode
    assert c.parse(raw + b"\0" * 4).opcode == c.opcode
    if c.service_action is not None:
        assert raw[1] & 0x1F == c.service_action == c.usage[1] & 0x1F
        assert C.lookup(c.opcode, c.service_action) is c
    else:
        assert C.lookup(c.opcode) is c


def test_lookup_unknown() -> None:
    assert C.lookup(0xC5) is None
    assert C.lookup(0x9E, 0x13) is None
