"""DirtyMap: the record of which grains of a volume changed, for resync, minimerge and minicopy.

The bitmap lives in C (``csrc/tracker.c``); see ``tracker.h`` for the hierarchical layout and the
concurrency rules. All calls release the GIL, so marking from several threads while another
walks the extents and clears what it found loses no bit.

Range conventions (the reference implementation follows them exactly):

- byte ranges are clamped to the volume: whatever lies past ``size`` is ignored, never an error;
  negative numbers or numbers of 2**64 and more raise ``OverflowError``;
- ``mark`` and ``test`` cover every grain the range touches; ``clear`` only grains the range
  covers entirely (the volume's last, partial grain counts as covered when the range reaches
  ``size``), so clearing an unaligned range never drops a neighbour's change;
- ``extents``/``next_extent`` report dirty grains clipped to the ``[start, end)`` window.

Serialised form (``to_bytes``), little-endian::

    magic  8s  b"VSCSIDMP"
    version u32 (1), flags u32 (0), size u64, grain u64, nwords u64
    words  nwords x u64   level 0 of the bitmap, grain i is bit i % 64 of word i // 64
    crc    u32            zlib.crc32 of everything before it
"""

from __future__ import annotations

import struct
import sys
import zlib
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

from vscsi.tracker._tracker_c import ffi, lib

_MAGIC = b"VSCSIDMP"
_VERSION = 1
_HEADER = struct.Struct("<8sIIQQQ")
_CRC = struct.Struct("<I")
_OPS = {"or": lib.DM_OR, "andnot": lib.DM_ANDNOT, "and": lib.DM_AND}
_U64_FORMATS = frozenset({"Q", "L", "<Q", "<L", "=Q", "=L", "@Q", "@L"})
_alloc_raw = ffi.new_allocator(should_clear_after_alloc=False)


def check_geometry(size: int, grain: int) -> None:
    """Shared by both implementations so they reject the same geometries."""
    if not 0 < size < 1 << 64:
        raise ValueError(f"size must be in 1..2**64-1, not {size}")
    if grain < 512 or grain > 1 << 40 or grain & (grain - 1):
        raise ValueError(f"grain must be a power of two in 512..2**40, not {grain}")


def _u64_buffer(obj: Any, name: str) -> Any:
    """A cffi view of a buffer of unsigned 64-bit integers, without copying it."""
    view = memoryview(obj)
    if view.itemsize != 8 or view.format not in _U64_FORMATS:
        raise TypeError(f"{name} must be a buffer of unsigned 64-bit integers")
    if not view.c_contiguous:
        raise ValueError(f"{name} must be contiguous")
    return ffi.from_buffer("uint64_t[]", view), view.nbytes // 8


class DirtyMap:
    """One bit per ``grain`` bytes of a ``size``-byte volume, with summary levels on top.

    ``mark(offset, length) -> int`` marks every grain the range touches and returns how many
    became dirty. It is the C function bound to this map's handle (an instance attribute, not a
    method): from Python that measured ~10% cheaper per call than any method wrapper.
    """

    __slots__ = ("_h", "mark")
    __hash__ = None  # type: ignore[assignment]  # mutable
    mark: Callable[[int, int], int]

    def __init__(self, size: int, grain: int = 65536) -> None:
        check_geometry(size, grain)
        self._adopt(lib.dm_new(size, grain))

    def _adopt(self, handle: Any) -> None:
        if handle == ffi.NULL:
            raise MemoryError("cannot allocate the dirty map")
        self._h = ffi.gc(handle, lib.dm_free)
        self.mark = partial(lib.dm_mark, self._h)

    @classmethod
    def _wrap(cls, handle: Any) -> DirtyMap:
        obj = cls.__new__(cls)
        obj._adopt(handle)
        return obj

    # -- geometry ---------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return lib.dm_size(self._h)

    @property
    def grain(self) -> int:
        return lib.dm_grain(self._h)

    @property
    def nbytes(self) -> int:
        """Memory held by the bitmap and its summary levels."""
        return lib.dm_nbytes(self._h)

    def grow(self, new_size: int) -> None:
        """Extends the map (new space clean) after the volume grew.

        Not safe while other threads use the map: the bitmap is reallocated.
        """
        if new_size < self.size:
            raise ValueError(f"cannot shrink a dirty map from {self.size} to {new_size}")
        if lib.dm_grow(self._h, new_size):
            raise MemoryError("cannot grow the dirty map")

    # -- marking and queries ----------------------------------------------------------------

    def mark_many(self, offsets: Any, lengths: Any) -> int:
        """Marks ``(offsets[i], lengths[i])`` for every i in one C call; returns newly dirty."""
        offs, n = _u64_buffer(offsets, "offsets")
        lens, m = _u64_buffer(lengths, "lengths")
        if n != m:
            raise ValueError(f"{n} offsets but {m} lengths")
        return lib.dm_mark_many(self._h, offs, lens, n)

    def clear(self, offset: int, length: int) -> int:
        """Clears the grains the range covers entirely; returns how many were dirty."""
        return lib.dm_clear(self._h, offset, length)

    def test(self, offset: int, length: int) -> bool:
        return bool(lib.dm_test(self._h, offset, length))

    def count(self) -> int:
        return lib.dm_count(self._h)

    def dirty_bytes(self) -> int:
        grain, size = self.grain, self.size
        total = self.count() * grain
        tail = size % grain
        if tail and self.test(size - 1, 1):
            total -= grain - tail
        return total

    # -- extents ----------------------------------------------------------------------------

    def extents_array(
        self, start: int = 0, end: int | None = None
    ) -> tuple[memoryview, memoryview]:
        """Coalesced dirty extents in ``[start, end)`` as two u64 memoryviews (offsets, lengths).

        Runs are counted first so the result is allocated once at its exact size; if marks racing
        the walk add runs, the walk is simply redone.
        """
        end = self.size if end is None else end
        while True:
            cap = lib.dm_count_extents(self._h, start, end) + 1
            offs = _alloc_raw("uint64_t[]", cap)
            lens = _alloc_raw("uint64_t[]", cap)
            n = lib.dm_extents(self._h, start, end, offs, lens, cap)
            if n < cap:
                return _u64_view(offs, n), _u64_view(lens, n)

    def extents(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        """Iterator of ``(offset, length)`` over a snapshot taken by ``extents_array``."""
        return zip(*self.extents_array(start, end), strict=True)

    def next_extent(self, start: int = 0) -> tuple[int, int] | None:
        out = ffi.new("uint64_t[2]")
        if lib.dm_next_extent(self._h, start, self.size, out):
            return out[0], out[1]
        return None

    # -- set algebra ------------------------------------------------------------------------

    def _merge(self, other: object, op: str) -> DirtyMap:
        if not isinstance(other, DirtyMap):
            return NotImplemented
        if lib.dm_merge(self._h, other._h, _OPS[op]):
            raise ValueError(
                f"geometry mismatch: {self.size}/{self.grain} vs {other.size}/{other.grain}"
            )
        return self

    def __ior__(self, other: object) -> DirtyMap:
        return self._merge(other, "or")

    def __isub__(self, other: object) -> DirtyMap:
        return self._merge(other, "andnot")

    def __iand__(self, other: object) -> DirtyMap:
        return self._merge(other, "and")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DirtyMap):
            return NotImplemented
        return bool(lib.dm_equal(self._h, other._h))

    def copy(self) -> DirtyMap:
        return DirtyMap._wrap(lib.dm_copy(self._h))

    def __repr__(self) -> str:
        return f"DirtyMap(size={self.size}, grain={self.grain}, dirty={self.count()})"

    # -- serialisation ----------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        nwords = lib.dm_nwords(self._h)
        words = bytearray(nwords * 8)
        lib.dm_export(self._h, ffi.from_buffer("uint64_t[]", words))
        if sys.byteorder == "big":
            words = _byteswap(words)
        body = _HEADER.pack(_MAGIC, _VERSION, 0, self.size, self.grain, nwords) + words
        return bytes(body + _CRC.pack(zlib.crc32(body)))

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> DirtyMap:
        """Inverse of ``to_bytes``; anything truncated, corrupt or foreign raises ValueError."""
        data = bytes(data)
        if len(data) < _HEADER.size + _CRC.size:
            raise ValueError("dirty map image truncated")
        magic, version, _flags, size, grain, nwords = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise ValueError("not a dirty map image")
        if version != _VERSION:
            raise ValueError(f"unsupported dirty map version {version}")
        (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
        if zlib.crc32(data[: -_CRC.size]) != crc:
            raise ValueError("dirty map image checksum mismatch")
        check_geometry(size, grain)
        nbits = -(-size // grain)
        if nwords != -(-nbits // 64) or len(data) != _HEADER.size + nwords * 8 + _CRC.size:
            raise ValueError("dirty map image length does not match its geometry")
        words = bytearray(data[_HEADER.size : -_CRC.size])
        if sys.byteorder == "big":
            words = _byteswap(words)
        dm = cls(size, grain)
        if lib.dm_import(dm._h, ffi.from_buffer("uint64_t[]", words)):
            raise ValueError("dirty map image has bits past the end of the volume")
        return dm


def _u64_view(cdata: Any, n: int) -> memoryview:
    """The first n elements as a memoryview; the cffi buffer keeps the allocation alive."""
    return memoryview(ffi.buffer(cdata, n * 8)).cast("Q")


def _byteswap(words: bytearray) -> bytearray:
    from array import array

    arr = array("Q", words)
    arr.byteswap()
    return bytearray(arr.tobytes())
