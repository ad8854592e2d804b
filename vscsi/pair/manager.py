"""`PairManager`: every pair of a daemon's volumes — the operations (create, split, resync,
restore, delete), crash recovery, the durable records and the host's view (pairdisplay, VPD
page 0xC0)."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from vscsi.durable.committer import Committer
from vscsi.durable.faults import fault_point
from vscsi.pair.mirror import Mirror
from vscsi.pair.pair import Pair
from vscsi.pair.persist import PairRecord, PairStore
from vscsi.pair.replica import LocalReplica, Replica
from vscsi.pair.states import (
    Access,
    Event,
    NoSuchPair,
    PairError,
    Role,
    Status,
    StatusRefused,
    VolumeRefused,
    access,
    copying,
    next_status,
)
from vscsi.pair.volume import GRAIN, PairVolume
from vscsi.pair.vpd import PAGE_CODE, SlotInfo, build_page
from vscsi.remote.manager import RemotePairs
from vscsi.remote.pair import RemotePair
from vscsi.remote.peer import Peer
from vscsi.resync.engine import Settings
from vscsi.scsi.identity import Identity
from vscsi.store.base import Volume, VolumeError
from vscsi.store.fanout import DEFAULT_WORKERS
from vscsi.tracker import DirtyMap, InvalidLogError
from vscsi.tracker.wil import LogFile

log = logging.getLogger(__name__)

MUS = 3
PAIR_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}$")

ChangeHook = Callable[[str], None]
_RESTRICTION = [Access.READ_WRITE, Access.READ_ONLY, Access.NO_WRITES, Access.NO_ACCESS]


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
        wil_idle: float = 5.0,  # md's bitmap delay: a region written every few seconds stays
        # marked, so its writes take the compiled path, not a mark and a flush each time
        copy_rate: int = 0,
        checkpoint_interval: float = 1.0,
        committer: Committer | None = None,
        wil_file: Callable[[str], LogFile] | None = None,
        serial: int = 0,
        peers: Mapping[str, Peer] | None = None,
        writers: int = DEFAULT_WORKERS,
    ) -> None:
        self.store = PairStore(state_dir, committer)  # the state dir's committer, if shared
        # a crash-model test's write-intent log file per volume name; their cleaners then run
        # only when the test calls flush_idle, so every run passes the same fault points
        self.wil_file = wil_file
        self.identities = dict(identities)
        self.on_change = on_change
        self.replica_factory = replica_factory
        self.chunk = chunk
        self.wil_idle = wil_idle
        self.writers = writers  # threads per P-VOL writing its S-VOLs; 0: after the P-VOL
        self.checkpoint_interval = checkpoint_interval  # a restart loses at most this much copy
        self.resync_settings = Settings(
            chunk=chunk,
            grain=GRAIN,
            copy_rate=copy_rate,
            checkpoint_bytes=checkpoint_bytes,
            checkpoint_interval=checkpoint_interval,
        )
        self.lock = threading.RLock()  # serialises operator commands
        self.serial = serial  # this array's serial: remote pairs tell their sides by it
        self.pairs: dict[str, Pair] = {}  # local (ShadowImage) pairs
        self.remote = RemotePairs(self, serial, peers or {})  # remote (TrueCopy) pairs
        self._roles: dict[str, tuple[list[Mirror], Mirror | None]] = {}
        self.volumes = {name: PairVolume(v, self) for name, v in volumes.items()}
        for rec in self.store.load_all():
            if "remote" in rec.extra:
                self.remote.adopt(rec)
            else:
                self._adopt(rec)
        for pv in self.volumes.values():
            self._recover(pv)
        for mirror in self.mirrors():
            if mirror.status in (Status.COPY, Status.RCPY) and mirror.copies_here:
                mirror.start_copier()

    # -- lookups --------------------------------------------------------------------------------

    def volume(self, name: str) -> PairVolume:
        """The volume to put under the LUN of `name` (every managed volume is wrapped)."""
        try:
            return self.volumes[name]
        except KeyError:
            raise NoSuchPair(f"no volume {name!r}: configure it first") from None

    def pair(self, name: str) -> Pair:
        try:
            return self.pairs[name]
        except KeyError:
            raise NoSuchPair(f"no pair {name!r}: see pair display") from None

    def mirrors(self) -> list[Mirror]:
        """Every pair, local and remote."""
        return [*self.pairs.values(), *self.remote.pairs.values()]

    def pairs_of(self, volume: str) -> list[Mirror]:
        return [p for p in self.mirrors() if volume in (p.rec.pvol, p.rec.svol)]

    def roles(self, volume: str) -> tuple[list[Mirror], Mirror | None]:
        """(pairs where `volume` is the P-VOL, the pair where it is the S-VOL or None).
        Cached: every host command asks, and pairs come and go only by create, delete and
        a remote swap."""
        cache = self._roles  # this snapshot: an answer computed before a change lands in it
        cached = cache.get(volume)
        if cached is None:
            every = self.mirrors()
            prim = [p for p in every if p.rec.pvol == volume]
            sec = next((p for p in every if p.rec.svol == volume), None)
            cached = cache[volume] = (prim, sec)
        return cached

    def roles_changed(self) -> None:
        """After the pairs changed: a new cache (never clear the old one in place, a
        command may be filling it with an answer from before the change)."""
        self._roles = {}

    _pairs_changed = roles_changed

    def access(self, volume: str) -> Access:
        """The most restrictive of what each pair of the volume allows."""
        prim, sec = self.roles(volume)
        allowed = [self._access(p, volume) for p in (*prim, *([sec] if sec else []))]
        return max(allowed, key=_RESTRICTION.index, default=Access.READ_WRITE)

    @staticmethod
    def _access(pair: Mirror, volume: str) -> Access:
        if isinstance(pair, RemotePair):
            return pair.access()
        if pair.rec.svol == volume:
            return access(Role.SVOL, pair.status, pair.rec.split_read_only)
        return access(Role.PVOL, pair.status)

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
            with self.remote.lock, p.gate.exclusive(), s.gate.exclusive():
                self.remote.allow_local(pvol, name, Event.CREATE)
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
        if isinstance(sec, Pair):
            raise PairError(f"{p.name!r} is an S-VOL of pair {sec.name!r}: local pairs "
                            f"cascade only from a volume of a remote pair")  # fmt: skip
        if any(x.status is Status.RCPY for x in prim):
            raise StatusRefused(f"{p.name!r} is being restored: wait for the restore to end")
        if any(x.rec.mu == mu for x in prim):
            raise VolumeRefused(f"MU#{mu} of {p.name!r} is in use: pick a free MU")
        if self.pairs_of(s.name):
            raise VolumeRefused(f"{s.name!r} is not simplex: delete its pair first")
        if s.size < p.size or s.block_size != p.block_size:
            raise VolumeRefused(
                f"S-VOL {s.name!r} ({s.size} bytes, {s.block_size}-byte blocks) cannot hold "
                f"P-VOL {p.name!r} ({p.size} bytes, {p.block_size}-byte blocks)"
            )
        if s.base.read_only:
            raise VolumeRefused(f"S-VOL {s.name!r} is a read-only backstore")

    def split(self, name: str, read_only: bool = False) -> None:
        """PAIR -> PSUS at one instant: writes are quiesced while the status flips."""
        with self.lock:
            pair = self.pair(name)
            next_status(name, pair.status, Event.SPLIT)
            size = pair.p.size
            with self.remote.lock, self._quiesced(pair):
                self.remote.allow_local(pair.rec.pvol, name, Event.SPLIT)
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
            others = [o for o in self.roles(pair.rec.pvol)[0] if isinstance(o, Pair)]
            others.remove(pair)
            for other in others:
                if other.status is Status.RCPY or (
                    event is Event.RESTORE and other.status in (Status.COPY, Status.PAIR)
                ):
                    raise StatusRefused(
                        f"cannot {event.value} pair {name!r}: pair {other.name!r} of the same "
                        f"P-VOL is {other.status.value}; split it or wait for its copy"
                    )
            with self.remote.lock, self._quiesced(pair):
                self.remote.allow_local(pair.rec.pvol, name, event)
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
        """A restore rewrote P-VOL grains: the P-VOL's other (split) pairs now differ there,
        and its remote pair has a change made on this array alone (see `cascade`)."""
        for other in self._beside(pair):
            if isinstance(other, RemotePair):
                other.changed_here(offset, length)
            elif other.rec.pdiff is not None:
                other.rec.pdiff.mark(offset, length)

    def save_restore_marks(self, pair: Pair) -> None:
        """Make the marks `restored` left on the P-VOL's other pairs durable (before the
        restoring pair's record may say the grains are restored)."""
        for other in self._beside(pair):
            other.save()

    def _beside(self, pair: Pair) -> list[Mirror]:
        """The other pairs of `pair`'s P-VOL: its local pairs and its remote pair, either side."""
        prim, sec = self.roles(pair.rec.pvol)
        remote = [sec] if isinstance(sec, RemotePair) else []
        return [o for o in (*prim, *remote) if o is not pair]

    def restoring(self, volume: str) -> Pair | None:
        """The local pair restoring `volume` (RCPY), if any."""
        prim = self.roles(volume)[0]
        return next((p for p in prim if isinstance(p, Pair) and p.status is Status.RCPY), None)

    def wait(self, name: str, timeout: float | None = None) -> bool:
        """Wait for the pair's copy (COPY/RCPY) to end; True when none is running."""
        return self.any_pair(name).wait(timeout)

    @contextmanager
    def _quiesced(self, pair: Pair) -> Iterator[None]:
        with pair.p.gate.exclusive(), pair.s.gate.exclusive():
            yield

    # -- display and host view ---------------------------------------------------------------

    def display(self, name: str | None = None) -> list[dict[str, Any]]:
        """pairdisplay as dicts (for --json): one per pair, both sides."""
        if name is not None:
            return [self._describe(self.any_pair(name))]
        return [self._describe(p) for p in self.mirrors()]

    def any_pair(self, name: str) -> Mirror:
        """A local or remote pair by name."""
        if name in self.remote.pairs:
            return self.remote.pairs[name]
        return self.pair(name)

    def _describe(self, pair: Mirror) -> dict[str, Any]:
        rec = pair.rec
        d = {
            "pair": rec.name,
            "mu": rec.mu,
            "status": rec.status.value,
            "progress": pair.progress(),
            "copy_total": rec.copy_total,  # bytes the last create/resync/restore set out to copy
            "copied": pair.copy.moved if pair.copy else 0,  # bytes the latest copy moved
            "skipped": pair.copy.skipped if pair.copy else 0,  # bytes it left (holes on both)
            "generation": rec.generation,
            "split_read_only": rec.split_read_only,
        }
        if isinstance(pair, RemotePair):
            return {**d, **pair.describe()}
        return {
            **d,
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
            "pairs": [self._describe(p) for p in ([sec] if sec else []) + prim],  # a cascade
            **self._identity(self.identities.get(volume, Identity())),
            **self.store.notes().get(volume, {}),
        }

    def vpd_page(self, volume: str) -> bytes:
        """Vendor VPD page 0xC0 of `volume` (whole page, header included): the remote pair
        in the HORC slot, local pairs in their MU# slots."""
        ident = self.identities.get(volume, Identity())
        prim, sec = self.roles(volume)
        slots: dict[int, SlotInfo] = {}
        remote = None
        for pair in [*prim, *([sec] if sec else [])]:
            if isinstance(pair, RemotePair):
                remote = pair.slot()
                continue
            if isinstance(sec, Pair) and pair is not sec:
                continue  # an S-VOL shows the pair it is the S-VOL of
            rec = pair.rec
            partner = rec.svol if rec.pvol == volume else rec.pvol
            pid = self.identities.get(partner, Identity())
            slots[rec.mu] = SlotInfo(
                Role.SVOL if pair is sec else Role.PVOL,
                rec.status,
                pair.progress(),
                pid.serial,
                pid.volume_id,
                rec.generation,
                rec.split_read_only,
            )
        return build_page(ident.serial, ident.volume_id, ident.port, slots, remote)

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
                if isinstance(pair, RemotePair):
                    pair.recover_primary(regions)
                else:
                    self._recover_primary(pair, regions)
            if isinstance(sec, RemotePair):
                sec.recover_secondary(regions)
            elif sec is not None and sec.rec.sdiff is not None:
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
        self.remote.close()
        with self.lock:
            for pair in self.mirrors():
                pair.stop_copier()
            for pv in self.volumes.values():
                if not pv.owns_wil:
                    continue  # a shadow set's: the set clears and closes it when it closes
                try:
                    pv.wil.close()
                except Exception as e:  # its regions stay marked: the next start recovers them
                    log.error("%s: write-intent log not cleared: %s", pv.name, e)
            for pair in self.mirrors():
                try:
                    pair.checkpoint()
                except (OSError, VolumeError) as e:  # the last durable record stands
                    log.error("pair %s: final checkpoint failed: %s", pair.name, e)
            for pv in self.volumes.values():
                pv.fanout.close()
                pv.base.close()
