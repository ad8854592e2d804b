"""A deliberately naive DirtyMap (a set of grain numbers) that the tests compare the C one with.

It follows the range conventions documented in ``vscsi.tracker.dirtymap`` exactly; being
obviously right matters here, speed does not.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from vscsi.tracker.dirtymap import check_geometry


def _u64(value: int) -> int:
    """Mirrors cffi's conversion to uint64_t so both implementations fail alike."""
    if not 0 <= value < 1 << 64:
        raise OverflowError(f"{value} does not fit an unsigned 64-bit integer")
    return value


class ReferenceDirtyMap:
    def __init__(self, size: int, grain: int = 65536) -> None:
        check_geometry(size, grain)
        self.size, self.grain = size, grain
        self.grains: set[int] = set()

    @property
    def nbits(self) -> int:
        return -(-self.size // self.grain)

    def _touched(self, offset: int, length: int) -> range:
        offset, length = _u64(offset), _u64(length)
        end = min(offset + length, self.size)
        if length == 0 or offset >= end:
            return range(0)
        return range(offset // self.grain, (end - 1) // self.grain + 1)

    def mark(self, offset: int, length: int) -> int:
        new = set(self._touched(offset, length)) - self.grains
        self.grains |= new
        return len(new)

    def mark_many(self, offsets: Iterable[int], lengths: Iterable[int]) -> int:
        return sum(self.mark(o, n) for o, n in zip(offsets, lengths, strict=True))

    def clear(self, offset: int, length: int) -> int:
        offset, length = _u64(offset), _u64(length)
        end = min(offset + length, self.size)
        first = -(-offset // self.grain)
        last = self.nbits if end == self.size else end // self.grain
        gone = self.grains & set(range(first, last))
        self.grains -= gone
        return len(gone)

    def test(self, offset: int, length: int) -> bool:
        return any(g in self.grains for g in self._touched(offset, length))

    def count(self) -> int:
        return len(self.grains)

    def dirty_bytes(self) -> int:
        return sum(n for _, n in self.extents())

    def _runs(self, first: int = 0) -> Iterator[tuple[int, int]]:
        """Maximal runs of dirty grains at or after grain ``first`` as (first, end) grains."""
        run: list[int] = []
        for g in sorted(g for g in self.grains if g >= first):
            if run and g == run[1]:
                run[1] = g + 1
                continue
            if run:
                yield run[0], run[1]
            run = [g, g + 1]
        if run:
            yield run[0], run[1]

    def _bytes(self, first: int, end: int) -> tuple[int, int]:
        lo, hi = first * self.grain, min(end * self.grain, self.size)
        return lo, hi - lo

    def extents(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        start = _u64(start)
        end = self.size if end is None else min(_u64(end), self.size)
        for first, last in self._runs(start // self.grain):
            lo, n = self._bytes(first, last)
            lo, hi = max(lo, start), min(lo + n, end)
            if lo >= hi:
                break
            yield lo, hi - lo

    def extents_array(self, start: int = 0, end: int | None = None) -> tuple[list[int], list[int]]:
        found = list(self.extents(start, end))
        return [o for o, _ in found], [n for _, n in found]

    def next_extent(self, start: int = 0) -> tuple[int, int] | None:
        return next(self.extents(start), None)

    def _check(self, other: ReferenceDirtyMap) -> None:
        if (self.size, self.grain) != (other.size, other.grain):
            raise ValueError("geometry mismatch")

    def __ior__(self, other: ReferenceDirtyMap) -> ReferenceDirtyMap:
        self._check(other)
        self.grains |= other.grains
        return self

    def __isub__(self, other: ReferenceDirtyMap) -> ReferenceDirtyMap:
        self._check(other)
        self.grains -= other.grains
        return self

    def __iand__(self, other: ReferenceDirtyMap) -> ReferenceDirtyMap:
        self._check(other)
        self.grains &= other.grains
        return self

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ReferenceDirtyMap):
            return NotImplemented
        return (self.size, self.grain, self.grains) == (other.size, other.grain, other.grains)

    __hash__ = None  # type: ignore[assignment]

    def copy(self) -> ReferenceDirtyMap:
        dup = ReferenceDirtyMap(self.size, self.grain)
        dup.grains = set(self.grains)
        return dup

    def grow(self, new_size: int) -> None:
        if new_size < self.size:
            raise ValueError("cannot shrink")
        self.size = new_size
