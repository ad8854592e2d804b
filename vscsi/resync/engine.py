"""The one resync engine: every copy and merge of pairs and shadow sets runs through `Resync`.

A job (a pair's copy or restore, a shadow set's copy, minicopy, merge or minimerge) says which
volumes are involved and how to move one run of a range; the engine owns the rest: the to-do
map and its fence, the region lock a chunk is moved under, the holes it may skip, pacing, and
when to checkpoint. A to-do grain is cleared only after it was moved, under its region lock,
so a snapshot of the map taken at any moment still counts a chunk in progress as to do, and a
host read or write of the range waits for the chunk and sees it whole.

Marks are added to the map only under the region lock of their range (host writes that fail,
crash recovery before the engine starts), so the clear after a move never loses one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol

from vscsi.resync.holes import Kind, Mapped, Run, common_hole, runs
from vscsi.resync.pace import Pace
from vscsi.store.locks import RegionLocks, WriteGate
from vscsi.tracker import DirtyMap

SKIP_CHUNKS = 1024  # the most chunks one step skips as a hole under one region lock
ZERO_CHUNK = 1 << 20  # zeroes written per call where a target cannot deallocate


@dataclass(frozen=True, slots=True)
class Settings:
    """`chunk` is what moves under one region lock, `grain` the to-do map's unit,
    `copy_rate` bytes/s for paced jobs (0 = unlimited); a checkpoint is due every
    `checkpoint_bytes` moved or `checkpoint_interval` seconds (0 = by bytes only)."""

    chunk: int = 1 << 20
    grain: int = 65536
    copy_rate: int = 0
    checkpoint_bytes: int = 64 << 20
    checkpoint_interval: float = 0.0


class Cursor(Protocol):
    """Where the job's durable record keeps its fence: everything before it was moved."""

    fence: int


class Job(Protocol):
    """What one copy or merge moves; the engine decides what, when and how much."""

    @property
    def paced(self) -> bool:
        """Whether `copy_rate` applies (copies are paced, merges are not)."""
        ...

    def involved(self) -> Sequence[Mapped]:
        """The volumes whose holes decide what may be skipped, in `kind`'s order."""
        ...

    def kind(self, mapped: tuple[bool, ...]) -> Run: ...

    def move(self, offset: int, length: int, run: Run) -> bool:
        """Move one run (called under its region lock); False when the job cannot go on
        (its target failed and it was suspended or abandoned)."""
        ...

    def checkpoint(self) -> bool:
        """Make what was moved durable, then record the fence; False to stop."""
        ...

    def finish(self) -> bool:
        """Nothing is left to do: make it durable and record the end. False when something
        was marked meanwhile (the engine goes on)."""
        ...


class Resync:
    """Runs `job` over the grains of `todo` from `cursor.fence` on. `lock` guards `todo` and
    the fence (the owner's state lock); `regions` are the host write path's region locks;
    a step holds `gate` shared (when given) before its region lock, as a host write does, so
    a quiesced state change has no copy write in flight either."""

    def __init__(
        self,
        job: Job,
        todo: DirtyMap,
        cursor: Cursor,
        *,
        regions: RegionLocks,
        gate: WriteGate | None = None,
        lock: AbstractContextManager[object],
        block_size: int,
        settings: Settings,
    ) -> None:
        self.job = job
        self.todo = todo
        self.cursor = cursor
        self.regions = regions
        self.gate = gate
        self.lock = lock
        self.block_size = block_size
        self.settings = settings

    def run(self, stop: threading.Event) -> bool:
        """Move chunk by chunk until nothing is left and the job recorded its end (True), or
        until `stop` is set or the job cannot go on (False)."""
        s = self.settings
        pace = Pace(s.copy_rate if self.job.paced else 0)
        since, due = 0, self._due()
        while not stop.is_set():
            ext = self._next()
            if ext is None:
                if self.job.finish():
                    return True
                continue
            done = self._step(*ext)
            if done is None:
                return False
            pace.after(done, stop)
            since += done
            if since >= s.checkpoint_bytes or time.monotonic() >= due:
                if not self.job.checkpoint():
                    return False
                since, due = 0, self._due()
        return False

    def _due(self) -> float:
        interval = self.settings.checkpoint_interval
        return time.monotonic() + interval if interval else float("inf")

    def _next(self) -> tuple[int, int] | None:
        """The next run to do from the fence on; once nothing is ahead, from the start again
        (a grain marked behind the fence meanwhile); None when the map is empty."""
        with self.lock:
            ext = self._ahead(self.cursor.fence)
            if ext is None and self.cursor.fence:
                self.cursor.fence = 0
                ext = self._ahead(0)
            return ext

    def _ahead(self, start: int) -> tuple[int, int] | None:
        """The first run at or after `start`, measured up to SKIP_CHUNKS chunks (the map's own
        `next_extent` measures a run to its end: for a full merge, the whole map each step)."""
        most = SKIP_CHUNKS * self.settings.chunk
        size = self.todo.size
        offs, lens = self.todo.extents_array(start, min(start + most, size))
        if len(offs):
            return int(offs[0]), int(lens[0])
        ext = self.todo.next_extent(start + most) if start + most < size else None
        return (ext[0], min(ext[1], most)) if ext is not None else None

    def _step(self, offset: int, span: int) -> int | None:
        """Move the next chunk, or skip the hole ahead (up to `span`) when every involved
        volume has one there. Holes are looked up again under the region lock before
        anything is skipped. Returns the bytes moved, None when the job cannot go on."""
        s, bs = self.settings, self.block_size
        involved = self.job.involved()
        length = min(span, s.chunk)
        hole = common_hole(involved, offset, span, bs)
        if hole > length:
            length = hole if hole == span else max(length, hole - hole % s.grain)
        done = 0
        with self.gate.shared() if self.gate else nullcontext(), self.regions.hold(offset, length):
            with self.lock:
                todo = self.todo.test(offset, length)  # a host read may have merged it
            if todo:
                for pos, n, run in runs(involved, offset, length, bs, self.job.kind):
                    for p, k in _pieces(pos, n, n if run is Run.SKIP else s.chunk):
                        if not self.job.move(p, k, run):
                            return None
                        done += 0 if run is Run.SKIP else k
            with self.lock:
                self.todo.clear(offset, length)
                self.cursor.fence = offset + length
        return done


def _pieces(offset: int, length: int, most: int) -> Iterator[tuple[int, int]]:
    """[offset, offset+length) in pieces of at most `most`, so no buffer outgrows a chunk."""
    for p in range(offset, offset + length, most):
        yield p, min(most, offset + length - p)


class Deallocatable(Protocol):
    @property
    def supports_unmap(self) -> bool: ...

    def unmap(self, offset: int, length: int) -> None: ...

    def write(self, offset: int, bufs: Sequence[memoryview], fua: bool = False) -> None: ...


def deallocate(target: Deallocatable, offset: int, length: int) -> None:
    """Make the range read as zeroes: deallocated where the target can, else written."""
    if target.supports_unmap:
        target.unmap(offset, length)
        return
    zeroes = memoryview(bytes(min(length, ZERO_CHUNK)))
    end = offset + length
    while offset < end:
        n = min(end - offset, len(zeroes))
        target.write(offset, [zeroes[:n]])
        offset += n


__all__ = ["Job", "Kind", "Resync", "Run", "Settings", "deallocate"]
