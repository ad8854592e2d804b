"""What every pair shares, local or remote: its durable record, the S-VOL replica (when this
array holds the P-VOL), the copier (a job of the resync engine) and checkpoints through the
committer. The rules of each kind of pair live in its state machine and its subclass:
`vscsi.pair.pair.Pair` (ShadowImage) and `vscsi.remote.pair.RemotePair` (TrueCopy)."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from vscsi.durable.faults import fault_point
from vscsi.pair.copy import PairCopy
from vscsi.pair.persist import PairRecord
from vscsi.pair.replica import Replica
from vscsi.pair.states import Status
from vscsi.pair.volume import GRAIN
from vscsi.resync.engine import Resync
from vscsi.store.fanout import Fanout, Pending
from vscsi.tracker import DirtyMap

if TYPE_CHECKING:
    from vscsi.pair.manager import PairManager
    from vscsi.pair.volume import PairVolume

log = logging.getLogger(__name__)


class Mirror:
    """One pair at run time, whatever its kind. `local` is this array's volume of the pair;
    `replica` reaches the S-VOL when this array holds the P-VOL (None otherwise)."""

    remote = False  # the S-VOL is on a peer array: a mirrored write waits for the link

    def __init__(
        self, rec: PairRecord, manager: PairManager, replica: Replica | None, local: PairVolume
    ) -> None:
        self.rec = rec
        self.manager = manager
        self.replica = replica
        self.local = local
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

    @property
    def p(self) -> PairVolume:
        """The P-VOL, for a copy: copies run on the array that holds it."""
        return self.local

    # -- what each kind of pair decides ---------------------------------------------------

    @property
    def copies_here(self) -> bool:
        """Whether this array runs the pair's copies (it holds the P-VOL)."""
        return True

    def mirrored(self, rec: PairRecord) -> bool:
        """Whether the S-VOL holds writes of this snapshot that a checkpoint must flush."""
        raise NotImplementedError

    def suspend(self, offset: int, length: int, error: BaseException) -> None:
        """The S-VOL failed: keep the range and whatever was left to copy as P changes."""
        raise NotImplementedError

    def takes_updates(self) -> bool:
        """Under the lock: whether a host write on the P-VOL is copied to the S-VOL now."""
        raise NotImplementedError

    def mirrors_plainly(self) -> bool:
        """Whether a host write on the P-VOL is now nothing but the same write on the P-VOL
        and on the S-VOL (PAIR, no copy running): the ring's compiled path may then make
        both itself. A status change away from that takes the P-VOL's gate, which the
        compiled path holds; a failed write is served again by the Python core."""
        return False

    def track(self, offset: int, length: int) -> None:
        """Under the lock: a host write the S-VOL does not take is a P-VOL change."""
        raise NotImplementedError

    def update_failed(self, offset: int, length: int, error: Exception) -> None:
        """An update copy failed; raise to fail the host's write."""
        raise NotImplementedError

    def finish_copy(self) -> bool:
        """Record the end of the copy once its data is durable (see PairCopy.finish)."""
        raise NotImplementedError

    def before_commit(self, rec: PairRecord) -> None:
        """Records this snapshot depends on, made durable before it is committed."""

    # -- host writes on the P side ---------------------------------------------------------

    def start_update(
        self,
        offset: int,
        length: int,
        mirror: Callable[[Replica], None],
        fanout: Fanout,
        beside: bool,
    ) -> Pending | None:
        """A host write or UNMAP is about to change the P-VOL: start its update copy to the
        S-VOL (COPY/PAIR) on `fanout`, beside the P-VOL's write when `beside` (it waits for
        its device), or track it (None). The caller holds the range's region lock and write
        intent, which cover both."""
        with self.lock:
            if not self.takes_updates():
                self.track(offset, length)
                return None
            replica = self.replica
        assert replica is not None
        return fanout.start(functools.partial(mirror, replica), beside)

    def finish_update(self, offset: int, length: int, update: Pending) -> None:
        """The update copy ended: a failure is answered by the pair (`update_failed`)."""
        try:
            update.result()
        except Exception as e:  # any S-side failure, local or the link
            self.update_failed(offset, length, e)

    # -- durable state ----------------------------------------------------------------------

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
            if self.mirrored(rec) and not self.flush_replica():
                self.manager.store.abandon(gen)
                self.save()  # the suspended record, with every mark made so far
                return False
            self.local.base.flush()
            fault_point("pair.checkpoint.flushed")
            self.before_commit(rec)
        except BaseException:
            self.manager.store.abandon(gen)
            raise
        self.manager.store.commit(rec, gen)
        fault_point("pair.checkpoint.committed")
        return True

    def flush_replica(self) -> bool:
        """Flush the S-VOL; on a failure the pair suspends with what the failure may have lost
        counted as changed (`lost_by_flush`)."""
        if self.replica is None:
            return True
        try:
            self.replica.flush()
        except Exception as e:
            self.suspend(0, self.lost_by_flush(e), e)
            return False
        return True

    def lost_by_flush(self, error: BaseException) -> int:
        """Bytes from offset 0 a failed S-VOL flush may have lost: any write since the last
        flush, so the whole volume (resync copies everything)."""
        return self.local.size

    def progress(self) -> int:
        """Percent copied while copying; otherwise percent identical (as CCI shows a split)."""
        rec = self.rec
        left = self.remaining()
        if left is not None:
            total = rec.copy_total
            return (
                100 if not total else max(0, min(100, 100 * (total - left.dirty_bytes()) // total))
            )
        changed = DirtyMap(self.local.size, GRAIN)
        for m in (rec.pdiff, rec.sdiff):
            if m is not None:
                changed |= m
        return 100 - 100 * changed.dirty_bytes() // self.local.size

    def secondary_written(self, offset: int, length: int) -> None:
        with self.lock:
            assert self.rec.sdiff is not None
            self.rec.sdiff.mark(offset, length)

    # -- the copier ----------------------------------------------------------------------------

    def start_copier(self, restore: bool = False) -> None:
        """Run the copy (P -> S, or S -> P for a `restore`) through the resync engine in the
        background."""
        m = self.manager
        self.stopping = threading.Event()
        self.copy = PairCopy(self, restore=restore)
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
