"""The link protocol's frames: every type round-trips, anything malformed raises FrameError."""

from __future__ import annotations

from typing import Any

import pytest

from vscsi.link.frames import (
    HEADER_SIZE,
    MAX_DATA,
    MAX_PAYLOAD,
    ControlResult,
    ExtentResult,
    FrameError,
    FrameType,
    SizeResult,
    Status,
    build_header,
    decode,
    encode,
    parse_result,
)

EXAMPLES: dict[FrameType, dict[str, Any]] = {
    FrameType.HELLO: {"name": "siteA", "serial": 410001, "min_version": 1, "max_version": 1},
    FrameType.READ: {"volume": "ldev0100", "offset": 1 << 40, "length": MAX_DATA},
    FrameType.WRITE: {"volume": "ldev0100", "offset": 4096, "fua": True, "data": b"\0x" * 256},
    FrameType.UNMAP: {"volume": "ldev0100", "offset": 0, "length": 1 << 33},
    FrameType.FLUSH: {"volume": "ldev0100"},
    FrameType.EXTENT: {"volume": "ldev0100", "offset": 65536},
    FrameType.SIZE: {"volume": "ldev0100"},
    FrameType.RESPONSE: {
        "answers": 7,
        "status": Status.WRITE_PROTECTED,
        "error": "S-VOL is read only",
        "data": b"",
    },
    FrameType.HEARTBEAT: {},
    FrameType.CONTROL: {"body": {"op": "suspend", "pair": "p1", "generation": 12}},
}


def test_every_frame_type_has_an_example() -> None:
    assert set(EXAMPLES) == set(FrameType)


@pytest.mark.parametrize("ftype", list(FrameType), ids=lambda t: t.name)
def test_every_frame_type_round_trips(ftype: FrameType) -> None:
    frame = decode(encode(ftype, 123456789, **EXAMPLES[ftype]))
    assert (frame.type, frame.seq) == (ftype, 123456789)
    body = {k: v for k, v in frame.body.items() if not k.startswith("_")}
    assert body == EXAMPLES[ftype]


def test_results_round_trip() -> None:
    ext = {"offset": 4096, "length": 1 << 20, "mapped": False}
    got = parse_result(ExtentResult, ExtentResult.build(ext))
    assert (got.offset, got.length, got.mapped) == (4096, 1 << 20, False)
    assert parse_result(SizeResult, SizeResult.build({"size": 1 << 30})).size == 1 << 30
    assert parse_result(ControlResult, ControlResult.build({"ok": [1, 2]})) == {"ok": [1, 2]}


def flush(seq: int = 1) -> bytes:
    return encode(FrameType.FLUSH, seq, volume="v")


def patched(data: bytes, at: int, new: bytes) -> bytes:
    return data[:at] + new + data[at + len(new) :]


LENGTH_AT = HEADER_SIZE - 4  # the header's payload length field
READ_TOO_LONG = patched(
    encode(FrameType.READ, 1, volume="v", offset=0, length=0), HEADER_SIZE + 10,
    (MAX_DATA + 1).to_bytes(4, "big"),
)  # fmt: skip
OK_RESPONSE = encode(FrameType.RESPONSE, 1, answers=1, status=Status.OK, error="", data=b"")


@pytest.mark.parametrize(
    ("frame", "why"),
    [
        (patched(flush(), 0, b"VSLX"), "magic"),
        (patched(flush(), 4, b"\0\2"), "version"),  # a version this code does not speak
        (patched(flush(), 4, b"\0\0"), "version"),
        (patched(flush(), 6, b"\x63"), "type"),  # frame type 99
        (flush()[:-1], "header says"),  # truncated
        (flush() + b"!", "header says"),  # longer than the header says
        (patched(flush(), LENGTH_AT, (MAX_PAYLOAD + 1).to_bytes(4, "big")), "header"),
        (build_header(FrameType.FLUSH, 1, 3) + b"\1v!", "FLUSH"),  # bytes left over
        (READ_TOO_LONG, "READ"),
        (build_header(FrameType.CONTROL, 1, 5) + b"[1,2]", "not a JSON object"),
        (build_header(FrameType.CONTROL, 1, 3) + b"{x}", "not JSON"),
        (build_header(FrameType.HELLO, 0, 3) + b"\5ab", "HELLO"),  # name runs off the end
        (patched(OK_RESPONSE, HEADER_SIZE + 8, b"\x09"), "RESPONSE"),  # status 9 is unknown
    ],
)
def test_malformed_frames_raise_frame_error(frame: bytes, why: str) -> None:
    with pytest.raises(FrameError, match=why):
        decode(frame)
