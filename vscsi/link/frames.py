"""The link protocol between two arrays, declared once with construct.

Every frame is a fixed header (magic, protocol version, frame type, sequence number, payload
length) and a payload whose layout the type selects. Integers are big endian. The P side sends
HELLO, the requests and HEARTBEAT with sequence numbers 0, 1, 2, ...; the S side sends HELLO and
one RESPONSE per request, naming the sequence number it answers. Anything that does not parse
exactly (bad magic, unknown version or type, a payload too long or with bytes left over)
raises `FrameError`; docs/link.md shows the layouts.
"""

from __future__ import annotations

import enum
import json
import struct
from typing import Any, NamedTuple

from construct import (
    Adapter,
    Const,
    Construct,
    ConstructError,
    Container,
    ExprValidator,
    Flag,
    GreedyBytes,
    Int8ub,
    Int16ub,
    Int32ub,
    Int64ub,
    Mapping,
    OneOf,
    PascalString,
    Struct,
    Terminated,
    ValidationError,
)

MAGIC = b"VSLK"
VERSION = 1  # the newest protocol version this code speaks
MIN_VERSION = 1  # the oldest
MAX_DATA = 16 << 20  # the largest READ or WRITE one request carries
MAX_PAYLOAD = MAX_DATA + 4096


class FrameError(ValueError):
    """A malformed or unknown frame: the connection it came on is dropped."""


class FrameType(enum.IntEnum):
    HELLO = 1
    READ = 2
    WRITE = 3
    UNMAP = 4
    FLUSH = 5
    EXTENT = 6
    SIZE = 7
    RESPONSE = 8
    HEARTBEAT = 9
    CONTROL = 10


class Status(enum.IntEnum):
    """How a request ended on the S side."""

    OK = 0
    NO_VOLUME = 1  # no volume of that name is offered to this peer
    BAD_REQUEST = 2  # e.g. beyond the end of the volume, or too large
    FAILED = 3  # the volume failed it (medium error, ...)
    NOT_READY = 4  # the volume's state forbids access
    WRITE_PROTECTED = 5  # the volume's state forbids writes


class _JsonObject(Adapter):  # type: ignore[misc]
    """A JSON object as UTF-8 bytes (CONTROL bodies)."""

    def _decode(self, obj: bytes, context: Any, path: Any) -> dict[str, Any]:
        try:
            value = json.loads(obj.decode())
        except (UnicodeDecodeError, ValueError):
            raise ValidationError("CONTROL body is not JSON", path=path) from None
        if not isinstance(value, dict):
            raise ValidationError("CONTROL body is not a JSON object", path=path)
        return value

    def _encode(self, obj: dict[str, Any], context: Any, path: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()


def _enum(kind: type[enum.IntEnum]) -> Construct:
    """One byte that must be a member of `kind` (unknown values do not parse)."""
    return Mapping(Int8ub, {m: m.value for m in kind})


def _at_most(subcon: Construct, limit: int) -> Construct:
    return ExprValidator(subcon, lambda value, ctx: value <= limit)


Header = Struct(
    "magic" / Const(MAGIC),
    "version" / OneOf(Int16ub, range(MIN_VERSION, VERSION + 1)),
    "type" / _enum(FrameType),
    "seq" / Int64ub,
    "length" / _at_most(Int32ub, MAX_PAYLOAD),
)
HEADER_SIZE = Header.sizeof()

Volume = PascalString(Int8ub, "utf8")

PAYLOADS: dict[FrameType, Construct] = {
    FrameType.HELLO: Struct(
        "name" / PascalString(Int8ub, "utf8"),  # the sender's array name
        "serial" / Int32ub,  # the sender's array serial (its certificate must say the same)
        "min_version" / Int16ub,
        "max_version" / Int16ub,
        Terminated,
    ),
    FrameType.READ: Struct(
        "volume" / Volume, "offset" / Int64ub, "length" / _at_most(Int32ub, MAX_DATA),
        Terminated,
    ),
    FrameType.WRITE: Struct(
        "volume" / Volume, "offset" / Int64ub, "fua" / Flag, "data" / GreedyBytes,
    ),
    FrameType.UNMAP: Struct(
        "volume" / Volume, "offset" / Int64ub, "length" / Int64ub, Terminated,
    ),
    FrameType.FLUSH: Struct("volume" / Volume, Terminated),
    FrameType.EXTENT: Struct("volume" / Volume, "offset" / Int64ub, Terminated),
    FrameType.SIZE: Struct("volume" / Volume, Terminated),
    FrameType.RESPONSE: Struct(
        "answers" / Int64ub,  # the sequence number of the request
        "status" / _enum(Status),
        "error" / PascalString(Int16ub, "utf8"),  # why, when status is not OK
        "data" / GreedyBytes,  # READ: the bytes; SIZE, EXTENT: a result below; CONTROL: JSON
    ),
    FrameType.HEARTBEAT: Struct(Terminated),
    FrameType.CONTROL: Struct("body" / _JsonObject(GreedyBytes)),
}  # fmt: skip

# What a RESPONSE's data holds for SIZE, EXTENT and CONTROL requests.
SizeResult = Struct("size" / Int64ub, Terminated)
ExtentResult = Struct("offset" / Int64ub, "length" / Int64ub, "mapped" / Flag, Terminated)
ControlResult = _JsonObject(GreedyBytes)


class Frame(NamedTuple):
    type: FrameType
    seq: int
    body: Container


# Fast paths for the frames of every mirrored write (the header, WRITE, RESPONSE): the same
# bytes as the declarations above, which a unit test checks on random frames; anything that
# does not decode cleanly goes through the declarations, so errors read the same.
_HEADER = struct.Struct(">4sHBQI")
_WRITE_AT = struct.Struct(">Q?")  # after the volume name: offset, fua
_RESPONSE = struct.Struct(">QBH")  # answers, status, length of the error text
_TYPES = {t.value: t for t in FrameType}
_STATUSES = {s.value: s for s in Status}


def encode(ftype: FrameType, seq: int, **fields: Any) -> bytes:
    """One frame, header and payload, ready to send."""
    payload = build_payload(ftype, **fields)
    return build_header(ftype, seq, len(payload)) + payload


def write_head(volume: str, offset: int, fua: bool) -> bytes:
    """A WRITE payload up to its data (sent apart: the data is not copied into a payload)."""
    name = volume.encode()
    if len(name) < 256:
        return b"".join((bytes((len(name),)), name, _WRITE_AT.pack(offset, fua)))
    return PAYLOADS[FrameType.WRITE].build({"volume": volume, "offset": offset, "fua": fua,
                                            "data": b""})  # fmt: skip


def build_payload(ftype: FrameType, **fields: Any) -> bytes:
    if ftype is FrameType.WRITE:
        return write_head(fields["volume"], fields["offset"], fields["fua"]) + fields["data"]
    if ftype is FrameType.RESPONSE:
        error = fields["error"].encode()
        if len(error) < 65536:
            head = _RESPONSE.pack(fields["answers"], fields["status"], len(error))
            return b"".join((head, error, fields["data"]))
    return PAYLOADS[ftype].build(fields)


def build_header(ftype: FrameType, seq: int, length: int) -> bytes:
    """Built apart from the payload: the P side numbers a request only as it sends it."""
    if length <= MAX_PAYLOAD:
        return _HEADER.pack(MAGIC, VERSION, ftype, seq, length)
    return Header.build({"version": VERSION, "type": ftype, "seq": seq, "length": length})


def parse_header(data: bytes) -> Container:
    """The `HEADER_SIZE` bytes that start a frame: type, seq and the payload's length."""
    if len(data) == HEADER_SIZE:
        magic, version, ftype, seq, length = _HEADER.unpack(data)
        if (magic == MAGIC and MIN_VERSION <= version <= VERSION and ftype in _TYPES
                and length <= MAX_PAYLOAD):  # fmt: skip
            return Container(version=version, type=_TYPES[ftype], seq=seq, length=length)
    return _parse(Header, data, "header")


def parse_payload(ftype: FrameType, data: bytes) -> Container:
    try:
        if ftype is FrameType.WRITE:
            n = data[0]
            offset, fua = _WRITE_AT.unpack_from(data, 1 + n)
            volume = data[1 : 1 + n].decode()  # the data is a view: a MiB is not copied again
            return Container(volume=volume, offset=offset, fua=fua,
                             data=memoryview(data)[10 + n :])  # fmt: skip
        if ftype is FrameType.RESPONSE:
            answers, status, n = _RESPONSE.unpack_from(data)
            if status in _STATUSES and len(data) >= 11 + n:
                error = data[11 : 11 + n].decode()
                return Container(answers=answers, status=_STATUSES[status], error=error,
                                 data=data[11 + n :])  # fmt: skip
    except (IndexError, struct.error, UnicodeDecodeError):
        pass  # the declaration says what is wrong
    return _parse(PAYLOADS[ftype], data, ftype.name)


def parse_result(result: Construct, data: bytes) -> Container:
    return _parse(result, data, "result")


def decode(data: bytes) -> Frame:
    """A whole frame from bytes (the sessions read the header and the payload separately)."""
    header = parse_header(data[:HEADER_SIZE])
    if len(data) != HEADER_SIZE + header.length:
        raise FrameError(f"frame is {len(data)} bytes, header says {HEADER_SIZE + header.length}")
    return Frame(header.type, header.seq, parse_payload(header.type, data[HEADER_SIZE:]))


def _parse(construct: Construct, data: bytes, what: str) -> Container:
    try:
        return construct.parse(data)
    except ConstructError as e:
        raise FrameError(f"malformed {what}: {'; '.join(str(e).splitlines())}") from None
