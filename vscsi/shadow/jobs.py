"""A shadow set's copies and merges as jobs of the resync engine: copy and minicopy move the
master's data to a copy target, merge and minimerge make every member equal to the master.
The engine picks the chunks, skips what is a hole on every volume involved, paces copies and
asks for checkpoints; this module says what moving one run means for a set."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from vscsi.resync.engine import deallocate
from vscsi.resync.holes import Mapped, Run, copy_kind, merge_kind, runs
from vscsi.shadow.states import Operation
from vscsi.store.base import VolumeError

if TYPE_CHECKING:
    from vscsi.shadow.set import Member, ShadowSet


class ShadowJob:
    """The set's active operation (see `vscsi.resync.engine.Job`)."""

    def __init__(self, shadow: ShadowSet, op: Operation) -> None:
        self.shadow = shadow
        self.op = op
        # copies are paced to `copy_rate` (a crash abandons a copy, as the seed says of a
        # standalone system, so pacing costs no safety); merges run at full speed
        self.paced = op.kind.is_copy

    def _target(self) -> Member:
        target = self.shadow._members[self.op.target] if self.op.target else None
        assert target is not None and target.volume is not None
        return target

    def involved(self) -> Sequence[Mapped]:
        """The master and the target of a copy; every member in the set for a merge."""
        s = self.shadow
        members = [s._full()[0], self._target()] if self.op.kind.is_copy else s._in_set()
        return [m.volume for m in members if m.volume is not None]

    def kind(self, mapped: tuple[bool, ...]) -> Run:
        return copy_kind(mapped) if self.op.kind.is_copy else merge_kind(mapped)

    def move(self, offset: int, length: int, run: Run) -> bool:
        """False when the operation is no longer the head of the queue (a copy went ahead of a
        merge, or the operation was abandoned): the worker then runs the new head, and this
        one resumes from its fence later."""
        with self.shadow._lock:
            if self.shadow.state.active() is not self.op:
                return False
        stats = self.shadow.stats
        if not self.op.kind.is_copy:
            if run is Run.SKIP:
                stats.merge_skipped += length
            else:
                merge_piece(self.shadow, offset, length)
            return True
        if run is Run.SKIP:
            stats.copy_skipped += length
            return True
        return self._copy(offset, length, run)

    def _copy(self, offset: int, length: int, run: Run) -> bool:
        """From the master (another full member if it fails) to the target; where the master
        has a hole nothing is read and the target's blocks are deallocated. False when the
        target failed (its copy is abandoned)."""
        s, target = self.shadow, self._target()
        assert target.volume is not None
        buf = memoryview(bytearray(length))
        if run is Run.DATA:
            s._read_repairing(s._full(), offset, [buf])  # none can read: the copy stops
        try:
            if run is Run.ZERO:
                deallocate(target.volume, offset, length)
            else:
                target.volume.write(offset, [buf])
        except VolumeError as e:
            s._fail_and_commit([(target, e)], offset, length)
            return False
        s.stats.copied += length
        return True

    def checkpoint(self) -> bool:
        self.shadow._checkpoint()
        return True

    def finish(self) -> bool:
        self.shadow._finish(self.op)
        return True


def merge_range(shadow: ShadowSet, offset: int, length: int, chunk: int) -> None:
    """Merge [offset, offset+length) where any member has data (a host read of a range the
    merge has not reached). Caller holds the region lock."""
    volumes = [m.volume for m in shadow._in_set() if m.volume is not None]
    for pos, n, run in runs(volumes, offset, length, shadow.block_size, merge_kind):
        if run is Run.SKIP:
            shadow.stats.merge_skipped += n
            continue
        for p in range(pos, pos + n, chunk):
            merge_piece(shadow, p, min(chunk, pos + n - p))


def merge_piece(shadow: ShadowSet, offset: int, length: int) -> None:
    """Read the master (another full member if it fails), write every other member where it
    differs. Bytearrays compare with memcmp, memoryviews byte by byte."""
    data, peer = bytearray(length), bytearray(length)
    buf = memoryview(data)
    source = shadow._read_repairing(shadow._full(), offset, [buf])
    failed = []
    for m in shadow._in_set():
        if m is source:
            continue
        assert m.volume is not None
        try:
            try:
                m.volume.readinto(offset, [memoryview(peer)])
                same = peer == data
            except VolumeError:
                same = False
            if not same:
                m.volume.write(offset, [buf])
                shadow.stats.merge_written += length
        except VolumeError as e:
            failed.append((m, e))
    shadow.stats.merge_scanned += length
    shadow._fail_and_commit(failed, offset, length)
