"""The link protocol's frames: every type round-trips, anything malformed raises FrameError."""

from __future__ import annotations

import random
from typing import Any

import pytest

from vscsi.link.frames import (
    HEADER_SIZE,
    MAX_DATA,
    MAX_PAYLOAD,
    PAYLOADS,
    ControlResult,
    ExtentResult,
    FrameError,
    FrameType,
    Header,
    SizeResult,
    Status,
    build_header,
    build_payload,
    decode,
    encode,
    parse_header,
    parse_payload,
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


def test_the_fast_paths_agree_with_the_declarations() -> None:
    """The header, WRITE and RESPONSE are built and parsed without construct on every mirrored
    write: byte for byte and field for field what the declarations say, on random frames."""
    rng = random.Random(7)
    for _ in range(300):
        seq, length = rng.getrandbits(64), rng.randrange(MAX_PAYLOAD + 1)
        ftype = rng.choice(list(FrameType))
        header = build_header(ftype, seq, length)
        fields = {"version": 1, "type": ftype, "seq": seq, "length": length}
        assert header == Header.build(fields)
        parsed = parse_header(header)
        assert (parsed.type, parsed.seq, parsed.length) == (ftype, seq, length)
        write = {"volume": "".join(rng.choice("aé0_-") for _ in range(rng.randrange(40))),
                 "offset": rng.getrandbits(64), "fua": rng.random() < 0.5,
                 "data": rng.randbytes(rng.randrange(600))}  # fmt: skip
        response = {
            "answers": rng.getrandbits(64),
            "status": rng.choice(list(Status)),
            "error": "ü" * rng.randrange(30),
            "data": rng.randbytes(rng.randrange(600)),
        }
        for t, f in ((FrameType.WRITE, write), (FrameType.RESPONSE, response)):
            payload = build_payload(t, **f)
            assert payload == PAYLOADS[t].build(f)
            fast, slow = parse_payload(t, payload), PAYLOADS[t].parse(payload)
            assert {k: fast[k] for k in f} == {k: slow[k] for k in f} == f
    cut = build_payload(FrameType.WRITE, volume="v" * 9, offset=1, fua=False, data=b"")
    for bad in (cut[:5], b"\x02\xff\xfe" + cut[3:]):  # runs off the end; not UTF-8
        with pytest.raises(FrameError, match="WRITE"):
            parse_payload(FrameType.WRITE, bad)
    with pytest.raises(FrameError, match="RESPONSE"):  # the error text runs off the end
        parse_payload(FrameType.RESPONSE, bytes(8) + b"\0" + (5).to_bytes(2, "big") + b"ab")
