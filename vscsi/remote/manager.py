"""`RemotePairs`: this array's TrueCopy pairs — the operations issued here (create, split,
resync, resync --swaps, delete, takeover) and the requests a peer array sends (create, events,
suspend, describe, and its writes to an S-VOL here). The pair manager owns it and asks it for
the remote pairs a volume is in."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from vscsi.pair.persist import PairRecord
from vscsi.pair.replica import Replica
from vscsi.pair.states import Event as LocalEvent
from vscsi.pair.states import NoSuchPair, PairError, Role, Status, StatusRefused, VolumeRefused
from vscsi.pair.volume import GRAIN
from vscsi.remote import states
from vscsi.remote.pair import (
    RemotePair,
    decode_lineage,
    decode_state,
    encode_lineage,
    encode_state,
    event_message,
    qualified,
)
from vscsi.remote.peer import LinkDown, Peer
from vscsi.remote.states import TAKEOVER_EVENT, Event, Fence, Lineage, PairState, Takeover
from vscsi.store.base import Extent
from vscsi.tracker import DirtyMap

if TYPE_CHECKING:
    from vscsi.pair.manager import PairManager
    from vscsi.pair.volume import PairVolume

log = logging.getLogger(__name__)

REMOTE_MU = -1  # a remote pair's record has no MU#: it is page 0xC0's HORC slot


class RemotePairs:
    def __init__(self, manager: PairManager, serial: int, peers: Mapping[str, Peer]) -> None:
        self.m = manager
        self.serial = serial
        self.peers = dict(peers)
        self.pairs: dict[str, RemotePair] = {}
        # Two locks, so two arrays each waiting for the other's answer never stall: `ops`
        # serialises the operations issued here (and the periodic exchange), which wait on the
        # peer while they hold it; `lock` covers each change of a pair's state against the
        # peer's requests and the local pairs' cascade checks, and is never held while waiting
        # on the peer. A peer's request takes only `lock`, so it is answered even while an
        # operation here waits for that peer.
        self.ops = threading.RLock()
        self.lock = threading.RLock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    # -- the periodic exchange -------------------------------------------------------------------

    def watch(self, interval: float) -> None:
        """Exchange state with the peers every `interval` seconds in the background: after a
        reconnect (or a restart) an old primary learns it was taken over, an S side learns a
        suspension, a split brain is reported — without waiting for an operator command."""
        self._watcher = threading.Thread(target=self._watch, args=(interval,),
                                         name="remote-pairs", daemon=True)  # fmt: skip
        self._watcher.start()

    def _watch(self, interval: float) -> None:
        while not self._stop.wait(interval):
            for pair in list(self.pairs.values()):
                try:
                    with self.ops:
                        pair.exchange()
                except Exception as e:  # a refused or failed exchange: tried again next time
                    log.warning("remote pair %s: exchange failed: %s", pair.name, e)

    def check_peers(self) -> None:
        """At start, before any LUN is served: a P-VOL whose peer cannot be reached may have
        been taken over meanwhile, so it is fenced (PSUE, read only) until a resync, or a
        takeover at this array (PVOL-takeover) decides otherwise. An old primary never
        serves writes after a restart on the strength of a state it cannot confirm."""
        for pair in list(self.pairs.values()):
            with self.ops:
                if pair.role is not Role.PVOL or self._confirmed(pair):
                    continue
                with self.lock:
                    st = pair.state
                    if st.fenced:
                        continue
                    pair.set_state(replace(st, p=Status.PSUE, fenced=True))
            log.warning("remote pair %s: not confirmed by %s at start: the P-VOL is fenced "
                        "until a resync or a takeover here", pair.name, pair.peer.name)  # fmt: skip
            self.m.changed(pair.local_name)

    @staticmethod
    def _confirmed(pair: RemotePair) -> bool:
        """Whether the peer answered for the pair: unreachable, or refusing (it has no such
        pair: a delete that reached it before this array crashed), is not confirmed."""
        try:
            return pair.exchange() is not None
        except PairError as e:
            log.warning("remote pair %s: %s refused the exchange: %s", pair.name,
                        pair.peer.name, e)  # fmt: skip
            return False

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()

    # -- lookups --------------------------------------------------------------------------------

    def peer(self, name: str) -> Peer:
        try:
            return self.peers[name]
        except KeyError:
            known = ", ".join(sorted(self.peers)) or "none configured"
            raise NoSuchPair(f"no remote array {name!r} (known: {known})") from None

    def pair(self, name: str) -> RemotePair:
        try:
            return self.pairs[name]
        except KeyError:
            raise NoSuchPair(f"no remote pair {name!r}: see pair display") from None

    def adopt(self, rec: PairRecord) -> RemotePair:
        info = rec.extra["remote"]
        local = rec.pvol if ":" not in rec.pvol else rec.svol
        pair = RemotePair(rec, self.m, self.peer(info["peer"]), self.m.volume(local))
        self.pairs[rec.name] = pair
        self.m.roles_changed()
        return pair

    def forget(self, pair: RemotePair) -> None:
        """The pair is deleted on this array: its record's tombstone, both volumes SMPL."""
        pair.stop_copier()
        with pair.lock:
            pair.deleted = True
            tombstone = self.m.store.stamp()
        self.pairs.pop(pair.name, None)
        self.m.roles_changed()
        self.m.store.delete(pair.name, tombstone)
        self.m.changed(pair.local_name)

    def _check_free(self, name: str, volume: str) -> None:
        if name in self.pairs or name in self.m.pairs:
            raise PairError(f"pair {name!r} already exists: pick another name or delete it")
        prim, sec = self.m.roles(volume)
        if any(isinstance(p, RemotePair) for p in prim) or sec is not None:
            raise VolumeRefused(f"{volume!r} is already in a remote pair or an S-VOL")
        self._not_restoring(name, volume, Event.CREATE)

    def _not_restoring(self, name: str, volume: str, event: Event) -> None:
        """`event` of remote pair `name` would copy over `volume` or copy from it while a local
        pair restores it (`states.RESTORE_EXCLUDES`)."""
        local = self.m.restoring(volume)
        if local is not None and event in states.RESTORE_EXCLUDES:
            raise StatusRefused(
                f"cannot {event.value} pair {name!r}: local pair {local.name!r} is restoring "
                f"{volume!r}; wait for the restore to end"
            )

    def of_volume(self, volume: str) -> RemotePair | None:
        """The remote pair `volume` is in, on either side."""
        prim, sec = self.m.roles(volume)
        return next((p for p in (*prim, sec) if isinstance(p, RemotePair)), None)

    def allow_local(self, volume: str, local: str, event: LocalEvent) -> None:
        """PairError when the remote pair of `volume` refuses `event` of local pair `local`
        (the cascade table, `states.CASCADE`). Under `lock`, which the caller holds until the
        local pair took the event, so no remote event slips in between."""
        pair = self.of_volume(volume)
        if pair is not None:
            states.cascade(pair.name, pair.state, self.serial, local, event)

    # -- operations issued at this array ------------------------------------------------------

    def create(self, name: str, pvol: str, target: str, fence: Fence) -> None:
        """SMPL -> COPY on both arrays: the peer records its S-VOL, then the copy runs here."""
        remote, sep, svol = target.partition(":")
        if not sep or not svol:
            raise PairError(f"the S-VOL {target!r} must be REMOTE:VOLUME")
        with self.ops:
            with self.lock:
                pv = self.m.volume(pvol)
                self._check_free(name, pvol)
                peer = self.peer(remote)
            st = PairState(self.serial, peer.serial, fence=fence)
            lineage = Lineage(states.new_uuid())
            answer = peer.call(
                "create", pair=name, pvol=pvol, svol=svol, primary=self.serial,
                fence=fence.value, size=pv.size, block_size=pv.block_size,
                lineage=encode_lineage(lineage), volume_id=self._volume_id(pvol),
            )  # fmt: skip
            info = {"state": encode_state(st), "lineage": encode_lineage(lineage),
                    "alone": False, "peer": remote, "peer_volume": svol,
                    "peer_volume_id": int(answer.get("volume_id", 0))}  # fmt: skip
            rec = PairRecord(name, pvol, qualified(remote, svol), REMOTE_MU, Status.SMPL,
                             generation=0, extra={"remote": info})  # fmt: skip
            pending = DirtyMap(pv.size, GRAIN)
            pending.mark(0, pv.size)
            with self.lock, pv.gate.exclusive():
                try:  # a local pair may have taken the volume while the peer answered
                    self._check_free(name, pvol)
                except PairError:
                    self._withdraw(peer, name, st, lineage)
                    raise
                pair = self.adopt(rec)
                pair.apply(Event.CREATE, create=True, pending=pending, copy_total=pv.size)
            pair.start_copier()

    @staticmethod
    def _withdraw(peer: Peer, name: str, st: PairState, lineage: Lineage) -> None:
        """Delete the S-VOL record the peer made for a create that is refused here after all
        (it learns it at its next exchange otherwise: the pair is unknown here)."""
        try:
            peer.call("event", **event_message(name, Event.DELETE, st, lineage))
        except (LinkDown, PairError) as e:
            log.warning("remote pair %s: refused here, not withdrawn at %s: %s", name,
                        peer.name, e)  # fmt: skip

    def split(self, name: str, rw: bool = False, force_ssws: bool = False) -> None:
        """PAIR -> PSUS/SSUS (`rw`: the S-VOL writable); `force_ssws` (-RS, at the S side)
        makes the S-VOL SSWS whatever the P side says."""
        with self.ops:
            pair = self.pair(name)
            if force_ssws:
                if pair.role is not Role.SVOL:
                    raise PairError(f"split -RS of pair {name!r} is issued at its S-VOL's array")
                with self.lock:
                    pair.apply(Event.SPLIT_RS)
                pair.tell(Event.SPLIT_RS)
                return
            pair.exchange()  # a P side that missed a takeover is refused here
            states.apply(name, pair.state, Event.SPLIT)  # refused before anything is flushed
            # the flush is a data request: the peer answers it without its pair locks
            with self.lock, pair.local.gate.exclusive():
                if pair.replica is not None:
                    pair.replica.flush()
                pair.apply(Event.SPLIT, rw=rw)
            pair.tell(Event.SPLIT, rw=rw)

    def resync(self, name: str, swaps: bool = False) -> None:
        """PSUS/PSUE -> COPY, copying the union of both sides' changes; with `swaps` (at the
        S-VOL's array, after a takeover) this array becomes the P side and its changes and
        the old P-VOL's are copied over the old P-VOL."""
        with self.ops:
            pair = self.pair(name)
            event = Event.SWAP_RESYNC if swaps else Event.RESYNC
            # the views settled first: a P side that missed a takeover is refused here, and
            # the S side's SSWS is never copied over
            theirs = pair.exchange()
            if theirs is None:
                raise LinkDown(f"{pair.peer.name} is unreachable: {event.value} of pair "
                               f"{name!r} needs it")  # fmt: skip
            with self.lock:
                self._may_resync(pair, event, theirs)
            # a swap: the peer records it first (`propose_swap`) and answers with what it
            # changed until then, beyond what the exchange read
            late = pair.propose_swap(event) if swaps else {}
            with self.lock, pair.local.gate.exclusive():
                pending = self._union(pair, theirs, late)  # and every write acknowledged here
                pair.apply(event, pending=pending, fence=0, copy_total=pending.dirty_bytes(),
                           pdiff=None, sdiff=None, alone=False)  # fmt: skip
            if not swaps:
                pair.tell(event)
            pair.start_copier()

    def _may_resync(self, pair: RemotePair, event: Event, theirs: dict[str, Any]) -> None:
        """Refused before anything is recorded on either side: the rules, the side it is
        issued at, and a restore running on either array."""
        name = pair.name
        states.apply(name, pair.state, event)
        if (pair.role is Role.PVOL) == (event is Event.SWAP_RESYNC):
            side = "S-VOL" if event is Event.SWAP_RESYNC else "P-VOL"
            raise PairError(f"{event.value} of pair {name!r} is issued at its {side}'s array")
        self._not_restoring(name, pair.local_name, event)
        if theirs.get("restoring"):
            raise StatusRefused(f"cannot {event.value} pair {name!r}: array "
                                f"{pair.peer.name}: {theirs['restoring']}")  # fmt: skip

    @staticmethod
    def _union(pair: RemotePair, *answers: dict[str, Any]) -> DirtyMap:
        """Both sides' changes: this side's maps and those the peer's answers carry."""
        pending = DirtyMap(pair.local.size, GRAIN)
        for diff in (pair.rec.pdiff, pair.rec.sdiff, pair.remaining()):
            if diff is not None:
                pending |= diff
        for answer in answers:
            if answer.get("changes"):
                pending |= DirtyMap.from_bytes(bytes.fromhex(answer["changes"]))
        return pending

    def delete(self, name: str) -> None:
        """Any status -> SMPL on this array, and on the peer when it can be told."""
        with self.ops:
            pair = self.pair(name)
            pair.stop_copier()
            pair.tell(Event.DELETE)
            with self.lock:
                self.forget(pair)

    def takeover(self, name: str) -> Takeover:
        """horctakeover at this array: the action is the takeover-switch table's."""
        with self.ops:
            pair = self.pair(name)
            theirs = pair.exchange()
            remote = None
            if theirs is not None:
                peer = decode_state(theirs["state"])
                remote = (peer.role_of(pair.peer.serial), peer.status_of(pair.peer.serial))
            action = states.takeover(name, pair.state, self.serial, remote)
            event = TAKEOVER_EVENT[action]
            if event in states.SWAPPING:
                pair.propose_swap(event)
            if event is not None:
                with self.lock:
                    pair.apply(event)
            if event is not None and event not in states.SWAPPING and theirs is not None:
                pair.tell(event)
            log.info("remote pair %s: takeover -> %s (%d)", name, action.name, action.value)
            return action

    # -- requests from a peer array ----------------------------------------------------------------

    def handle(self, op: str, args: dict[str, Any], peer_serial: int) -> dict[str, Any]:
        """A control request from the peer `peer_serial` (already authenticated)."""
        with self.lock:
            if op == "create":
                return self._peer_create(args, peer_serial)
            pair = self.pair(str(args["pair"]))
            if pair.peer.serial != peer_serial:
                raise PairError(f"pair {pair.name!r} is not paired with array {peer_serial}")
            if op == "describe":
                return pair.describe_for_peer()
            if op == "suspend":
                pair.apply(Event.SUSPEND_BOTH)
                return {}
            if op == "event":
                return self._peer_event(pair, args)
        raise PairError(f"unknown remote pair request {op!r}")

    @staticmethod
    def _peer_event(pair: RemotePair, args: dict[str, Any]) -> dict[str, Any]:
        """The peer applied an event; a swap also answers with the grains this side changed.
        A swap makes this side's volume the S-VOL: its host writes are drained first (the
        gate), so none is acknowledged after the changes are read and not copied over."""
        event = Event(args["event"])
        state, lineage = decode_state(args["state"]), decode_lineage(args["lineage"])
        if event not in states.SWAPPING:
            pair.on_event(event, state, lineage, bool(args.get("rw", False)))
            return {}
        with pair.local.gate.exclusive():
            changes = pair.unsynced()
            pair.on_event(event, state, lineage, False)
        return {"changes": None if changes is None else changes.to_bytes().hex()}

    def _peer_create(self, args: dict[str, Any], peer_serial: int) -> dict[str, Any]:
        name, svol = str(args["pair"]), str(args["svol"])
        sv = self.m.volume(svol)
        self._check_free(name, svol)  # the P-VOL of local pairs it may be: a cascade
        if sv.size < int(args["size"]) or sv.block_size != int(args["block_size"]):
            raise VolumeRefused(f"S-VOL {svol!r} ({sv.size} bytes, {sv.block_size}-byte blocks) "
                            f"cannot hold the P-VOL ({args['size']} bytes, "
                            f"{args['block_size']}-byte blocks)")  # fmt: skip
        if sv.base.read_only:
            raise VolumeRefused(f"S-VOL {svol!r} is a read-only backstore")
        peer = next((p for p in self.peers.values() if p.serial == peer_serial), None)
        if peer is None:
            raise PairError(f"array {peer_serial} is not a configured remote")
        st = PairState(peer_serial, self.serial, fence=Fence(args["fence"]))
        info = {"state": encode_state(st), "lineage": args["lineage"], "alone": False,
                "peer": peer.name, "peer_volume": str(args["pvol"]),
                "peer_volume_id": int(args.get("volume_id", 0))}  # fmt: skip
        rec = PairRecord(name, qualified(peer.name, str(args["pvol"])), svol, REMOTE_MU,
                         Status.SMPL, generation=0, extra={"remote": info})  # fmt: skip
        with sv.gate.exclusive():
            pair = self.adopt(rec)
            pair.apply(Event.CREATE, create=True)
        return {"volume_id": self._volume_id(svol)}

    def _volume_id(self, volume: str) -> int:
        ident = self.m.identities.get(volume)
        return ident.volume_id if ident is not None else 0

    def replica_target(self, volume: str, peer_serial: int) -> Replica:
        """The store behind `volume` for a peer's update copy: only while it is the S-VOL of
        that peer's pair in COPY or PAIR. Anything else (a taken-over S-VOL, an old primary
        writing after a swap) is refused, so no stale P side can overwrite it; each change
        is checked again under the volume's write gate, which every state change holds
        exclusively (`UpdateTarget`)."""
        return UpdateTarget(self._updated(volume, peer_serial).local,
                            functools.partial(self._updated, volume, peer_serial))  # fmt: skip

    def _updated(self, volume: str, peer_serial: int) -> RemotePair:
        """The pair whose S-VOL `volume` takes update copies from array `peer_serial`."""
        _, sec = self.m.roles(volume)
        if not isinstance(sec, RemotePair):
            raise VolumeRefused(f"{volume!r} is not the S-VOL of a remote pair")
        st = sec.state
        if st.primary != peer_serial or st.s not in (Status.COPY, Status.PAIR):
            raise StatusRefused(f"{volume!r} takes no update copies from array {peer_serial} "
                            f"({st.s.value})")  # fmt: skip
        return sec


class UpdateTarget:
    """An S-VOL as the peer's update copies write it: through the volume as a host write goes
    (`PairVolume.replicate`), so each write is marked in the volume's write-intent log first
    (after a crash of this array the regions whose acknowledged copies its cache may have lost
    are known, `RemotePair.recover_secondary`) and reaches the volume's local pairs. `admit`
    raises when the volume no longer takes them; each change calls it under the write gate,
    so none lands after a state change (a takeover) that refuses it, however long it waited
    for its turn."""

    def __init__(self, volume: PairVolume, admit: Callable[[], object]) -> None:
        self.volume = volume
        self.admit = admit

    @property
    def size(self) -> int:
        return self.volume.size

    @property
    def write_cache(self) -> bool:
        """Whether a write without FUA returns before it is durable (the link applies the
        ones that wait for the device side by side)."""
        return self.volume.write_cache

    def readinto(self, offset: int, bufs: Sequence[memoryview]) -> None:
        self.volume.base.readinto(offset, bufs)

    def write(self, offset: int, bufs: Sequence[memoryview], fua: bool = False) -> None:
        self.volume.replicate(offset, bufs, fua, self.admit)

    def unmap(self, offset: int, length: int) -> None:
        self.volume.replicate_unmap(offset, length, self.admit)

    def flush(self) -> None:
        self.volume.flush()  # and the S-VOLs of its local pairs that mirror it

    def extent_at(self, offset: int) -> Extent:
        return self.volume.base.extent_at(offset)
