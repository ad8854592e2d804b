"""One pair at run time: its durable record, the S-VOL replica, host writes and reads that
involve the pair, and its copier (a job of the resync engine)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from vscsi.durable.faults import fault_point
from vscsi.pair.copy import PairCopy
from vscsi.pair.persist import PairRecord
from vscsi.pair.replica import Replica
from vscsi.pair.states import Event, Status, copying, next_status
from vscsi.pair.volume import GRAIN, window
from vscsi.resync.engine import Resync
from vscsi.store.base import VolumeError
from vscsi.tracker import DirtyMap

if TYPE_CHECKING:
    from vscsi.pair.manager import PairManager
    from vscsi.pair.volume import PairVolume

log = logging.getLogger(__name__)

DIVERGING = frozenset({Event.SECONDARY_ERROR, Event.RECOVER})  # S may now differ from P


class Pair:
    """One pair at run time: its durable record, the S-VOL replica, and the copier thread."""

    def __init__(
        self, rec: PairRecord, manager: PairManager, replica: Replica, p: PairVolume, s: PairVolume
    ) -> None:
        self.rec = rec
        self.manager = manager
        self.replica = replica
        self.p, self.s = p, s
        self.lock = threading.RLock()
        self.stopping = threading.Event()  # set to stop the copier
        self._thread: threading.Thread | None = None
        self.copy: PairCopy | None = None  # the latest copy run (pairdisplay --json counts)
        self.deleted = False  # set under `lock` by delete: the record is never written again

    @property
    def name(self) -> str:
        return self.rec.name

    @property
    def status(self) -> Status:
        return self.rec.status

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

    def stamped(self) -> tuple[int, PairRecord] | None:
        """A generation and the snapshot it stamps, taken together under the pair's lock, so
        stamp order is snapshot order; None once the pair is deleted."""
        with self.lock:
            if self.deleted:
                return None
            return self.manager.store.stamp(), self.snapshot()

    def save(self, *, create: bool = False) -> None:
        """Make the state as of now durable (dropped by the committer if a later snapshot
        already is)."""
        taken = self.stamped()
        if taken is not None:
            self.manager.store.commit(taken[1], taken[0], create=create)

    def snapshot(self) -> PairRecord:
        """The record with its own copy of the maps (the engine clears a chunk from the to-do
        map only once it was copied, so a chunk in progress still counts as to copy)."""
        with self.lock:
            return replace(self.rec, pending=self.remaining())

    def remaining(self) -> DirtyMap | None:
        """Grains still to copy, a chunk in progress included."""
        with self.lock:
            return None if self.rec.pending is None else self.rec.pending.copy()

    def checkpoint(self) -> bool:
        """Stamp a snapshot, then make the copied data durable, then commit the snapshot: the
        record never claims a copy that is not on disk, and every mark made before the call is
        durable when it returns (the write-intent log relies on that). False when the S-VOL
        failed the flush: the pair is then PSUE, and that record is the one made durable."""
        taken = self.stamped()
        if taken is None:
            return True  # deleted: nothing of it may be written
        gen, rec = taken
        try:
            fault_point("pair.checkpoint.stamped")
            mirrored = copying(rec.status) or rec.status is Status.PAIR
            if mirrored and not self.flush_replica():
                self.manager.store.abandon(gen)
                self.save()  # the suspended record, with every mark made so far
                return False
            self.p.base.flush()
            fault_point("pair.checkpoint.flushed")
            if rec.status is Status.RCPY:
                self.manager.save_restore_marks(self)  # before the record says it was restored
        except BaseException:
            self.manager.store.abandon(gen)
            raise
        self.manager.store.commit(rec, gen)
        fault_point("pair.checkpoint.committed")
        return True

    def flush_replica(self) -> bool:
        """Flush the S-VOL; a failure may have lost any write since the last flush, so the
        whole volume counts as changed and the pair suspends (resync copies everything)."""
        try:
            self.replica.flush()
        except Exception as e:
            self.suspend(0, self.p.size, e)
            return False
        return True

    def progress(self) -> int:
        """Percent copied while copying; otherwise percent identical (as CCI shows a split)."""
        rec = self.rec
        left = self.remaining()
        if left is not None:
            total = rec.copy_total
            return (
                100 if not total else max(0, min(100, 100 * (total - left.dirty_bytes()) // total))
            )
        changed = DirtyMap(self.p.size, GRAIN)
        for m in (rec.pdiff, rec.sdiff):
            if m is not None:
                changed |= m
        return 100 - 100 * changed.dirty_bytes() // self.p.size

    # -- host writes -------------------------------------------------------------------------

    def primary_written(
        self, offset: int, length: int, mirror: Callable[[Replica], None]
    ) -> None:
        """A host write or UNMAP landed on the P-VOL: `mirror` it to the S-VOL (COPY/PAIR) or
        track it (PSUS/PSUE).

        An S-VOL failure suspends the pair (PSUE) and the command still succeeds for the host.
        """
        with self.lock:
            status = self.rec.status
            if status not in (Status.COPY, Status.PAIR):
                assert self.rec.pdiff is not None
                self.rec.pdiff.mark(offset, length)
                return
        try:
            mirror(self.replica)
        except Exception as e:  # any S-side failure, local or (later) remote link
            self.suspend(offset, length, e)

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

    def secondary_written(self, offset: int, length: int) -> None:
        with self.lock:
            assert self.rec.sdiff is not None
            self.rec.sdiff.mark(offset, length)

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

    # -- the copier ----------------------------------------------------------------------------

    def start_copier(self) -> None:
        """Run the copy (COPY or RCPY) through the resync engine in the background."""
        m = self.manager
        self.stopping = threading.Event()
        self.copy = PairCopy(self, restore=self.rec.status is Status.RCPY)
        assert self.rec.pending is not None
        resync = Resync(
            self.copy,
            self.rec.pending,
            self.rec,
            regions=self.p.regions,
            gate=self.p.gate,
            lock=self.lock,
            block_size=self.p.block_size,
            settings=m.resync_settings,
        )
        self._thread = threading.Thread(
            target=self._run_copy, args=(resync,), name=f"pair-copy-{self.name}", daemon=True
        )
        self._thread.start()

    def _run_copy(self, resync: Resync) -> None:
        try:
            resync.run(self.stopping)
        except Exception:  # a P-VOL failure: the copy stays pending and resumes on restart
            log.exception("pair %s: copy stopped", self.name)

    def stop_copier(self) -> None:
        self.stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the copier to finish; True when it did."""
        t = self._thread
        if t is not None:
            t.join(timeout)
            return not t.is_alive()
        return True

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
