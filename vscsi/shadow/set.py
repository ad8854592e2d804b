"""`ShadowSet`: one virtual unit over several member volumes, kept identical (OpenVMS Volume
Shadowing). It is a `Volume`, so a LUN can serve it and a pair can mirror it.

Host writes go to every full member and every copy target, side by side (`Fanout`), and are
acknowledged when all have them; reads come from one full member (round-robin, or always the
master: the read policy), never from a copy target. One worker thread runs the head of the
state machine's queue (copy, minicopy, merge, minimerge: `jobs.py`) through the resync engine
(`vscsi.resync.engine`), a chunk at a time under the chunk's region lock, so a host write to
that region waits and lands after it: stale copy data never overwrites a host write. Where
every volume involved has a hole (all zeroes), a merge or copy skips it without reading, so a
sparse set is merged in the time its data takes. While a merge is pending, a host read of a
region not yet merged merges that region first, so the host never gets two answers for a block.

Lock order, outermost first: the write gate, region locks, the state lock.

Durable state outside the members goes through the state directory's `Committer`: the set's
generation (kind `shadow-set`, keyed by set id), so a mount from stale members alone is refused,
and the minicopy bitmaps saved at a clean dismount (kind `shadow-map`).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import itertools
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vscsi.durable.committer import Committer
from vscsi.durable.faults import fault_point
from vscsi.resync.engine import Resync, Settings
from vscsi.shadow.control import (
    AREA,
    MAX_MEMBERS,
    ControlBlock,
    ControlBlockError,
    new_id,
    newest,
    read_block,
    virtual_size,
    write_block,
)
from vscsi.shadow.jobs import ShadowJob, merge_range
from vscsi.shadow.states import (
    Event,
    MemberState,
    Operation,
    OpKind,
    SetState,
    ShadowError,
    apply,
)
from vscsi.store.base import Extent, MediumError, NotReadyError, Volume, VolumeError
from vscsi.store.fanout import DEFAULT_WORKERS, Fanout, waits
from vscsi.store.locks import Guards, RegionLocks, WriteGate
from vscsi.tracker import DirtyMap, WriteIntentLog
from vscsi.tracker.wil import LogFile

log = logging.getLogger(__name__)

IN_SET = (MemberState.FULL, MemberState.COPY_TARGET)
ReadPolicy = Literal["balanced", "master"]
READ_POLICIES: tuple[ReadPolicy, ...] = ("balanced", "master")
KIND = "shadow-set"  # committer kind of a set's recorded generation, keyed by set id
MAP_KIND = "shadow-map"  # committer kind of a removed member's bitmap: "<set id>.<member id>"


def default_committer(state_dir: str | os.PathLike[str]) -> Committer:
    """The committer of `state_dir/durable` (one per directory in this process)."""
    return Committer.at(Path(state_dir) / "durable")


@dataclass(frozen=True, slots=True)
class Tuning:
    """Sizes of the set's machinery. `grain` is the tracking unit of bitmaps and merges,
    `chunk` what the worker moves under one region lock, `log_region` the write-intent log's
    unit (fixed for a set: a log of another geometry is invalid)."""

    grain: int = 65536
    chunk: int = 1 << 20
    log_region: int = 1 << 20
    log_idle: float = 1.0
    checkpoint_bytes: int = 64 << 20
    copy_rate: int = 0  # bytes/s written by copies (the daemon's copy_rate); 0 = unlimited
    writers: int = DEFAULT_WORKERS  # threads writing the other members of a host write; 0: in turn


@dataclass(slots=True)
class Stats:
    """What the worker and the read path did since open, for status and tests."""

    copied: int = 0  # bytes written (or holes punched) on copy targets by copies, minicopies
    copy_skipped: int = 0  # bytes a copy left alone: a hole on the source and on the target
    merge_scanned: int = 0  # bytes compared by merges and minimerges
    merge_skipped: int = 0  # bytes a merge did not read: a hole on every member
    merge_written: int = 0  # bytes rewritten on a member because it differed
    read_repairs: int = 0  # blocks rewritten on a member after it failed a read
    finished: list[tuple[OpKind, str | None]] = field(default_factory=list)


@dataclass(slots=True)
class Member:
    """A member at run time. `bitmap` (REMOVED members) holds the grains written since it
    left; `volume` is None for a member that was not present at mount."""

    id: str
    volume: Volume | None
    label: str  # the volume's name when last seen, for show()
    bitmap: DirtyMap | None = None

    @property
    def name(self) -> str:
        return self.volume.name if self.volume is not None else self.label


@dataclass(slots=True)
class Work:
    """An operation's grains still to do (cleared as chunks finish) and its size at start."""

    pending: DirtyMap
    total: int

    def percent(self) -> int:
        if not self.total:
            return 100
        return max(0, min(100, 100 * (self.total - self.pending.dirty_bytes()) // self.total))


class ShadowSet:
    """A shadow set's virtual unit. Build it with `create` or `open`; it owns the member
    volumes given to it and closes them in `close`."""

    def __init__(
        self,
        name: str,
        block: ControlBlock,
        members: dict[str, Volume],
        others: Sequence[tuple[str | None, Volume]],
        *,
        state_dir: str | os.PathLike[str],
        wil: bool,
        tuning: Tuning,
        read_policy: str,
        committer: Committer | None,
        opened_at: int,
        wil_file: Callable[[], LogFile] | None = None,
    ) -> None:
        if read_policy not in READ_POLICIES:
            raise ShadowError(
                f"shadow set {name!r}: read_policy must be 'balanced' or 'master', "
                f"not {read_policy!r}"
            )
        self.name = name
        self.read_policy = read_policy
        self.block_size = block.block_size
        self.tuning = tuning
        self.stats = Stats()
        self._block = block
        self._committer = committer or default_committer(state_dir)
        # generations above this one on a member were written by this mount (see `_written`)
        # or by a history it never saw
        self._opened_at = opened_at
        self._written: dict[str, int] = {}  # member id -> last generation this mount wrote
        labels = {mid: v.name for mid, v in [*others, *members.items()] if mid is not None}
        self._members = {
            mid: Member(mid, members.get(mid), labels.get(mid, mid)) for mid in block.state.members
        }
        # volumes given to open() that are not members; show() lists those the set has no
        # entry for as stale
        self._stale = [v.name for mid, v in others if mid not in self._members]
        self._others = [v for _, v in others]  # volumes outside the set: closed at close()
        self._dir = Path(state_dir) / block.set_id.hex()
        self._dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._gate = WriteGate()
        self._regions = RegionLocks(tuning.chunk)
        self._fanout = Fanout(f"shadow-{name}", tuning.writers)  # members written side by side
        self._rr = itertools.count()
        self._work: dict[int, Work] = {}
        self._stopping = threading.Event()  # the worker stops (dismount)
        self._settings = Settings(
            chunk=tuning.chunk,
            grain=tuning.grain,
            copy_rate=tuning.copy_rate,
            checkpoint_bytes=tuning.checkpoint_bytes,
        )
        # host writes not yet covered by a flush of every member: a member that fails may have
        # lost them from its cache, so they go into its bitmap (see `_failed`); `_flushing`
        # holds what each flush in progress will vouch for once it succeeds
        self._unflushed = DirtyMap(block.size, tuning.grain)
        self._flushing: list[DirtyMap] = []
        self._mounted = True
        self._wil = self._open_log(wil_file) if wil else None
        self.log_valid = self._log_valid()
        self._write_cache = all(v.write_cache for v in members.values())
        self._mount()
        self._worker = threading.Thread(target=self._run, name=f"shadow-{name}", daemon=True)
        self._worker.start()

    # -- assembling -------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        name: str,
        volumes: Sequence[Volume],
        *,
        state_dir: str | os.PathLike[str],
        wil: bool = True,
        block_size: int | None = None,
        tuning: Tuning | None = None,
        read_policy: ReadPolicy = "balanced",
        committer: Committer | None = None,
        wil_file: Callable[[], LogFile] | None = None,
    ) -> ShadowSet:
        """A new set whose content is the first volume's; the others are mounted into it and
        receive a copy (row 1). `committer` defaults to `default_committer(state_dir)`;
        `wil_file` is a crash-model test's log file (see `_open_log`)."""
        if not volumes:
            raise ShadowError(f"shadow set {name!r} needs at least one member")
        first, *rest = volumes
        bs = block_size or first.block_size
        mid = new_id().hex()
        state = SetState(members={mid: MemberState.FULL})
        block = ControlBlock(new_id(), 0, True, bs, virtual_size(volumes, bs), 0, state)
        shadow = cls(
            name,
            block,
            {mid: first},
            (),
            state_dir=state_dir,
            wil=wil,
            tuning=tuning or Tuning(),
            read_policy=read_policy,
            committer=committer,
            opened_at=0,
            wil_file=wil_file,
        )
        for v in rest:
            shadow.add(v)
        return shadow

    @classmethod
    def open(
        cls,
        name: str,
        volumes: Sequence[Volume],
        *,
        state_dir: str | os.PathLike[str],
        wil: bool = True,
        tuning: Tuning | None = None,
        read_policy: ReadPolicy = "balanced",
        committer: Committer | None = None,
        force: bool = False,
        wil_file: Callable[[], LogFile] | None = None,
    ) -> ShadowSet:
        """Assemble a set from its members: the highest valid generation is the truth; a
        volume that carries an older one (or none) is stale and not a member. A set that was
        not dismounted cleanly is merged (minimerge when the log is valid).

        The truth must not be older than the generation recorded in the state directory: then
        a member holding acknowledged writes is missing, and the mount is refused unless
        `force` (the operator accepts losing those writes; the set then continues above the
        recorded generation, so the missing member, added back later, receives a full copy)."""
        committer = committer or default_committer(state_dir)
        found: list[tuple[ControlBlock, bytes]] = []
        readable: list[Volume] = []
        others: list[tuple[str | None, Volume]] = []
        for v in volumes:
            try:
                found.append(read_block(v))
                readable.append(v)
            except ControlBlockError:
                others.append((None, v))
        if not found:
            raise ShadowError(f"shadow set {name!r}: no volume carries a control block")
        try:
            truth = newest(found)
        except ControlBlockError as e:
            raise ShadowError(f"shadow set {name!r}: {e}") from None
        recorded = _recorded(committer, truth.set_id)
        if truth.generation < recorded and not force:
            raise ShadowError(
                f"shadow set {name!r}: the members given carry generation {truth.generation} "
                f"but generation {recorded} was recorded: a newer member is missing; give it, "
                f"or mount with force to lose the writes only it holds"
            )
        members: dict[str, Volume] = {}
        for (blk, self_id), v in zip(found, readable, strict=True):
            mid = self_id.hex()
            current = blk.generation == truth.generation
            if current and truth.state.members.get(mid) in IN_SET:
                members[mid] = v
            else:
                others.append((mid, v))
        if recorded > truth.generation:
            log.warning("shadow set %s: forced mount at generation %d below the recorded %d",
                        name, truth.generation, recorded)  # fmt: skip
            # a member may be one generation above the record (see `_commit`): go past it,
            # so that member is never again taken for the newer one
            truth.generation = recorded + 1
        return cls(
            name,
            truth,
            members,
            others,
            state_dir=state_dir,
            wil=wil,
            tuning=tuning or Tuning(),
            read_policy=read_policy,
            committer=committer,
            opened_at=truth.generation,
            wil_file=wil_file,
        )

    def _open_log(self, file: Callable[[], LogFile] | None) -> WriteIntentLog:
        """The log in the state directory, or in `file()`: a crash-model test's fake, whose
        cleaner then runs only when the test calls `flush_idle`, so every run of a scenario
        passes the same fault points."""
        t = self.tuning
        return WriteIntentLog(
            str(self._dir / "intent.wil"),
            self.size,
            region=t.log_region,
            grain=t.grain,
            idle_delay=t.log_idle,
            before_clear=self.flush,
            file=None if file is None else file(),
            background=file is None,
        )

    def _log_valid(self) -> bool:
        """The log is the one the last mount kept: valid, and exactly one open later."""
        blk, wil = self._block, self._wil
        if wil is None or not wil.valid or not blk.log_generation:
            return False
        return wil.generation == blk.log_generation + 1

    def _mount(self) -> None:
        """Apply what the control block says happened, then record the mount (not clean)."""
        blk, state = self._block, self._block.state
        self._load_bitmaps(blk.clean)
        if not blk.clean:
            self._apply(Event.SYSTEM_FAILURE, self.log_valid)
        elif not self.log_valid:
            self._apply(Event.LOG_LOST)
        self._drop_absent()
        for op in state.queue:
            self._work[op.seq] = self._plan(op)
        if self._wil is not None and state.merge_op() is not None:
            self._wil.hold()  # the log's entries are the merge's to-do list until it ends
        blk.log_generation = self._wil.generation if self._wil is not None else 0
        self._commit()

    def _load_bitmaps(self, clean: bool) -> None:
        """Minicopy bitmaps saved at the last clean dismount; after a crash they miss writes,
        so they are dropped (those members get a full copy). Each is deleted once read: the
        mount's own commit marks the set not clean, and a bitmap must never outlive that."""
        prefix = f"{self._block.set_id.hex()}."
        for key, payload in self._committer.items(MAP_KIND).items():
            mid = key.removeprefix(prefix)
            if mid == key:
                continue
            m = self._members.get(mid)
            if clean and m is not None and self._block.state.members[mid] is MemberState.REMOVED:
                with contextlib.suppress(ValueError, TypeError):
                    m.bitmap = DirtyMap.from_bytes(base64.b64decode(payload, validate=True))
            self._committer.delete(MAP_KIND, key)

    def _drop_absent(self) -> None:
        """Members the control block lists but that were not given (or are stale): a missing
        full member leaves the set, its changes tracked from now on; a missing copy target's
        copy is abandoned."""
        state = self._block.state
        for m in list(self._members.values()):
            st = state.members[m.id]
            if m.volume is not None or st not in IN_SET:
                continue
            if st is MemberState.COPY_TARGET:
                self._apply(Event.COPY_TARGET_FAILED, m.id)
            elif not self._apply(Event.MEMBER_FAILED, m.id):
                raise ShadowError(f"shadow set {self.name!r}: no full member is present")
            else:
                m.bitmap = self._new_bitmap(everything=not self._block.clean)

    def _plan(self, op: Operation) -> Work:
        """The grains an operation still has to do."""
        size = self.size
        pending = DirtyMap(size, self.tuning.grain)
        if op.kind is OpKind.MINIMERGE:
            assert self._wil is not None
            pending |= self._wil.recover()
            return Work(pending, pending.dirty_bytes())
        if op.kind is OpKind.MINICOPY:
            member = self._members[op.target] if op.target else None
            if member is not None and member.bitmap is not None:
                pending |= member.bitmap
                return Work(pending, pending.dirty_bytes())
            op.kind = OpKind.COPY  # no bitmap vouches for anything: a full copy
        pending.mark(op.fence, size - op.fence)
        return Work(pending, size)

    def _new_bitmap(self, everything: bool = False) -> DirtyMap:
        bitmap = DirtyMap(self.size, self.tuning.grain)
        if everything:
            bitmap.mark(0, self.size)
        return bitmap

    # -- state changes ------------------------------------------------------------------------

    @property
    def state(self) -> SetState:
        return self._block.state

    @property
    def generation(self) -> int:
        return self._block.generation

    def _apply(self, event: Event, *args: Any) -> Any:
        with self._lock:
            result = apply(self._block.state, event, *args)
            for seq in set(self._work) - {op.seq for op in self.state.queue}:
                del self._work[seq]
            self._cond.notify_all()
        log.info("shadow set %s: %s %s", self.name, event.value, " ".join(map(str, args)))
        return result

    def _commit(self, clean: bool = False) -> None:
        """Write the next generation to every member in the set, then record it in the state
        directory. A member that cannot take it leaves the set (its older generation marks it
        stale) and the others get a new one.

        Members first, the record after: a crash between them leaves the record one generation
        behind the newest members, which a mount accepts (it refuses only members *below* the
        record), and no stale member can pass either, because nothing is acknowledged to the
        host on the strength of a generation until `_commit` returns, record included. A member
        that left at generation G+1 holds at most G; every write it misses comes after G+1 was
        recorded, so a mount from it alone is refused. (Record first would refuse the newest
        members after a crash between the two, and tolerating that lag would admit a member
        that is exactly one generation stale.) Each attempt of the loop is recorded, so no
        member is ever more than one generation above the record."""
        with self._lock:
            while True:
                self._block.generation += 1
                self._block.clean = clean
                failed = []
                for m in self._in_set():
                    assert m.volume is not None
                    try:
                        write_block(m.volume, self._block, bytes.fromhex(m.id))
                        self._written[m.id] = self._block.generation
                    except VolumeError as e:
                        failed.append((m, e))
                    fault_point("shadow.block.written")
                fault_point("shadow.record.before")
                self._committer.save(KIND, self._block.set_id.hex(), {
                    "name": self.name, "generation": self._block.generation,
                })  # fmt: skip
                fault_point("shadow.record.after")
                if not failed:
                    return
                error = self._failed(failed, 0, 0)
                if error is not None:
                    raise error

    def _failed(
        self, failed: Sequence[tuple[Member, VolumeError]], offset: int, length: int | None
    ) -> VolumeError | None:
        """Members that failed an I/O of [offset, offset+length) leave the set: a full member
        with its bitmap started (the range marked; everything when `length` is None), a copy
        target with its copy abandoned. Returns the error to give the host when the last full
        member failed. The caller commits.

        A member another thread removed meanwhile (the I/O chose its targets before) gets the
        range added to its bitmap here: the I/O did not reach it, and its minicopy must copy
        it. A member removed while a merge is pending may differ anywhere the merge has not
        reached, so its bitmap covers everything. Host writes it took since the last flush
        of every member may be lost from its cache: they are in its bitmap too."""
        error = None
        with self._lock:
            for m, e in failed:
                st = self.state.members.get(m.id)
                if st is MemberState.COPY_TARGET:
                    self._apply(Event.COPY_TARGET_FAILED, m.id)
                elif st is MemberState.FULL and self._apply(Event.MEMBER_FAILED, m.id):
                    log.warning("shadow set %s: %s removed: %s", self.name, m.name, e)
                    merging = self.state.merge_op() is not None
                    m.bitmap = self._new_bitmap(everything=length is None or merging)
                    m.bitmap.mark(offset, length or 0)
                    for unflushed in (self._unflushed, *self._flushing):
                        m.bitmap |= unflushed
                elif st is MemberState.FULL:
                    error = e
                elif st is MemberState.REMOVED and m.bitmap is not None:
                    m.bitmap.mark(offset, self.size - offset if length is None else length)
        return error

    def _fail_and_commit(
        self, failed: Sequence[tuple[Member, VolumeError]], offset: int, length: int | None
    ) -> None:
        """`_failed`, the new membership made durable, and the last member's error raised.

        One step under the state lock: a host write that chose its targets from the new
        membership (without the member that left) must not be acknowledged before that
        membership is durable and recorded, or a crash would leave the member that missed the
        write current on disk."""
        if not failed:
            return
        with self._lock:
            error = self._failed(failed, offset, length)
            self._commit()
        if error is not None:
            raise error

    # -- members ------------------------------------------------------------------------------

    def _in_set(self) -> list[Member]:
        """Members that receive host writes: full members and copy targets. Under the state
        lock: `add` enters a member in the state before its volume is attached."""
        with self._lock:
            members = self._members
            return [
                members[mid]
                for mid, st in self.state.members.items()
                if st in IN_SET and mid in members
            ]

    def _full(self) -> list[Member]:
        return [self._members[mid] for mid in self.state.full_members()]

    def _read_order(self) -> list[Member]:
        """Full members in the order to try them: from the next one round-robin ("balanced"),
        or in membership order, the master first ("master": predictable, and reads stay off a
        slower member)."""
        full = self._full()
        if self.read_policy == "master":
            return full
        start = next(self._rr) % len(full)
        return full[start:] + full[:start]

    def _find(self, name: str) -> Member:
        for m in self._members.values():
            if m.name == name and self.state.members[m.id] in (*IN_SET, MemberState.REMOVED):
                return m
        raise ShadowError(f"{name!r} is not a member of shadow set {self.name!r}")

    def _identify(self, volume: Volume) -> str:
        """The member id `volume` had in this set, or a new one."""
        with contextlib.suppress(ControlBlockError):
            blk, self_id = read_block(volume)
            if blk.set_id == self._block.set_id and self_id.hex() in self.state.members:
                return self_id.hex()
        return new_id().hex()

    # -- operations ------------------------------------------------------------------------

    def add(self, volume: Volume) -> None:
        """Mount `volume` into the set: a copy (a minicopy when it left with the minicopy
        policy and its bitmap is valid), queued as the state machine orders it."""
        if volume.block_size != self.block_size or volume.size - AREA < self.size:
            raise ShadowError(
                f"{volume.name} ({volume.size} bytes, {volume.block_size}-byte blocks) cannot "
                f"hold shadow set {self.name!r} ({self.size} bytes, {self.block_size}-byte blocks)"
            )
        self._refuse_newer(volume)
        mid = self._identify(volume)
        with self._lock:
            self._make_room(mid)
            old = self._members.get(mid)
            bitmap = old.bitmap if old is not None else None
            op = self._apply(Event.MOUNT_MEMBER, mid, bitmap is not None)
            if old is not None and old.volume is not None and old.volume is not volume:
                self._others.append(old.volume)
            if volume in self._others:
                self._others.remove(volume)
            if volume.name in self._stale:  # a member now: show() must not list it stale too
                self._stale.remove(volume.name)
            volume.write_cache = self._write_cache
            self._members[mid] = Member(mid, volume, volume.name, bitmap)
            self._work[op.seq] = self._plan(op)
            self._members[mid].bitmap = None
            self._commit()

    def _refuse_newer(self, volume: Volume) -> None:
        """A volume carrying this set's id at a generation this mount neither opened at nor
        wrote holds writes the set never saw (it went on without the members the set was
        mounted from): copying over it would lose them."""
        try:
            blk, self_id = read_block(volume)
        except ControlBlockError:
            return
        if blk.set_id != self._block.set_id or blk.generation <= self._opened_at:
            return
        if self._written.get(self_id.hex()) == blk.generation:
            return
        raise ShadowError(
            f"{volume.name} carries generation {blk.generation} of shadow set {self.name!r}, "
            f"newer than the generation {self._opened_at} it was mounted at: it holds writes "
            f"the set never saw; dismount the set and mount it with this member"
        )

    def _make_room(self, mid: str) -> None:
        """The control block has room for MAX_MEMBERS entries: forget stale ones if needed."""
        state = self.state
        if mid in state.members or len(state.members) < MAX_MEMBERS:
            return
        for m in [m for m in self._members.values() if state.members[m.id] is MemberState.STALE]:
            del state.members[m.id], self._members[m.id]
            if m.volume is not None:
                self._others.append(m.volume)
        if len(state.members) >= MAX_MEMBERS:
            raise ShadowError(f"shadow set {self.name!r} has {MAX_MEMBERS} members already")

    def remove(self, name: str, minicopy: bool = False) -> None:
        """Dismount member `name`. With `minicopy` the set records what is written from this
        moment (no host write is in flight when it starts), so its return copies only that,
        and the writes it took since the last flush of every member: no flush reaches it
        now, so a power loss may take them from its cache."""
        with self._gate.exclusive(), self._lock:
            m = self._find(name)
            self._apply(Event.REMOVE_MEMBER, m.id, minicopy)
            if m.id in self.state.members:
                m.bitmap = self._new_bitmap()
                for unflushed in (self._unflushed, *self._flushing):
                    m.bitmap |= unflushed
            else:
                del self._members[m.id]
                if m.volume is not None:
                    self._others.append(m.volume)
            self._commit()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until no operation is pending; True when the set is steady."""
        with self._cond:
            self._cond.wait_for(lambda: self.state.steady or self._stopping.is_set(), timeout)
            return self.state.steady

    def close(self) -> None:
        """Clean dismount: stop the worker at a chunk boundary, flush, record every pending
        operation's fence and the clean flag, save minicopy bitmaps, close the members."""
        if not self._mounted:
            return
        self._stop_worker()
        with self._gate.exclusive(), self._lock:
            self._fail_and_commit(self._flush_members(), 0, None)
            self._apply(Event.DISMOUNT)
            for m in self._members.values():
                if m.bitmap is not None and self.state.members[m.id] is MemberState.REMOVED:
                    key = f"{self._block.set_id.hex()}.{m.id}"
                    payload = base64.b64encode(m.bitmap.to_bytes()).decode()
                    self._committer.save(MAP_KIND, key, payload, create=True)
            if self._wil is not None and self.state.merge_op() is None:
                self._wil.release()
                self._wil.mark_clean()
            self._commit(clean=True)
            self._mounted = False
            self._fanout.close()
            if self._wil is not None:
                self._wil.close()
            for v in self._volumes():
                v.close()

    def _volumes(self) -> Iterator[Volume]:
        seen: set[int] = set()
        for v in [*(m.volume for m in self._members.values()), *self._others]:
            if v is not None and id(v) not in seen:
                seen.add(id(v))
                yield v

    # -- show ---------------------------------------------------------------------------------

    def show(self) -> dict[str, Any]:
        """The set as SHOW SHADOW reports it, as a dict (for --json)."""
        with self._lock:
            state = self.state
            ops = [self._describe_op(op, op is state.active()) for op in state.queue]
            return {
                "name": self.name,
                "set_id": self._block.set_id.hex(),
                "generation": self.generation,
                "size": self.size,
                "block_size": self.block_size,
                "state": ",".join(o["display"] for o in ops) or "Steady State",
                "read_policy": self.read_policy,
                "log": {"enabled": self._wil is not None, "valid_at_mount": self.log_valid},
                "members": [self._describe_member(m) for m in self._members.values()]
                + [{"name": name, "state": MemberState.STALE.value, "display": "Stale"}
                   for name in self._stale],
                "operations": ops,
                "stats": {k: getattr(self.stats, k) for k in
                          ("copied", "copy_skipped", "merge_scanned", "merge_skipped",
                           "merge_written", "read_repairs")},
            }  # fmt: skip

    def _describe_op(self, op: Operation, active: bool) -> dict[str, Any]:
        work = self._work.get(op.seq)
        pct = work.percent() if work is not None else 0
        target = self._members[op.target].name if op.target else None
        status = "Active" if active else "Pending"
        return {
            "kind": op.kind.value,
            "target": target,
            "fence": op.fence,
            "percent": pct,
            "active": active,
            "display": f"{op.kind.value} {status} ({pct}%)",
        }

    def _describe_member(self, m: Member) -> dict[str, Any]:
        state = self.state
        st = state.members[m.id]
        display = st.value
        merge = state.merge_op()
        if st is MemberState.FULL and m.id == state.master() and merge is not None:
            work = self._work.get(merge.seq)
            display = f"Master Member, Merging ({work.percent() if work else 0}%)"
        elif st is MemberState.COPY_TARGET:
            op = state.copy_op(m.id)
            work = self._work.get(op.seq) if op is not None else None
            display = f"{st.value} ({work.percent() if work else 0}%)"
        elif st is MemberState.REMOVED and m.bitmap is not None:
            display = f"Removed, {m.bitmap.dirty_bytes()} bytes changed since"
        return {"name": m.name, "id": m.id, "state": st.value, "display": display}

    # -- the Volume interface -----------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._block.size

    @property
    def write_cache(self) -> bool:
        return self._write_cache

    @write_cache.setter
    def write_cache(self, value: bool) -> None:
        self._write_cache = value
        for m in self._in_set():
            assert m.volume is not None
            m.volume.write_cache = value

    @property
    def supports_unmap(self) -> bool:
        return all(m.volume is not None and m.volume.supports_unmap for m in self._in_set())

    @property
    def read_only(self) -> bool:
        return any(m.volume is not None and m.volume.read_only for m in self._in_set())

    def check_ready(self) -> None:
        """TEST UNIT READY: a mounted set always has a full member to serve from."""
        if not self._mounted:
            raise NotReadyError(f"shadow set {self.name}: dismounted")

    def readinto(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """From one full member (by the read policy); on an error, from another, with the failed
        blocks rewritten on the member that failed (repair)."""
        self._read(offset, bufs, held=False)

    def readinto_held(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """`readinto` for a caller that holds the range's region lock (see `guards`)."""
        self._read(offset, bufs, held=True)

    def _read(self, offset: int, bufs: Sequence[memoryview], held: bool) -> None:
        length = sum(len(b) for b in bufs)
        self._merge_before_read(offset, length, held)
        order = self._read_order()
        assert order[0].volume is not None
        try:
            order[0].volume.readinto(offset, bufs)
            return
        except VolumeError:
            pass
        with self._locked(offset, length, held):
            self._read_repairing(order, offset, bufs)

    def _locked(
        self, offset: int, length: int, held: bool
    ) -> contextlib.AbstractContextManager[None]:
        """The range's region lock, unless the caller holds it already."""
        return contextlib.nullcontext() if held else self._regions.hold(offset, length)

    def write(self, offset: int, bufs: Sequence[memoryview], fua: bool = False) -> None:
        """To every full member and copy target; acknowledged when all have it. A member that
        fails leaves the set and the write succeeds, unless it was the last full member."""
        length = sum(len(b) for b in bufs)
        self._mutate(offset, length, lambda v: v.write(offset, bufs, fua), self._waits(fua))

    def unmap(self, offset: int, length: int) -> None:
        self._mutate(offset, length, lambda v: v.unmap(offset, length), self._waits(False))

    def write_held(self, offset: int, bufs: Sequence[memoryview], fua: bool = False) -> None:
        """`write` for a caller that holds the gate, the region lock and the write intent (see
        `guards`)."""
        length = sum(len(b) for b in bufs)
        self._mutate_held(offset, length, lambda v: v.write(offset, bufs, fua), self._waits(fua))

    def unmap_held(self, offset: int, length: int) -> None:
        self._mutate_held(offset, length, lambda v: v.unmap(offset, length), self._waits(False))

    def _waits(self, fua: bool) -> bool:
        """Whether the members' writes wait for their devices: then they run side by side."""
        return waits(fua, self._write_cache)

    @property
    def guards(self) -> Guards:
        """The set's write gate, region locks and write-intent log, for a volume stacked on
        the set (a pair's P-VOL or S-VOL) to use instead of its own: it takes them once and
        calls the `_held` methods, so a paired set pays for one of each."""
        return Guards(self._gate, self._regions, self._wil)

    def _mutate(self, offset: int, length: int, io: Callable[[Volume], None], beside: bool) -> None:
        with self._gate.shared(), self._regions.hold(offset, length), self._intent(offset, length):
            self._mutate_held(offset, length, io, beside)

    def _mutate_held(
        self, offset: int, length: int, io: Callable[[Volume], None], beside: bool
    ) -> None:
        """The range is marked unflushed before the I/O (a member failing meanwhile counts
        it) and again after it (a flush that started while it was in flight does not cover
        it); a target removed meanwhile gets it in its bitmap even where the I/O succeeded,
        as only a flush, which it no longer gets, would make it durable there. The members
        are written side by side when `beside`, and all of them have ended before a failure
        is answered."""
        with self._lock:
            targets = self._in_set()
            self._unflushed.mark(offset, length)
            for m in self._members.values():
                if m.bitmap is not None:
                    m.bitmap.mark(offset, length)
        outcomes = self._fanout.run([functools.partial(io, m.volume) for m in targets], beside)
        failed = []
        for m, e in zip(targets, outcomes, strict=True):
            if isinstance(e, VolumeError):
                failed.append((m, e))
            elif e is not None:
                raise e
        with self._lock:
            self._unflushed.mark(offset, length)
            for m in targets:
                if m.bitmap is not None and self.state.members.get(m.id) is MemberState.REMOVED:
                    m.bitmap.mark(offset, length)
        self._fail_and_commit(failed, offset, length)

    @contextlib.contextmanager
    def _intent(self, offset: int, length: int) -> Iterator[None]:
        """A durable write intent for the minimerge after a crash."""
        if self._wil is None:
            yield
            return
        self._wil.begin(offset, length)
        try:
            yield
        finally:
            self._wil.end(offset, length)

    def flush(self) -> None:
        """SYNCHRONIZE CACHE on every member; one that fails may have lost any write, so its
        bitmap vouches for nothing."""
        self._fail_and_commit(self._flush_members(), 0, None)

    def _flush_members(self) -> list[tuple[Member, VolumeError]]:
        """Flush every member in the set; the writes done before it started are durable on
        those that succeed (the ones that fail leave with a bitmap of everything)."""
        failed = []
        with self._lock:
            targets = self._in_set()
            covered, self._unflushed = self._unflushed, DirtyMap(self.size, self.tuning.grain)
            self._flushing.append(covered)
        try:
            for m in targets:
                assert m.volume is not None
                try:
                    m.volume.flush()
                except VolumeError as e:
                    failed.append((m, e))
        finally:
            with self._lock:
                self._flushing = [f for f in self._flushing if f is not covered]
        return failed

    def extent_at(self, offset: int) -> Extent:
        master = self._full()[0]
        assert master.volume is not None
        ext = master.volume.extent_at(offset)
        return Extent(offset, min(ext.length, self.size - offset), ext.mapped)

    # -- reads, repair and merge of a range ------------------------------------------------

    def _read_repairing(
        self, order: Sequence[Member], offset: int, bufs: Sequence[memoryview]
    ) -> Member:
        """Read from the first member of `order` that can (returned); rewrite the range on
        those that failed before it. Caller holds the region lock. MediumError when none can."""
        tried: list[tuple[Member, VolumeError]] = []
        for m in order:
            assert m.volume is not None
            try:
                m.volume.readinto(offset, bufs)
            except VolumeError as e:
                tried.append((m, e))
                continue
            self._repair(tried, offset, bufs)
            return m
        error = tried[-1][1] if tried else None
        if isinstance(error, MediumError):
            raise error
        length = sum(len(b) for b in bufs)
        raise MediumError("read", offset, length) from error

    def _repair(
        self, bad: Sequence[tuple[Member, VolumeError]], offset: int, bufs: Sequence[memoryview]
    ) -> None:
        """Rewrite good data over blocks a member failed to read; remove it if that fails."""
        length = sum(len(b) for b in bufs)
        failed = []
        for m, _ in bad:
            assert m.volume is not None
            try:
                m.volume.write(offset, bufs)
                self.stats.read_repairs += length // self.block_size
            except VolumeError as e:
                failed.append((m, e))
        self._fail_and_commit(failed, offset, length)

    def _merge_before_read(self, offset: int, length: int, held: bool) -> None:
        """A host read of a region the pending merge has not reached merges it first. A held
        region lock covers the range widened to grains: stripes are whole grains."""
        with self._lock:
            op = self.state.merge_op()
            work = self._work.get(op.seq) if op is not None else None
        if work is None or not work.pending.test(offset, length):
            return
        grain = self.tuning.grain
        lo = offset - offset % grain
        hi = min(-(-(offset + length) // grain) * grain, self.size)
        with self._locked(lo, hi - lo, held):
            for start, n in list(work.pending.extents(lo, hi)):
                merge_range(self, start, n, self.tuning.chunk)
                work.pending.clear(start, n)

    # -- the worker ---------------------------------------------------------------------------

    def _run(self) -> None:
        """Run the head of the queue through the resync engine, one operation after another,
        until stopped."""
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping.is_set() or not self.state.steady)
                if self._stopping.is_set():
                    return
                op = self.state.active()
                assert op is not None
                work = self._work[op.seq]
            resync = Resync(
                ShadowJob(self, op),
                work.pending,
                op,
                regions=self._regions,
                lock=self._lock,
                block_size=self.block_size,
                settings=self._settings,
            )
            try:
                resync.run(self._stopping)
            except Exception:  # e.g. no member can read a block: leave it to the operator
                log.exception("shadow set %s: %s stopped", self.name, op.kind.value)
                self._stop_running()
                return
            with self._lock:
                stuck = not self._stopping.is_set() and self.state.active() is op
            if stuck:  # the job gave up but the operation is still queued: do not spin
                log.error("shadow set %s: %s could not go on", self.name, op.kind.value)
                self._stop_running()
                return

    def _stop_running(self) -> None:
        with self._cond:
            self._stopping.set()
            self._cond.notify_all()

    def _checkpoint(self) -> None:
        """Make the copied/merged data durable, then record the fences."""
        self._fail_and_commit(self._flush_members(), 0, None)
        fault_point("shadow.checkpoint.flushed")
        self._commit()

    def _finish(self, op: Operation) -> None:
        """The operation is done: its data durable, its completion recorded; after the last
        merge the write-intent log is cleared (no write in flight meanwhile)."""
        self._fail_and_commit(self._flush_members(), 0, None)
        with self._gate.exclusive(), self._lock:
            if op not in self.state.queue:
                return
            self._apply(Event.OPERATION_DONE, op)
            self.stats.finished.append((op.kind, op.target))
            self._commit()
            if self._wil is not None and op.kind.is_merge and self.state.merge_op() is None:
                self._wil.release()
                self._wil.mark_clean()

    def _stop_worker(self) -> None:
        self._stop_running()  # also wakes a paced copy at once
        self._worker.join()


def _recorded(committer: Committer, set_id: bytes) -> int:
    """The generation recorded for set `set_id` in the state directory (0: none)."""
    entry = committer.load(KIND, set_id.hex())
    return int(entry["generation"]) if isinstance(entry, dict) else 0
