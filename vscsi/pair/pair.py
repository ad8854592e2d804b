"""A local (ShadowImage) pair at run time: its state changes, the host writes and reads that
involve it. What every pair shares (record, copier, checkpoints) is `vscsi.pair.mirror`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from vscsi.pair.mirror import Mirror
from vscsi.pair.persist import PairRecord
from vscsi.pair.replica import Replica
from vscsi.pair.states import Event, Status, copying, next_status
from vscsi.pair.volume import GRAIN, window
from vscsi.store.base import VolumeError
from vscsi.tracker import DirtyMap

if TYPE_CHECKING:
    from vscsi.pair.manager import PairManager
    from vscsi.pair.volume import PairVolume

log = logging.getLogger(__name__)

DIVERGING = frozenset({Event.SECONDARY_ERROR, Event.RECOVER})  # S may now differ from P


class Pair(Mirror):
    """A local (ShadowImage) pair: both volumes in this daemon, MU#0..2 of its P-VOL."""

    def __init__(
        self, rec: PairRecord, manager: PairManager, replica: Replica, p: PairVolume, s: PairVolume
    ) -> None:
        super().__init__(rec, manager, replica, p)
        self.s = s
        self.replica: Replica = replica  # both volumes are local: always there

    # -- state changes -----------------------------------------------------------------------

    def apply(self, event: Event, *, create: bool = False, **changes: Any) -> None:
        """Move to the next status, bump the generation, persist, and tell the host side.
        If the record cannot be written the error is raised and the change undone, except a
        change saying P and S differ: memory keeps that (the safe side) for the next save."""
        with self.lock:
            status = next_status(self.name, self.rec.status, event)
            old = {k: getattr(self.rec, k) for k in ("status", "generation", *changes)}
            self.rec.status = status
            for key, value in changes.items():
                setattr(self.rec, key, value)
            self.rec.generation += 1
            try:
                self.save(create=create)
            except Exception:
                if event not in DIVERGING:
                    for key, value in old.items():
                        setattr(self.rec, key, value)
                raise
        log.info("pair %s: %s -> %s", self.name, event.value, self.rec.status.value)
        self.manager.changed(self.rec.pvol, self.rec.svol)

    def mirrored(self, rec: PairRecord) -> bool:
        return copying(rec.status) or rec.status is Status.PAIR

    def before_commit(self, rec: PairRecord) -> None:
        if rec.status is Status.RCPY:
            self.manager.save_restore_marks(self)  # before the record says it was restored

    # -- host writes -------------------------------------------------------------------------

    def takes_updates(self) -> bool:
        return self.rec.status in (Status.COPY, Status.PAIR)

    def mirrors_plainly(self) -> bool:
        t = self._thread
        return self.rec.status is Status.PAIR and (t is None or not t.is_alive())

    def track(self, offset: int, length: int) -> None:
        assert self.rec.pdiff is not None
        self.rec.pdiff.mark(offset, length)

    def update_failed(self, offset: int, length: int, error: Exception) -> None:
        """The S-VOL failed: the pair suspends (PSUE); the host's write still succeeds."""
        self.suspend(offset, length, error)

    def primary_failed(self, offset: int, length: int) -> None:
        """The P-VOL failed a host write: the range may hold part of it on P and nothing on S.
        Copy it again: in COPY it is marked still to copy; in PAIR a recovery copy of it runs
        (status COPY until it is done); split or suspended, it is a P-VOL change."""
        with self.lock:
            rec = self.rec
            if rec.status is Status.COPY and rec.pending is not None:
                rec.pending.mark(offset, length)
                return
            if rec.status is not Status.PAIR:
                if rec.pdiff is not None:
                    rec.pdiff.mark(offset, length)
                return
            pending = DirtyMap(self.p.size, GRAIN)
            pending.mark(offset, length)
            total = pending.dirty_bytes()
            try:
                self.apply(Event.RECOVER, pending=pending, fence=0, copy_total=total)
            except (OSError, VolumeError) as e:  # COPY in memory; the copier saves it again
                log.error("pair %s: record not written: %s", self.name, e)
        log.warning("pair %s: P-VOL write failed at %d+%d, copy again", self.name, offset, length)
        self.start_copier()

    def suspend(self, offset: int, length: int, error: BaseException) -> None:
        """SECONDARY_ERROR: keep the failed range and whatever was left to copy as P changes."""
        log.warning("pair %s: S-VOL error, suspending: %s", self.name, error)
        with self.lock:
            pdiff = self.rec.pdiff or DirtyMap(self.p.size, GRAIN)
            pdiff.mark(offset, length)
            if self.rec.status not in (Status.COPY, Status.PAIR, Status.RCPY):
                return
            left = self.remaining()
            if left is not None:
                pdiff |= left
            self.stopping.set()
            sdiff = self.rec.sdiff or DirtyMap(self.p.size, GRAIN)
            try:
                self.apply(Event.SECONDARY_ERROR, pdiff=pdiff, sdiff=sdiff, pending=None, fence=0)
            except (OSError, VolumeError) as e:  # PSUE in memory; the next checkpoint saves it
                log.error("pair %s: record not written: %s", self.name, e)

    # -- host reads during a restore -----------------------------------------------------------

    def read_restoring(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """A P-VOL read during RCPY: grains not restored yet come from the S-VOL (the image
        the P-VOL is being made into; neither side takes host writes meanwhile). Under the
        region lock, so no copy of the range is half done while it is read."""
        length = sum(len(b) for b in bufs)
        with self.p.regions.hold(offset, length):
            self.p.read_held(offset, bufs)
            left = self.remaining()
            if left is None:  # the restore ended: the P-VOL is whole
                return
            end = offset + length
            for start, n in left.extents(offset - offset % GRAIN, end):
                lo, hi = max(start, offset), min(start + n, end)
                if lo < hi:
                    self.replica.readinto(lo, window(bufs, lo - offset, hi - lo))

    def start_copier(self, restore: bool | None = None) -> None:
        """The copy of the current status: a restore in RCPY."""
        super().start_copier(self.rec.status is Status.RCPY if restore is None else restore)

    def finish_copy(self) -> bool:
        """Record the end of the copy once its data is durable. False when something was
        marked to copy meanwhile (copy again); True when done or suspended."""
        if not self.flush_replica():
            return True
        self.p.base.flush()
        size = self.p.size
        if self.rec.status is Status.RCPY:
            self.manager.save_restore_marks(self)  # durable before the restore is recorded done
        with self.lock:
            assert self.rec.pending is not None
            if self.rec.pending.count():
                return False
            if self.rec.status is Status.RCPY:
                clean = {"pdiff": DirtyMap(size, GRAIN), "sdiff": DirtyMap(size, GRAIN)}
                self.apply(Event.RESTORE_DONE, pending=None, fence=0, **clean)
            else:
                self.apply(Event.COPY_DONE, pending=None, fence=0, pdiff=None, sdiff=None)
        return True
