"""Local pairs (ShadowImage-style): the volume the host sees, the copier, and the manager.

The P-VOL mirrors to its S-VOLs only through the `Replica` protocol, so a remote link
(TrueCopy) can replace `LocalReplica` later without touching the state machine.
"""

from __future__ import annotations

import logging
import mmap
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Protocol

from vscsi.durable.committer import Committer
from vscsi.durable.faults import fault_point
from vscsi.pair.persist import PairRecord, PairStore
from vscsi.pair.states import (
    Access,
    Event,
    PairError,
    Role,
    Status,
    access,
    copying,
    next_status,
)
from vscsi.pair.vpd import PAGE_CODE, SlotInfo, build_page
from vscsi.resync.pace import Pace
from vscsi.scsi.identity import Identity
from vscsi.store.base import Extent, NotReadyError, Volume, VolumeError, WriteProtectedError
from vscsi.store.locks import RegionLocks, WriteGate
from vscsi.tracker import DirtyMap, InvalidLogError, WriteIntentLog
from vscsi.tracker.wil import LogFile

log = logging.getLogger(__name__)

GRAIN = 65536
WIL_REGION = 1 << 20  # fixed, so a restart with another copy chunk still reads the log
MUS = 3
ZERO_CHUNK = 1 << 20  # zeroes written per call for an UNMAP an S-VOL cannot deallocate
# NOT READY causes (SPC-4 additional sense codes), see docs/pairs.md:
RESTORE_IN_PROGRESS = (0x04, 0x07)  # LOGICAL UNIT NOT READY, OPERATION IN PROGRESS
SUSPENDED_BY_ERROR = (0x04, 0x03)  # LOGICAL UNIT NOT READY, MANUAL INTERVENTION REQUIRED

PAIR_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}$")

ChangeHook = Callable[[str], None]
DIVERGING = frozenset({Event.SECONDARY_ERROR, Event.RECOVER})  # S may now differ from P


class Replica(Protocol):
    """How the P-VOL side reaches an S-VOL: local now, a remote link later."""

    @property
    def size(self) -> int: ...

    def readinto(self, offset: int, bufs: Sequence[memoryview]) -> None: ...

    def write(self, offset: int, bufs: Sequence[memoryview], fua: bool = False) -> None: ...

    def flush(self) -> None: ...

    def unmap(self, offset: int, length: int) -> None:
        """Make the range read as zeroes (the P-VOL advertises LBPRZ=1)."""
        ...


class LocalReplica:
    """An S-VOL in this process: its backstore, below the host-facing wrapper."""

    def __init__(self, volume: Volume) -> None:
        self.volume = volume

    @property
    def size(self) -> int:
        return self.volume.size

    def readinto(self, offset: int, bufs: Sequence[memoryview]) -> None:
        self.volume.readinto(offset, bufs)

    def write(self, offset: int, bufs: Sequence[memoryview], fua: bool = False) -> None:
        self.volume.write(offset, bufs, fua)

    def flush(self) -> None:
        self.volume.flush()

    def unmap(self, offset: int, length: int) -> None:
        """Deallocate when the S-VOL can; otherwise write the zeroes a deallocated range reads."""
        if self.volume.supports_unmap:
            self.volume.unmap(offset, length)
            return
        zeroes = memoryview(bytes(min(length, ZERO_CHUNK)))
        end = offset + length
        while offset < end:
            n = min(end - offset, len(zeroes))
            self.volume.write(offset, [zeroes[:n]])
            offset += n


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
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.inflight: tuple[int, int] | None = None  # the chunk the copier claimed
        self.copied = 0  # bytes the running copy copied in this process (pairdisplay --json)
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
        """The record with the chunk being copied still counted as to copy."""
        with self.lock:
            return replace(self.rec, pending=self.remaining())

    def remaining(self) -> DirtyMap | None:
        """Grains still to copy, the claimed chunk in flight included."""
        with self.lock:
            if self.rec.pending is None:
                return None
            left = self.rec.pending.copy()
            if self.inflight is not None:
                left.mark(*self.inflight)
            return left

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
            self._stop.set()
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
            self.p.base.readinto(offset, bufs)
            left = self.remaining()
            if left is None:  # the restore ended: the P-VOL is whole
                return
            end = offset + length
            for start, n in left.extents(offset - offset % GRAIN, end):
                lo, hi = max(start, offset), min(start + n, end)
                if lo < hi:
                    self.replica.readinto(lo, _window(bufs, lo - offset, hi - lo))

    # -- the copier ----------------------------------------------------------------------------

    def start_copier(self) -> None:
        self._stop = threading.Event()
        self.copied = 0
        self._thread = threading.Thread(
            target=self._copy_loop, name=f"pair-copy-{self.name}", daemon=True
        )
        self._thread.start()

    def stop_copier(self) -> None:
        self._stop.set()
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

    def _copy_loop(self) -> None:
        """Copy until done, stopped or suspended. A record that cannot be written does not stop
        the copy: it is logged and retried (the durable record stays behind: the safe side)."""
        try:
            while self.copy_pending():
                try:
                    if self._finish():
                        return
                except (OSError, VolumeError) as e:
                    log.warning("pair %s: copy end not recorded, retrying: %s", self.name, e)
                    self._stop.wait(self.manager.checkpoint_interval)
        except Exception:  # a P-VOL failure: the copy stays pending and resumes on restart
            log.exception("pair %s: copy stopped", self.name)

    def copy_pending(self) -> bool:
        """Claim the next grains still to copy, copy them under their region lock (a racing
        host write waits, then lands after: the host's data wins), checkpoint every so often.
        True when nothing is left; False when stopped or suspended."""
        rec, m = self.rec, self.manager
        since_checkpoint = 0
        next_checkpoint = time.monotonic() + m.checkpoint_interval
        pace = Pace(m.copy_rate)
        while not self._stop.is_set():
            with self.lock:
                assert rec.pending is not None
                ext = self.inflight = rec.pending.claim(rec.fence, m.chunk)
            if ext is None:
                if rec.fence == 0:
                    return True
                rec.fence = 0  # a second pass picks up anything marked behind the fence
                continue
            offset, length = ext
            if not self._copy_chunk(offset, length):
                return False
            with self.lock:
                self.inflight = None
                rec.fence = offset + length
            self.copied += length
            since_checkpoint += length
            pace.after(length, self._stop)
            if since_checkpoint >= m.checkpoint_bytes or time.monotonic() >= next_checkpoint:
                if not self._copier_checkpoint():
                    return False
                since_checkpoint = 0
                next_checkpoint = time.monotonic() + m.checkpoint_interval
        return False

    def _copier_checkpoint(self) -> bool:
        """A checkpoint that cannot be written is retried at the next one; the copy goes on.
        False only when the pair suspended."""
        try:
            return self.checkpoint()
        except (OSError, VolumeError) as e:
            log.warning("pair %s: checkpoint failed, retrying at the next one: %s", self.name, e)
            return True

    def _copy_chunk(self, offset: int, length: int) -> bool:
        buf = memoryview(mmap.mmap(-1, length))  # page aligned: block devices take O_DIRECT
        with self.p.regions.hold(offset, length):
            try:
                if self.rec.status is Status.RCPY:
                    self.replica.readinto(offset, [buf])
                    self.p.base.write(offset, [buf])
                    self.manager.restored(self, offset, length)
                else:
                    self.p.base.readinto(offset, [buf])
                    self.replica.write(offset, [buf])
            except Exception as e:
                self.suspend(offset, length, e)
                return False
        return True

    def _finish(self) -> bool:
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


def _window(bufs: Sequence[memoryview], start: int, length: int) -> list[memoryview]:
    """The part [start, start+length) of a scatter list, as views into it."""
    out = []
    for b in bufs:
        n = len(b)
        if start < n and length > 0:
            piece = b[start : start + length]
            out.append(piece)
            length -= len(piece)
        start = max(start - n, 0)
    return out


class PairVolume:
    """The host's view of a managed volume in any role: simplex passes through, a P-VOL
    mirrors or tracks, an S-VOL enforces the access its pair status allows and tracks its own
    changes when split read/write. Stack it as the LUN's volume."""

    def __init__(self, base: Volume, manager: PairManager) -> None:
        self.base = base
        self.manager = manager
        self.gate = WriteGate()
        self.regions = RegionLocks(manager.chunk)
        self.wil = WriteIntentLog(
            manager.store.wil_path(base.name),
            base.size,
            region=WIL_REGION,
            grain=GRAIN,
            idle_delay=manager.wil_idle,
            before_clear=lambda: manager.checkpoint_volume(base.name),
            file=None if manager.wil_file is None else manager.wil_file(base.name),
            background=manager.wil_file is None,
        )

    # -- Volume attributes -----------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.base.name

    @property
    def block_size(self) -> int:
        return self.base.block_size

    @property
    def write_cache(self) -> bool:
        return self.base.write_cache

    @write_cache.setter
    def write_cache(self, value: bool) -> None:
        self.base.write_cache = value

    @property
    def size(self) -> int:
        return self.base.size

    @property
    def supports_unmap(self) -> bool:
        """The backstore's answer, for the life of the LUN: paired or not (a host reads
        LBPME once); a paired UNMAP is mirrored or tracked like a write."""
        return self.base.supports_unmap

    @property
    def read_only(self) -> bool:
        return self.base.read_only or self.access() is Access.READ_ONLY

    def access(self) -> Access:
        return self.manager.access(self.name)

    # -- I/O ------------------------------------------------------------------------------------

    def check_ready(self) -> None:
        """TEST UNIT READY: only an S-VOL of a suspended pair (no access) is not ready."""
        if self.access() is Access.NO_ACCESS:
            raise NotReadyError(f"{self.name}: S-VOL of a suspended pair", *SUSPENDED_BY_ERROR)

    def readinto(self, offset: int, bufs: Sequence[memoryview]) -> None:
        self.check_ready()
        primaries, _ = self.manager.roles(self.name)
        for pair in primaries:
            if pair.status is Status.RCPY:
                pair.read_restoring(offset, bufs)
                return
        self.base.readinto(offset, bufs)

    def write(self, offset: int, bufs: Sequence[memoryview], fua: bool = False) -> None:
        with self.gate.shared():
            self._check_writable()
            primaries, secondary = self.manager.roles(self.name)
            if not primaries and secondary is None:
                self.base.write(offset, bufs, fua)
                return
            length = sum(len(b) for b in bufs)
            with self._tracked(offset, length):
                self._paired(
                    offset, length, primaries, secondary,
                    lambda: self.base.write(offset, bufs, fua),
                    lambda replica: replica.write(offset, bufs, fua),
                )  # fmt: skip

    def unmap(self, offset: int, length: int) -> None:
        """Deallocate; while paired, the same access rules and mirroring as a write."""
        with self.gate.shared():
            self._check_writable()
            primaries, secondary = self.manager.roles(self.name)
            if not primaries and secondary is None:
                self.base.unmap(offset, length)
                return
            with self._tracked(offset, length):
                self._paired(
                    offset, length, primaries, secondary,
                    lambda: self.base.unmap(offset, length),
                    lambda replica: replica.unmap(offset, length),
                )  # fmt: skip

    @staticmethod
    def _paired(
        offset: int,
        length: int,
        primaries: list[Pair],
        secondary: Pair | None,
        local: Callable[[], None],
        mirror: Callable[[Replica], None],
    ) -> None:
        """Change this volume (`local`), then each pair: mirror or track. When `local` fails
        the command fails, but part of it may be on this volume: the range is tracked too."""
        try:
            local()
        except Exception:
            for pair in primaries:
                pair.primary_failed(offset, length)
            if secondary is not None:
                secondary.secondary_written(offset, length)
            raise
        for pair in primaries:
            pair.primary_written(offset, length, mirror)
        if secondary is not None:
            secondary.secondary_written(offset, length)

    @contextmanager
    def _tracked(self, offset: int, length: int) -> Iterator[None]:
        """Region lock against the copier, and a durable write intent against a crash."""
        with self.regions.hold(offset, length):
            self.wil.begin(offset, length)
            try:
                yield
            finally:
                self.wil.end(offset, length)

    def _check_writable(self) -> None:
        acc = self.access()
        if acc is Access.READ_ONLY:
            raise WriteProtectedError(self.name)
        if acc is Access.NO_WRITES:
            raise NotReadyError(f"{self.name}: restore from S-VOL running", *RESTORE_IN_PROGRESS)
        if acc is Access.NO_ACCESS:
            raise NotReadyError(f"{self.name}: S-VOL of a suspended pair", *SUSPENDED_BY_ERROR)

    def flush(self) -> None:
        self.base.flush()
        primaries, _ = self.manager.roles(self.name)
        for pair in primaries:
            if pair.status in (Status.COPY, Status.PAIR):
                pair.flush_replica()

    def extent_at(self, offset: int) -> Extent:
        return self.base.extent_at(offset)

    def close(self) -> None:
        self.wil.close()
        self.base.close()


class PairManager:
    """Owns every pair of a set of volumes: the operations, durable state, and host views.

    `volumes` are the backstores by name, `identities` their identities; `on_change(volume)`
    runs after every state change of a pair the volume is in (the daemon raises UNIT ATTENTION
    3F/03 INQUIRY DATA HAS CHANGED on its LUN).
    """

    def __init__(
        self,
        state_dir: str,
        volumes: Mapping[str, Volume],
        identities: Mapping[str, Identity],
        *,
        on_change: ChangeHook | None = None,
        replica_factory: Callable[[Volume], Replica] = LocalReplica,
        chunk: int = 1 << 20,
        checkpoint_bytes: int = 64 << 20,
        wil_idle: float = 1.0,
        copy_rate: int = 0,
        checkpoint_interval: float = 1.0,
        committer: Committer | None = None,
        wil_file: Callable[[str], LogFile] | None = None,
    ) -> None:
        self.store = PairStore(state_dir, committer)  # the state dir's committer, if shared
        # a crash-model test's write-intent log file per volume name; their cleaners then run
        # only when the test calls flush_idle, so every run passes the same fault points
        self.wil_file = wil_file
        self.identities = dict(identities)
        self.on_change = on_change
        self.replica_factory = replica_factory
        self.chunk = chunk
        self.checkpoint_bytes = checkpoint_bytes
        self.wil_idle = wil_idle
        self.copy_rate = copy_rate
        self.checkpoint_interval = checkpoint_interval  # a restart loses at most this much copy
        self.lock = threading.RLock()  # serialises operator commands
        self.pairs: dict[str, Pair] = {}
        self._roles: dict[str, tuple[list[Pair], Pair | None]] = {}
        self.volumes = {name: PairVolume(v, self) for name, v in volumes.items()}
        for rec in self.store.load_all():
            self._adopt(rec)
        for pv in self.volumes.values():
            self._recover(pv)
        for pair in self.pairs.values():
            if pair.status in (Status.COPY, Status.RCPY):
                pair.start_copier()

    # -- lookups --------------------------------------------------------------------------------

    def volume(self, name: str) -> PairVolume:
        """The volume to put under the LUN of `name` (every managed volume is wrapped)."""
        try:
            return self.volumes[name]
        except KeyError:
            raise PairError(f"no volume {name!r}: configure it first") from None

    def pair(self, name: str) -> Pair:
        try:
            return self.pairs[name]
        except KeyError:
            raise PairError(f"no pair {name!r}: see pair display") from None

    def pairs_of(self, volume: str) -> list[Pair]:
        return [p for p in self.pairs.values() if volume in (p.rec.pvol, p.rec.svol)]

    def roles(self, volume: str) -> tuple[list[Pair], Pair | None]:
        """(pairs where `volume` is the P-VOL, the pair where it is the S-VOL or None).
        Cached: every host command asks, and pairs come and go only by create and delete."""
        cache = self._roles  # this snapshot: an answer computed before a change lands in it
        cached = cache.get(volume)
        if cached is None:
            prim = [p for p in self.pairs.values() if p.rec.pvol == volume]
            sec = next((p for p in self.pairs.values() if p.rec.svol == volume), None)
            cached = cache[volume] = (prim, sec)
        return cached

    def _pairs_changed(self) -> None:
        """After `self.pairs` changed: a new cache (never clear the old one in place, a
        command may be filling it with an answer from before the change)."""
        self._roles = {}

    def access(self, volume: str) -> Access:
        prim, sec = self.roles(volume)
        if not prim and sec is None:
            return Access.READ_WRITE
        if sec is not None:
            return access(Role.SVOL, sec.status, sec.rec.split_read_only)
        if any(p.status is Status.RCPY for p in prim):
            return Access.NO_WRITES
        return Access.READ_WRITE

    # -- operations ------------------------------------------------------------------------------

    def create(self, name: str, pvol: str, svol: str, mu: int) -> None:
        """SMPL -> COPY: full background copy P -> S, then PAIR."""
        with self.lock:
            p, s = self.volume(pvol), self.volume(svol)
            self._check_create(name, p, s, mu)
            pending = DirtyMap(p.size, GRAIN)
            pending.mark(0, p.size)
            rec = PairRecord(name, pvol, svol, mu, Status.SMPL, generation=0)
            rec.copy_total = p.size
            with p.gate.exclusive(), s.gate.exclusive():
                pair = self._adopt(rec)
                try:
                    self.store.set_note(svol, None)
                    pair.apply(Event.CREATE, create=True, pending=pending)
                except Exception:
                    del self.pairs[name]
                    self._pairs_changed()
                    raise
            pair.start_copier()

    def _check_create(self, name: str, p: PairVolume, s: PairVolume, mu: int) -> None:
        if not PAIR_NAME.match(name):
            raise PairError(f"pair name {name!r} must be 1-32 of A-Z a-z 0-9 _ . - ")
        if name in self.pairs:
            raise PairError(f"pair {name!r} already exists: pick another name or delete it")
        if p is s:
            raise PairError(f"cannot pair {p.name!r} with itself")
        if not 0 <= mu < MUS:
            raise PairError(f"MU#{mu} does not exist: local pairs use MU#0..{MUS - 1}")
        prim, sec = self.roles(p.name)
        if sec is not None:
            raise PairError(f"{p.name!r} is an S-VOL of pair {sec.name!r}: cascades unsupported")
        if any(x.status is Status.RCPY for x in prim):
            raise PairError(f"{p.name!r} is being restored: wait for the restore to end")
        if any(x.rec.mu == mu for x in prim):
            raise PairError(f"MU#{mu} of {p.name!r} is in use: pick a free MU")
        if self.pairs_of(s.name):
            raise PairError(f"{s.name!r} is not simplex: delete its pair first")
        if s.size < p.size or s.block_size != p.block_size:
            raise PairError(
                f"S-VOL {s.name!r} ({s.size} bytes, {s.block_size}-byte blocks) cannot hold "
                f"P-VOL {p.name!r} ({p.size} bytes, {p.block_size}-byte blocks)"
            )
        if s.base.read_only:
            raise PairError(f"S-VOL {s.name!r} is a read-only backstore")

    def split(self, name: str, read_only: bool = False) -> None:
        """PAIR -> PSUS at one instant: writes are quiesced while the status flips."""
        with self.lock:
            pair = self.pair(name)
            next_status(name, pair.status, Event.SPLIT)
            size = pair.p.size
            with self._quiesced(pair):
                pair.replica.flush()
                fault_point("pair.split.flushed")
                pair.apply(
                    Event.SPLIT,
                    split_read_only=read_only,
                    pdiff=DirtyMap(size, GRAIN),
                    sdiff=DirtyMap(size, GRAIN),
                )

    def resync(self, name: str) -> None:
        """PSUS/PSUE -> COPY -> PAIR, copying P -> S only the union of both change maps."""
        self._start_copy(name, Event.RESYNC)

    def restore(self, name: str) -> None:
        """PSUS -> RCPY -> PSUS, copying S -> P only the union of both change maps."""
        self._start_copy(name, Event.RESTORE)

    def _start_copy(self, name: str, event: Event) -> None:
        with self.lock:
            pair = self.pair(name)
            next_status(name, pair.status, event)
            others = [o for o in self.roles(pair.rec.pvol)[0] if o is not pair]
            for other in others:
                if other.status is Status.RCPY or (
                    event is Event.RESTORE and other.status in (Status.COPY, Status.PAIR)
                ):
                    raise PairError(
                        f"cannot {event.value} pair {name!r}: pair {other.name!r} of the same "
                        f"P-VOL is {other.status.value}; split it or wait for its copy"
                    )
            with self._quiesced(pair):
                rec = pair.rec
                pending = rec.pdiff.copy() if rec.pdiff else DirtyMap(pair.p.size, GRAIN)
                if rec.sdiff is not None:
                    pending |= rec.sdiff
                keep = {"pdiff": None, "sdiff": None} if event is Event.RESYNC else {}
                pair.apply(
                    event, pending=pending, fence=0, copy_total=pending.dirty_bytes(), **keep
                )
            pair.start_copier()

    def delete(self, name: str) -> None:
        """Any status -> both SMPL; a copy in progress is abandoned (its target undefined)."""
        with self.lock:
            pair = self.pair(name)
            next_status(name, pair.status, Event.DELETE)
            pair.stop_copier()
            with self._quiesced(pair):
                target = {Status.COPY: pair.rec.svol, Status.RCPY: pair.rec.pvol}.get(pair.status)
                if target is not None:
                    self.store.set_note(target, {"content": "undefined (copy abandoned)"})
                with pair.lock:  # no snapshot of it is stamped after this one
                    pair.deleted = True
                    tombstone = self.store.stamp()
                del self.pairs[name]
                self._pairs_changed()
                self.store.delete(name, tombstone)
                pair.rec.generation += 1
            self.changed(pair.rec.pvol, pair.rec.svol)

    def restored(self, pair: Pair, offset: int, length: int) -> None:
        """A restore rewrote P-VOL grains: the P-VOL's other (split) pairs now differ there."""
        for other in self.roles(pair.rec.pvol)[0]:
            if other is not pair and other.rec.pdiff is not None:
                other.rec.pdiff.mark(offset, length)

    def save_restore_marks(self, pair: Pair) -> None:
        """Make the marks `restored` left on the P-VOL's other pairs durable (before the
        restoring pair's record may claim the grains restored)."""
        for other in self.roles(pair.rec.pvol)[0]:
            if other is not pair:
                other.save()

    def wait(self, name: str, timeout: float | None = None) -> bool:
        """Wait for the pair's copy (COPY/RCPY) to end; True when none is running."""
        return self.pair(name).wait(timeout)

    @contextmanager
    def _quiesced(self, pair: Pair) -> Iterator[None]:
        with pair.p.gate.exclusive(), pair.s.gate.exclusive():
            yield

    # -- display and host view ---------------------------------------------------------------

    def display(self, name: str | None = None) -> list[dict[str, Any]]:
        """pairdisplay as dicts (for --json): one per pair, both sides."""
        pairs = [self.pair(name)] if name is not None else list(self.pairs.values())
        return [self._describe(p) for p in pairs]

    def _describe(self, pair: Pair) -> dict[str, Any]:
        rec = pair.rec
        return {
            "pair": rec.name,
            "mu": rec.mu,
            "status": rec.status.value,
            "progress": pair.progress(),
            "copy_total": rec.copy_total,  # bytes the last create/resync/restore set out to copy
            "copied": pair.copied,  # bytes this daemon process copied
            "generation": rec.generation,
            "split_read_only": rec.split_read_only,
            "pvol": self._side(rec.pvol, Role.PVOL, rec.pdiff),
            "svol": self._side(rec.svol, Role.SVOL, rec.sdiff),
        }

    def _side(self, volume: str, role: Role, diff: DirtyMap | None) -> dict[str, Any]:
        ident = self.identities.get(volume, Identity())
        return {
            "volume": volume,
            "role": role.value,
            "access": self.access(volume).value,
            "changed_bytes": diff.dirty_bytes() if diff is not None else 0,
            **self._identity(ident),
        }

    @staticmethod
    def _identity(ident: Identity) -> dict[str, Any]:
        return {
            "serial": ident.serial,
            "volume_id": ident.volume_id,
            "port": ident.port,
            "vendor": ident.vendor,
            "product": ident.product,
        }

    def display_volume(self, volume: str) -> dict[str, Any]:
        """One volume's role and pairs (SMPL volumes included, with any note such as content
        left undefined by a deleted copy)."""
        self.volume(volume)
        prim, sec = self.roles(volume)
        role = Role.SVOL if sec else Role.PVOL if prim else Role.SMPL
        return {
            "volume": volume,
            "role": role.value,
            "access": self.access(volume).value,
            "pairs": [self._describe(p) for p in ([sec] if sec else prim)],
            **self._identity(self.identities.get(volume, Identity())),
            **self.store.notes().get(volume, {}),
        }

    def vpd_page(self, volume: str) -> bytes:
        """Vendor VPD page 0xC0 of `volume` (whole page, header included)."""
        ident = self.identities.get(volume, Identity())
        prim, sec = self.roles(volume)
        slots: dict[int, SlotInfo] = {}
        for pair in [sec] if sec else prim:
            rec = pair.rec
            partner = rec.svol if rec.pvol == volume else rec.pvol
            pid = self.identities.get(partner, Identity())
            slots[rec.mu] = SlotInfo(
                Role.SVOL if sec else Role.PVOL,
                rec.status,
                pair.progress(),
                pid.serial,
                pid.volume_id,
                rec.generation,
                rec.split_read_only,
            )
        return build_page(ident.serial, ident.volume_id, ident.port, slots)

    def vendor_pages(self, volume: str) -> dict[int, Callable[[], bytes]]:
        """For `Lun(..., vendor_pages=manager.vendor_pages(name))`."""
        return {PAGE_CODE: lambda: self.vpd_page(volume)}

    # -- durability ----------------------------------------------------------------------------

    def changed(self, *volumes: str) -> None:
        if self.on_change is None:
            return
        for v in volumes:
            try:
                self.on_change(v)
            except Exception:
                log.exception("on_change hook failed for %s", v)

    def checkpoint_volume(self, volume: str) -> None:
        """Before the write-intent log forgets a region: every pair record of the volume is
        made durable from a snapshot taken now, or this raises (the log then keeps it)."""
        for pair in self.pairs_of(volume):
            try:
                pair.checkpoint()
            except (OSError, VolumeError) as e:
                log.warning("pair %s: checkpoint failed: %s", pair.name, e)
                raise

    def _adopt(self, rec: PairRecord) -> Pair:
        p, s = self.volume(rec.pvol), self.volume(rec.svol)
        pair = Pair(rec, self, self.replica_factory(s.base), p, s)
        self.pairs[rec.name] = pair
        self._pairs_changed()
        return pair

    def _recover(self, pv: PairVolume) -> None:
        """After a crash: regions with writes that may have been in flight count as changed
        (or still to copy) in every pair of the volume — the safe direction."""
        try:
            regions = pv.wil.recover()
        except InvalidLogError:  # lost: if paired, every region may differ
            regions = DirtyMap(pv.size, GRAIN)
            if self.pairs_of(pv.name):
                regions.mark(0, pv.size)
        if regions.count():
            prim, sec = self.roles(pv.name)
            for pair in prim:
                self._recover_primary(pair, regions)
            if sec is not None and sec.rec.sdiff is not None:
                sec.rec.sdiff |= regions
                sec.save()
        pv.wil.mark_clean()

    def _recover_primary(self, pair: Pair, regions: DirtyMap) -> None:
        rec = pair.rec
        if rec.status is Status.PAIR:  # in flight on P, maybe not on S: copy them again
            pending = regions.copy()  # in the background: COPY until done (docs/pairs.md)
            pair.apply(Event.RECOVER, pending=pending, fence=0, copy_total=pending.dirty_bytes())
            return
        if copying(rec.status) and rec.pending is not None:
            if rec.status is Status.RCPY:
                # the change maps are in the restore already; outside them P held writes
                # mirrored before the split that its cache may have lost (the split flushes
                # only S): S has them, and the restore's end declares P == S
                regions = regions.copy()  # the volume's other pairs get all of it
                for changed in (rec.pdiff, rec.sdiff):
                    if changed is not None:
                        regions -= changed
            rec.pending |= regions
            rec.fence = 0
        elif rec.pdiff is not None:
            rec.pdiff |= regions
        pair.save()

    def close(self) -> None:
        """Clean stop, in an order where nothing is closed while something may still need it:
        stop the copiers, then the write-intent logs (their last clear checkpoints against
        volumes all still open), then a final checkpoint of every pair (a later start resumes
        a copy from it), and only then close the volumes."""
        with self.lock:
            for pair in self.pairs.values():
                pair.stop_copier()
            for pv in self.volumes.values():
                try:
                    pv.wil.close()
                except Exception as e:  # its regions stay marked: the next start recovers them
                    log.error("%s: write-intent log not cleared: %s", pv.name, e)
            for pair in self.pairs.values():
                try:
                    pair.checkpoint()
                except (OSError, VolumeError) as e:  # the last durable record stands
                    log.error("pair %s: final checkpoint failed: %s", pair.name, e)
            for pv in self.volumes.values():
                pv.base.close()
