"""Where the volumes a copy or merge involves have data: a range where none has any needs no
reading, so a sparse volume is copied or merged in the time its data takes and a thin target
stays thin."""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Protocol

from vscsi.store.base import Extent, VolumeError


class Mapped(Protocol):
    """Anything that can say where it has data: a volume, or a replica of one."""

    def extent_at(self, offset: int) -> Extent: ...


class Run(enum.Enum):
    """What a run of a range needs, from which of the involved volumes have data there."""

    DATA = "data"  # read it (and write or compare it)
    ZERO = "zero"  # the source is a hole and the target is not: deallocate the target's blocks
    SKIP = "skip"  # a hole everywhere involved: they agree (zeroes), nothing is read


Kind = Callable[[tuple[bool, ...]], Run]


def copy_kind(mapped: tuple[bool, ...]) -> Run:
    """For a copy from the first volume to the second."""
    source, target = mapped
    return Run.DATA if source else Run.ZERO if target else Run.SKIP


def merge_kind(mapped: tuple[bool, ...]) -> Run:
    """For a merge: wherever any member has data, the members must be compared."""
    return Run.DATA if any(mapped) else Run.SKIP


def extent(volume: Mapped, offset: int, end: int, block_size: int) -> Extent:
    """`volume`'s extent at `offset`, clipped to `end` and to whole blocks: a hole shrinks to
    the blocks it covers, data grows to whole blocks, and a volume that cannot tell counts as
    data, so a hole is only ever trusted where it really is one."""
    try:
        ext = volume.extent_at(offset)
    except VolumeError:
        return Extent(offset, end - offset, True)
    n = min(ext.length, end - offset)
    if ext.mapped or n < block_size:
        return Extent(offset, min(max(block_size, -(-n // block_size) * block_size), end - offset),
                      True)  # fmt: skip
    return Extent(offset, n - n % block_size, False)


def common_hole(volumes: Sequence[Mapped], offset: int, length: int, block_size: int) -> int:
    """How much of [offset, offset+length) from `offset` on is a hole on every volume."""
    exts = [extent(v, offset, offset + length, block_size) for v in volumes]
    return 0 if any(e.mapped for e in exts) else min(e.length for e in exts)


def runs(
    volumes: Sequence[Mapped], offset: int, length: int, block_size: int, kind: Kind
) -> list[tuple[int, int, Run]]:
    """[offset, offset+length) as (offset, length, run) pieces, `kind` of which volumes have
    data there (in the order given); neighbours of one kind are joined."""
    out: list[tuple[int, int, Run]] = []
    pos, end = offset, offset + length
    while pos < end:
        exts = [extent(v, pos, end, block_size) for v in volumes]
        n = min(e.length for e in exts)
        what = kind(tuple(e.mapped for e in exts))
        if out and out[-1][2] is what:
            out[-1] = (out[-1][0], out[-1][1] + n, what)
        else:
            out.append((pos, n, what))
        pos += n
    return out
