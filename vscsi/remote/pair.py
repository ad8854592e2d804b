"""A remote (TrueCopy) pair at run time, on either array: the rules are `vscsi.remote.states`;
the record, copier and checkpoints are every pair's (`vscsi.pair.mirror`); the S-VOL is
reached through the peer's `Replica`.

The pair's record is an ordinary pair record (`pairs/<name>.json`) whose `extra["remote"]`
holds the state of both sides, the fence, the peer and this side's lineage; `pvol` and `svol`
name the local volume plainly and the peer's as `REMOTE:VOLUME`, and a swap exchanges them.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

from vscsi.link.errors import LinkError
from vscsi.pair.mirror import Mirror
from vscsi.pair.persist import PairRecord
from vscsi.pair.states import Access, PairError, Role, Status
from vscsi.pair.volume import GRAIN
from vscsi.pair.vpd import SlotInfo
from vscsi.remote import states
from vscsi.remote.peer import LinkDown, Peer
from vscsi.remote.states import Event, Fence, Lineage, PairState, Verdict
from vscsi.store.base import VolumeError, WriteProtectedError
from vscsi.tracker import DirtyMap

if TYPE_CHECKING:
    from vscsi.pair.manager import PairManager
    from vscsi.pair.volume import PairVolume
    from vscsi.resync.engine import Resync

log = logging.getLogger(__name__)

LIVE = (Status.COPY, Status.PAIR)
SYNCING = frozenset({Event.COPY_DONE})  # the S side adopts the P side's lineage


def qualified(peer: str, volume: str) -> str:
    return f"{peer}:{volume}"


def encode_state(st: PairState) -> dict[str, Any]:
    d = asdict(st)
    d.update(p=st.p.value, s=st.s.value, fence=st.fence.value)
    return d


def decode_state(d: dict[str, Any]) -> PairState:
    return PairState(
        primary=int(d["primary"]), secondary=int(d["secondary"]), p=Status(d["p"]),
        s=Status(d["s"]), fence=Fence(d["fence"]), svol_rw=bool(d["svol_rw"]),
        fenced=bool(d["fenced"]), demoted=bool(d["demoted"]), swaps=int(d.get("swaps", 0)),
    )  # fmt: skip


def event_message(
    name: str, event: Event, state: PairState, lineage: Lineage, **args: Any
) -> dict[str, Any]:
    """The arguments of the "event" request that tells the peer this side applied `event`."""
    return {"pair": name, "event": event.value, "state": encode_state(state),
            "lineage": encode_lineage(lineage), **args}  # fmt: skip


def encode_lineage(lin: Lineage) -> list[int]:
    return [lin.current, *lin.history]


def decode_lineage(v: list[int]) -> Lineage:
    return Lineage(int(v[0]), tuple(int(x) for x in v[1:]))


class RemotePair(Mirror):
    """One TrueCopy pair on this array; `local` is this array's volume of it."""

    remote = True

    def __init__(
        self, rec: PairRecord, manager: PairManager, peer: Peer, local: PairVolume
    ) -> None:
        super().__init__(rec, manager, None, local)
        self.peer = peer
        self._decoded: tuple[dict[str, Any], PairState] | None = None
        self._attach()

    # -- the record's remote part -----------------------------------------------------------

    @property
    def info(self) -> dict[str, Any]:
        return self.rec.extra["remote"]  # type: ignore[no-any-return]

    @property
    def state(self) -> PairState:
        """Decoded once per change: every mirrored write asks (records are replaced, never
        changed in place, so the record's identity says whether it changed)."""
        record = self.info["state"]
        cached = self._decoded
        if cached is None or cached[0] is not record:
            cached = self._decoded = (record, decode_state(record))
        return cached[1]

    @property
    def lineage(self) -> Lineage:
        return decode_lineage(self.info["lineage"])

    @property
    def serial(self) -> int:
        return self.manager.serial

    @property
    def role(self) -> Role:
        return self.state.role_of(self.serial)

    @property
    def peer_volume(self) -> str:
        return str(self.info["peer_volume"])

    @property
    def local_name(self) -> str:
        return self.local.name

    def _attach(self) -> None:
        """The replica exists while this array holds the P-VOL."""
        is_p = self.role is Role.PVOL
        self.replica = self.peer.replica(self.peer_volume) if is_p else None

    # -- state changes -----------------------------------------------------------------------

    def apply(
        self, event: Event, *, rw: bool = False, create: bool = False, **changes: Any
    ) -> PairState:
        """Apply `event` to this array's view of both sides, persist it, tell the host side.
        A record that cannot be written undoes the change and raises."""
        with self.lock:
            new = states.apply(self.name, self.state, event, rw=rw)
            self._set(new, create=create, **changes)
        log.info("remote pair %s: %s -> %s/%s", self.name, event.value, new.p.value, new.s.value)
        self.manager.changed(self.local_name)
        return new

    def set_state(self, new: PairState, **changes: Any) -> None:
        """Take a state the rules did not derive from an event (what an exchange settled)."""
        with self.lock:
            self._set(new, **changes)

    def _set(self, new: PairState, *, create: bool = False, **changes: Any) -> None:
        """Under the lock: take `new` (and record fields `changes`), swap the names if the
        roles moved, save; undo on failure."""
        rec = self.rec
        keep = (replace(rec), dict(self.info))
        swapped = new.primary != self.state.primary
        role_moved = new.role_of(self.serial) is not self.role
        self.info["state"] = encode_state(new)
        for key, value in changes.items():
            if key in ("lineage", "alone", "split_brain", "peer_state"):
                self.info[key] = value
            else:
                setattr(rec, key, value)
        if swapped:
            rec.pvol, rec.svol = rec.svol, rec.pvol
        rec.status = new.status_of(self.serial)
        rec.generation += 1
        try:
            self.save(create=create)
        except Exception:
            old, info = keep
            for f in ("pvol", "svol", "status", "generation", "pending", "pdiff", "sdiff",
                      "fence", "copy_total"):  # fmt: skip
                setattr(rec, f, getattr(old, f))
            rec.extra["remote"] = info
            raise
        if swapped:
            self.manager.roles_changed()
        if role_moved:
            self._attach()

    def propose_swap(self, event: Event) -> dict[str, Any]:
        """The first half of a swap (at the S side): the peer records it; the caller then
        applies `event` here. So a crash or a link failure between the two records leaves, at
        worst, both sides S-VOLs (read only) with the peer's swap count ahead, and this side
        takes the swap at the next exchange (`_adopted`); never two P-VOLs. Raises (nothing
        changed on either side) when the rules refuse it or the peer cannot confirm. The
        peer's answer carries the grains it changed until it recorded the swap."""
        states.apply(self.name, self.state, event)  # refused before the peer is asked
        return self.peer.call("event", **event_message(self.name, event, self.state, self.lineage))

    def tell(self, event: Event, **args: Any) -> bool:
        """Report an event to the peer; False when it cannot be reached (it learns the state
        at the next exchange, see `exchange`)."""
        try:
            self.peer.call("event", **event_message(self.name, event, self.state, self.lineage,
                                                    **args))  # fmt: skip
        except LinkDown as e:
            log.warning("remote pair %s: %s not reported to %s: %s", self.name, event.value,
                        self.peer.name, e)  # fmt: skip
            return False
        return True

    def on_event(self, event: Event, state: PairState, lineage: Lineage, rw: bool) -> None:
        """The peer applied `event`: apply it here by the same rules. If this side's view is
        stale, the P side's state wins (it owns the pair status)."""
        with self.lock:
            try:
                new = states.apply(self.name, self.state, event, rw=rw)
            except PairError:
                if state.primary != self.peer.serial or self.state.s is Status.SSWS:
                    raise  # a takeover here stands: the P side learns it at its exchange
                new = state
            if new.role_of(self.serial) is Role.PVOL and new.s is Status.SSWS:
                new = replace(new, p=Status.PSUE, demoted=True)  # taken over: as `_settled`
            changes: dict[str, Any] = {}
            if event in SYNCING and new.role_of(self.serial) is Role.SVOL:
                changes.update(lineage=encode_lineage(lineage), alone=False, sdiff=None)
            if event in (Event.RESYNC, Event.SWAP_RESYNC):
                changes.update(sdiff=None, pdiff=None)
            if event is Event.DELETE:
                self.manager.remote.forget(self)
                return
            self._set(new, **changes)
        self.manager.changed(self.local_name)

    # -- lone writes fork the lineage ----------------------------------------------------------

    def _fork_once(self) -> None:
        """Under the lock, before the first write this side takes without its peer is
        acknowledged: a new generation, durable."""
        if self.info.get("alone"):
            return
        self._set(self.state, lineage=encode_lineage(self.lineage.fork()), alone=True)

    # -- host writes on the P side ---------------------------------------------------------------

    def takes_updates(self) -> bool:
        return self.state.p in LIVE

    def track(self, offset: int, length: int) -> None:
        self._track(offset, length)

    def update_failed(self, offset: int, length: int, error: Exception) -> None:
        """Answered by the fence level, which may fail the host's write."""
        if not self._update_failed(offset, length, error):
            raise WriteProtectedError(
                f"{self.local_name}: fence=data pair {self.name} could not copy the write"
            ) from error

    def _track(self, offset: int, length: int) -> None:
        if self.rec.pdiff is None:
            self.rec.pdiff = DirtyMap(self.local.size, GRAIN)
        self.rec.pdiff.mark(offset, length)
        self._fork_once()

    def _update_failed(self, offset: int, length: int, error: BaseException) -> bool:
        """Suspend as the fence level says; True when the host write may succeed."""
        log.warning("remote pair %s: update copy failed: %s", self.name, error)
        told = not isinstance(error, LinkDown) and self._tell_suspend()
        outcome = states.on_update_failure(self.state.fence, told)
        self._suspend(offset, length, outcome.event)
        return outcome.write_ok

    def _tell_suspend(self) -> bool:
        try:
            self.peer.call("suspend", pair=self.name)
        except (LinkDown, PairError):
            return False
        return True

    def _suspend(self, offset: int, length: int, event: Event) -> None:
        with self.lock:
            if self.state.p not in LIVE:
                self._track(offset, length)
                return
            self.stopping.set()
            pdiff = self.rec.pdiff or DirtyMap(self.local.size, GRAIN)
            pdiff.mark(offset, length)
            left = self.remaining()
            if left is not None:
                pdiff |= left
            try:
                self.apply(event, pdiff=pdiff, pending=None, fence=0)
                self._fork_once()
            except (OSError, VolumeError) as e:  # in memory; the next checkpoint saves it
                log.error("remote pair %s: record not written: %s", self.name, e)

    def suspend(self, offset: int, length: int, error: BaseException) -> None:
        """The copier or a flush failed on the S side."""
        told = not isinstance(error, LinkDown) and self._tell_suspend()
        self._suspend(offset, length, Event.SUSPEND_BOTH if told else Event.SUSPEND)

    def lost_by_flush(self, error: BaseException) -> int:
        """A flush the link failed loses nothing the S array acknowledged: its write-intent
        log holds the regions of every update copy not yet durable there, and an S array that
        crashes reports them (`recover_secondary`). Only a flush the S array itself failed
        counts the whole volume as changed."""
        return 0 if isinstance(error, LinkDown) else self.local.size

    def primary_failed(self, offset: int, length: int) -> None:
        """The P-VOL failed a host write: copy the range again (COPY until done)."""
        with self.lock:
            if self.state.p is Status.COPY and self.rec.pending is not None:
                self.rec.pending.mark(offset, length)
                return
            if self.state.p is not Status.PAIR:
                self._track(offset, length)
                return
            pending = DirtyMap(self.local.size, GRAIN)
            pending.mark(offset, length)
            self.apply(Event.RECOVER, pending=pending, fence=0, copy_total=length)
        self.start_copier()

    def secondary_written(self, offset: int, length: int) -> None:
        """A host write on the S side (SSWS, or a --rw split): tracked for the swap."""
        with self.lock:
            if self.rec.sdiff is None:
                self.rec.sdiff = DirtyMap(self.local.size, GRAIN)
            self.rec.sdiff.mark(offset, length)
            self._fork_once()

    def changed_here(self, offset: int, length: int) -> None:
        """A local pair's restore rewrote the range of this array's volume: a change made on
        this side alone, like a host write (the cascade lets a restore run only where the
        volume takes writes alone), for the next resync to copy."""
        with self.lock:
            if self.role is Role.PVOL:
                self._track(offset, length)
            else:
                self.secondary_written(offset, length)

    @property
    def copies_here(self) -> bool:
        return self.role is Role.PVOL

    # -- after a crash -----------------------------------------------------------------------------

    def recover_primary(self, regions: DirtyMap) -> None:
        """Writes that may have been in flight on the P side: copied again (PAIR -> COPY),
        still to copy, or P changes."""
        with self.lock:
            st = self.state
            if st.p is Status.PAIR:
                self.apply(Event.RECOVER, pending=regions.copy(), fence=0,
                           copy_total=regions.dirty_bytes())  # fmt: skip
                return
            if st.p is Status.COPY and self.rec.pending is not None:
                self.rec.pending |= regions
                self.rec.fence = 0
            else:
                pdiff = self.rec.pdiff or DirtyMap(self.local.size, GRAIN)
                pdiff |= regions
                self.rec.pdiff = pdiff
            self.save()

    def recover_secondary(self, regions: DirtyMap) -> None:
        """Update copies the S side acknowledged may be lost from its cache: the S side
        suspends itself (PSUE) with the regions as its changes, and the P side learns it at
        the next exchange; the resync copies them again. Nothing is trusted silently."""
        with self.lock:
            sdiff = self.rec.sdiff or DirtyMap(self.local.size, GRAIN)
            sdiff |= regions
            st = self.state
            new = replace(st, s=Status.PSUE) if st.s in LIVE else st
            self._set(new, sdiff=sdiff)

    def describe(self) -> dict[str, Any]:
        """pairdisplay's remote fields: both sides as this array knows them."""
        st, rec = self.state, self.rec
        here = self.role is Role.PVOL
        local = {"volume": self.local_name, "array": self.serial, "access": self.access().value}
        peer = {"volume": qualified(self.peer.name, self.peer_volume), "array": self.peer.serial,
                "access": states.access(st, self.peer.serial).value}  # fmt: skip
        p_side, s_side = (local, peer) if here else (peer, local)
        return {
            "remote": self.peer.name,
            "fence": st.fence.value,
            "pvol": {**p_side, "role": "P-VOL", "status": st.p.value,
                     "changed_bytes": rec.pdiff.dirty_bytes() if rec.pdiff else 0},
            "svol": {**s_side, "role": "S-VOL", "status": st.s.value,
                     "changed_bytes": rec.sdiff.dirty_bytes() if rec.sdiff else 0},
            "fenced": st.fenced,
            "demoted": st.demoted,
            "split_brain": bool(self.info.get("split_brain")),
        }  # fmt: skip

    def slot(self) -> SlotInfo:
        """Page 0xC0's HORC slot of this array's volume."""
        st = self.state
        return SlotInfo(
            self.role, st.status_of(self.serial), self.progress(), self.peer.serial,
            int(self.info.get("peer_volume_id", 0)), self.rec.generation,
            not st.svol_rw and st.s is Status.SSUS,
            self.role is Role.PVOL and (st.fenced or st.demoted),
        )  # fmt: skip

    def access(self) -> Access:
        return states.access(self.state, self.serial)

    # -- the copy ----------------------------------------------------------------------------------

    def mirrored(self, rec: PairRecord) -> bool:
        return self.role is Role.PVOL and self.state.p in LIVE

    def _run_copy(self, resync: Resync) -> None:
        """The S side failing outside a run's copy (the link down or the peer refusing when
        the engine asks where the S-VOL holds data) suspends the pair like a failed copy:
        a copier that just stopped would leave it in COPY, mirroring nothing, for good."""
        try:
            resync.run(self.stopping)
        except (LinkError, PairError) as e:
            log.warning("remote pair %s: copy stopped by the S side: %s", self.name, e)
            self.suspend(0, 0, e)
        except Exception:  # a P-VOL failure: the copy stays pending and resumes on restart
            log.exception("remote pair %s: copy stopped", self.name)

    def finish_copy(self) -> bool:
        if not self.flush_replica():
            return True
        self.local.base.flush()
        with self.lock:
            assert self.rec.pending is not None
            if self.rec.pending.count():
                return False
            self.apply(Event.COPY_DONE, pending=None, fence=0, pdiff=None, sdiff=None,
                       alone=False)  # fmt: skip
        self.tell(Event.COPY_DONE)
        return True

    # -- what the peer asks ------------------------------------------------------------------------

    def unsynced(self) -> DirtyMap | None:
        """Grains where this side may differ from the peer's: its changes, and what a copy
        left to copy when the pair stopped mirroring under it (a suspension or a fence that
        came while it ran leaves `pending` behind)."""
        with self.lock:
            diff = self.rec.sdiff if self.role is Role.SVOL else self.rec.pdiff
            left = self.remaining()
            if diff is None:
                return left
            if left is not None:
                left |= diff
                return left
            return diff

    def describe_for_peer(self) -> dict[str, Any]:
        """This side's state, lineage and changes, for the peer's exchange and resyncs."""
        with self.lock:
            diff = self.unsynced()
            local = self.manager.restoring(self.local_name)
            return {
                "state": encode_state(self.state),
                "lineage": encode_lineage(self.lineage),
                "changes": None if diff is None else diff.to_bytes().hex(),
                "restoring": None
                if local is None
                else f"local pair {local.name!r} is "
                f"restoring {self.local_name!r}; wait for the restore to end",
            }

    def _settled(self, st: PairState, peer: PairState) -> PairState:
        """This side's state given the peer's: an old P-VOL whose S side took over is demoted
        (PSUE, refusing writes until `resync --swaps` at the new primary); an S side that has
        not taken over takes the P side's status, which the P side owns."""
        if st.role_of(self.serial) is Role.PVOL:
            if peer.primary != st.primary:
                return st
            if peer.s is Status.SSWS:
                return replace(st, p=Status.PSUE, s=Status.SSWS, demoted=True)
            if peer.s is Status.PSUE and st.p in LIVE:  # the S side lost update copies
                return replace(st, p=Status.PSUE, s=Status.PSUE)
            return st
        if st.s is Status.SSWS or peer.primary != st.primary:
            return st
        s = st.s if st.s is Status.PSUE else peer.s  # a suspension only this side knows stays
        return replace(st, p=peer.p, s=s, fenced=peer.fenced, demoted=peer.demoted)

    def _adopted(self, peer: PairState) -> tuple[PairState, dict[str, Any]]:
        """Under the lock: the peer recorded a role swap this side missed (see `swap`): take
        its view. What this side wrote or left to copy meanwhile stays as its changes, and
        the pair is suspended unless the peer's view is PAIR and nothing changed here; a
        side that becomes the P-VOL of a swap-resync it never started has everything to copy
        (the peer's changes were reset when it took the swap)."""
        mine = self.unsynced()
        becomes_p = peer.role_of(self.serial) is Role.PVOL
        if becomes_p and peer.p is not Status.PAIR:
            mine = DirtyMap(self.local.size, GRAIN)
            mine.mark(0, self.local.size)
        if mine is None or not mine.count():
            return peer, {"pending": None}
        new = replace(peer, s=Status.PSUE if peer.s in LIVE else peer.s)
        if becomes_p:
            new = replace(new, p=Status.PSUE)
            return new, {"pending": None, "pdiff": mine, "sdiff": None}
        return new, {"pending": None, "pdiff": None, "sdiff": mine}

    def exchange(self) -> dict[str, Any] | None:
        """Ask the peer for its side and settle what the two views say (never two primaries,
        split brain reported); None when the peer cannot be reached."""
        try:
            theirs = self.peer.call("describe", pair=self.name)
        except LinkDown:
            return None
        verdict = states.compare(self.lineage, decode_lineage(theirs["lineage"]))
        peer_state = decode_state(theirs["state"])
        with self.manager.remote.lock, self.lock:  # a state change: as the peer's requests
            st, changes, ours = self.state, {}, self.state
            if peer_state.swaps > st.swaps:
                ours, changes = self._adopted(peer_state)
            new = self._settled(ours, peer_state)
            brain = verdict is Verdict.SPLIT_BRAIN
            changed = new != st or brain != bool(self.info.get("split_brain"))
            if changed:
                self._set(new, split_brain=brain, **changes)
        if changed:
            log.warning("remote pair %s: now %s/%s%s%s", self.name, new.p.value, new.s.value,
                        ", demoted: the peer took over" if new.demoted else "",
                        ", split brain: both sides wrote alone" if brain else "")  # fmt: skip
            self.manager.changed(self.local_name)
        return theirs
