"""Remote (TrueCopy) pairs under the crash model: two arrays in one process, each with its own
state directory, CrashableVolume and crashable write-intent log; a scenario of operator
commands, host writes and link cuts; one array "dies" at a fault point (a committer step, a
pair checkpoint, a log or volume I/O of that array), loses power (unsynced sectors torn), and
restarts the way the daemon does (`check_peers`); the link comes back and the pair is brought
to PAIR again.

Which array a fault point belongs to is the array whose code passes it: a thread-local stack
of serials that the loop link pushes when one array's request runs the other's code, and the
copier thread of each array. A crash of the array on the other end of a call is, to the
caller, a link that went down mid-request (LinkDown), as it is between two daemons.

Invariants, after every operation and after the crash and recovery:

- every write the host had acknowledged as durable (FUA, WCE=0, or a later SYNCHRONIZE CACHE:
  see test_crash_properties.py's `Model`) is on the volume that took it and, if it was
  mirrored in PAIR, on the S-VOL too;
- a status never goes back past an acknowledged operation: a split stays split until a resync,
  a delete never comes back, a takeover is never undone, an old primary that knows it was
  taken over is never a writable P-VOL again until `resync --swaps`;
- never two primaries: the two arrays never both hold a writable P-VOL of the pair;
- whenever both sides say PAIR (and at the end, after the resync), S == P byte for byte.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.crashmodel import SECTOR, CrashableFile, CrashableVolume
from tests.unit.remotepeers import SIZE as PEERS_SIZE
from tests.unit.remotepeers import Link, LoopPeer, LoopReplica, two_sites
from tests.unit.test_crash_properties import FAST_DIR, Model, pattern, quiet_crashes
from vscsi.durable import faults
from vscsi.durable.committer import Committer
from vscsi.durable.faults import Crash
from vscsi.pair.manager import PairManager
from vscsi.pair.states import Access, PairError, Role, Status
from vscsi.remote.pair import RemotePair
from vscsi.remote.peer import LinkDown
from vscsi.remote.states import Fence, Takeover
from vscsi.scsi.identity import Identity
from vscsi.store.base import Extent, VolumeError

SIZE = 1 << 20  # each array's volume: one write-intent log region
SECTORS = SIZE // SECTOR
NAME = "tc"
A, B = 410001, 410002  # the arrays' serials
LIVE = (Status.COPY, Status.PAIR)


# -- which array runs the code that passes a fault point ---------------------------------------

_running = threading.local()


def current() -> int:
    stack = getattr(_running, "stack", None)
    assert stack, "a fault point outside any array's code"
    return int(stack[-1])


@contextlib.contextmanager
def running(serial: int) -> Iterator[None]:
    if not hasattr(_running, "stack"):
        _running.stack = []
    _running.stack.append(serial)
    try:
        yield
    finally:
        _running.stack.pop()


class SiteFaults:
    """A fault hook that lists the points passed as (array, name) and, given `k`, kills the
    array whose code passes the k-th: that point and every later one of the same array raise
    Crash; the other array lives on."""

    def __init__(self, k: int | None = None) -> None:
        self.k = k
        self.names: list[tuple[int, str]] = []
        self.fired: tuple[int, str] | None = None
        self._lock = threading.Lock()

    @property
    def dead(self) -> int | None:
        return None if self.fired is None else self.fired[0]

    def __call__(self, name: str) -> None:
        site = current()
        with self._lock:
            if self.dead == site:
                raise Crash(f"array {site} is dead")
            if self.fired is not None:
                return  # the other array lives on
            if self.k is not None and len(self.names) == self.k:
                self.fired = (site, name)
                raise Crash(name)
            self.names.append((site, name))


_hook: SiteFaults | None = None


def is_dead(serial: int) -> bool:
    return _hook is not None and _hook.dead == serial


_run_copy = RemotePair._run_copy


def _run_copy_at_its_array(self: RemotePair, resync: Any) -> None:
    """The copier's fault points are its array's."""
    with running(self.manager.serial):
        _run_copy(self, resync)


# -- the loop link, array-aware ------------------------------------------------------------------


class CrashPeer(LoopPeer):
    """A LoopPeer whose requests run as the other array's code; if that array dies in them,
    the caller sees the link go down mid-request."""

    @contextlib.contextmanager
    def there(self) -> Iterator[None]:
        if is_dead(self.serial):
            raise LinkDown(f"array {self.serial} is down")
        try:
            with running(self.serial):
                yield
        except Crash:
            if not is_dead(self.serial):
                raise
            raise LinkDown(f"array {self.serial} died during the request") from None

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        with self.there():
            return super().call(op, **args)

    def replica(self, volume: str) -> LoopReplica:
        return CrashReplica(self, volume)


class CrashReplica(LoopReplica):
    peer: CrashPeer

    def readinto(self, offset: int, bufs: Sequence[memoryview]) -> None:
        with self.peer.there():
            super().readinto(offset, bufs)

    def write(self, offset: int, bufs: Sequence[memoryview], fua: bool = False) -> None:
        with self.peer.there():
            super().write(offset, bufs, fua)

    def flush(self) -> None:
        with self.peer.there():
            super().flush()

    def unmap(self, offset: int, length: int) -> None:
        with self.peer.there():
            super().unmap(offset, length)

    def extent_at(self, offset: int) -> Extent:
        with self.peer.there():
            return super().extent_at(offset)


# -- an array ------------------------------------------------------------------------------------


class Array:
    """One array: its volume and log (the devices, kept across restarts), its state directory
    and its current pair manager."""

    def __init__(self, root: Path, name: str, serial: int, link: Link, wc: bool) -> None:
        self.root, self.name, self.serial, self.link = root, name, serial, link
        self.vol_name = f"{name}v0"
        self.vol = CrashableVolume(SIZE, name=self.vol_name, write_cache=wc)
        self.log = CrashableFile(name=f"{self.vol_name}.wil")
        self.m: PairManager | None = None
        self.peer: CrashPeer | None = None
        self.other: Array | None = None

    def start(self) -> None:
        """The daemon's start: open the pairs (a copy a crash cut short resumes), then
        `check_peers` before serving. The daemon runs those two side by side; here the copy
        runs first, so that every play of a scenario passes the same fault points."""
        other = self.other
        assert other is not None
        log = self.log
        self.peer = CrashPeer(other.name, other.serial, self.link, self.serial)
        self.peer.target = other.m  # before the manager: it may resume a copy at once
        state = self.root / self.name
        with running(self.serial):
            self.m = PairManager(
                str(state), {self.vol_name: self.vol},
                {self.vol_name: Identity(serial=self.serial, volume_id=0x100)},
                chunk=128 << 10, checkpoint_bytes=256 << 10, checkpoint_interval=1e9,
                committer=Committer(state / "durable"), wil_file=lambda _: log,
                serial=self.serial, peers={other.name: self.peer},
                writers=0,  # the S side after the P side: the same fault points in each play
            )  # fmt: skip
            if other.m is not None:
                assert other.peer is not None
                other.peer.target = self.m
            for pair in self.m.mirrors():
                assert pair.wait(30)
            self.m.remote.check_peers()

    def die(self) -> None:
        """The process is gone: its copiers stop (at their next fault point, if it crashed)
        and the other array's link to it answers nothing."""
        if self.m is not None:
            for pair in self.m.mirrors():
                pair.stopping.set()
                pair.wait()
        self.m = None
        if self.other is not None and self.other.peer is not None:
            self.other.peer.target = None

    def power_loss(self, rng: random.Random | None) -> None:
        self.vol = self.vol.power_loss(rng)
        self.log = self.log.power_loss(rng)

    @property
    def live(self) -> PairManager:
        assert self.m is not None
        return self.m

    def pair(self) -> RemotePair | None:
        return None if self.m is None else self.m.remote.pairs.get(NAME)

    def data(self) -> bytes:
        return self.vol.read(0, SIZE)

    def writable_pvol(self) -> bool:
        pair = self.pair()
        return (pair is not None and pair.role is Role.PVOL
                and pair.access() is Access.READ_WRITE)  # fmt: skip


REFUSED = (PairError, LinkDown, VolumeError)


class Run:
    """One play of a scenario: both arrays and what the test knows of their data (`models`,
    None while a copy overwrites that side) and of the acknowledged operations (the sets and
    flags below, which `check_states` holds the arrays to)."""

    def __init__(self, root: Path, wc: bool, seed: int) -> None:
        self.link = Link()
        self.a = Array(root, "A", A, self.link, wc)
        self.b = Array(root, "B", B, self.link, wc)
        self.a.other, self.b.other = self.b, self.a
        self.wc = wc
        self.rng = random.Random(seed)
        self.models: dict[int, Model | None] = {self.a.serial: Model(SECTORS),
                                                self.b.serial: Model(SECTORS)}  # fmt: skip
        self.wid = 0
        self.primary = self.a  # the array holding the P-VOL as acknowledged operations left it
        self.paired_at: set[int] = set()  # the create reached it: a pair until a delete
        self.split_at: set[int] = set()  # split acknowledged, seen PSUS/SSUS: not LIVE again
        self.deleted_at: set[int] = set()  # the delete reached it: never a pair again
        self.ssws_at: int | None = None  # an SVOL-takeover acknowledged: SSWS until swapped
        self.old_primary_knows = False  # ... and the old primary was told or restarted
        self.inflight: tuple | None = None  # the operation a crash interrupted
        self.unsure = False  # which array is the P side is not known until the arrays talk
        self.marks: list[int] = []  # the fault points passed before each operation

    @property
    def arrays(self) -> tuple[Array, Array]:
        return self.a, self.b

    def alive(self) -> list[Array]:
        return [x for x in self.arrays if x.m is not None and not is_dead(x.serial)]

    def secondary(self) -> Array:
        return self.b if self.primary is self.a else self.a

    def start(self) -> None:
        self.a.start()
        self.b.start()

    # -- operations -----------------------------------------------------------------------------

    def apply(self, op: tuple) -> None:
        getattr(self, f"op_{op[0]}")(*op[1:])
        self.settle()

    def at(self, array: Array, call: Callable[[], Any]) -> Any:
        """An operator command at `array`; None when refused (PairError, link down)."""
        if array.m is None:
            return None
        with running(array.serial):
            try:
                return call() or True
            except REFUSED:
                return None

    def op_create(self, fence: str) -> None:
        """Models a copy overwrites are void before the command: a crash may leave it half
        done."""
        p, s = self.primary, self.secondary()
        self.models[s.serial] = None
        if self.at(p, lambda: p.live.remote.create(NAME, p.vol_name, f"{s.name}:{s.vol_name}",
                                                   Fence(fence))):  # fmt: skip
            self.paired_at = {x.serial for x in self.alive() if x.pair() is not None}

    def op_write(self, side: str, first: int, n: int, fua: bool) -> None:
        """A host write at the P-VOL's array ("p") or the S-VOL's ("s"); refused when the
        volume is read only there. Mirrored writes are on the S side's model too."""
        x = self.primary if side == "p" else self.secondary()
        if x.m is None:
            return
        n = min(n, SECTORS - first)
        self.wid += 1
        wid = self.wid
        data = b"".join(pattern(wid, s) for s in range(first, first + n))
        peer = self.secondary() if x is self.primary else self.primary
        pair = x.pair()
        mirrored = pair is not None and pair.role is Role.PVOL and pair.status in LIVE
        targets = [self.models[x.serial]]
        if mirrored:
            targets.append(self.models[peer.serial])
        for m in targets:
            if m is not None:
                m.issued(wid, first, n)
        with running(x.serial):
            try:
                x.live.volume(x.vol_name).write(first * SECTOR, [memoryview(data)], fua)
            except REFUSED:
                return
        if mirrored and (pair.status not in LIVE or pair.role is not Role.PVOL):
            targets.pop()  # the update copy failed: on the S side maybe, maybe not
        for m in targets:
            if m is not None:
                m.acknowledged(wid, first, n, fua or not self.wc)

    def op_flush(self, side: str) -> None:
        x = self.primary if side == "p" else self.secondary()
        if x.m is None:
            return
        pair = x.pair()
        mirrored = pair is not None and pair.role is Role.PVOL and pair.status in LIVE
        with running(x.serial):
            try:
                x.live.volume(x.vol_name).flush()
            except REFUSED:
                return
        done = [x.serial]
        if mirrored and pair.status in LIVE:
            done.append(self.secondary().serial if x is self.primary else self.primary.serial)
        for serial in done:
            m = self.models[serial]
            if m is not None:
                m.flushed()

    def op_cut(self) -> None:
        self.link.up = False

    def op_heal(self) -> None:
        self.link.up = True

    def op_split(self, rw: bool) -> None:
        p = self.primary
        if self.at(p, lambda: p.live.remote.split(NAME, rw=rw)):
            self.split_at = {
                x.serial
                for x in self.alive()
                if (pr := x.pair()) and pr.status in (Status.PSUS, Status.SSUS)
            }

    def op_resync(self) -> None:
        p = self.primary
        pair = p.pair()
        if pair is None or pair.status not in (Status.PSUS, Status.PSUE):
            return
        self.split_at = set()
        self.models[self.secondary().serial] = None
        self.at(p, lambda: p.live.remote.resync(NAME))

    def op_takeover(self) -> None:
        s = self.secondary()
        action = self.at(s, lambda: s.live.remote.takeover(NAME))
        if action is Takeover.SWAP:
            self.primary = s
            self.split_at = set()
        elif action in (Takeover.SVOL_SSUS, Takeover.SVOL_E):
            self.ssws_at = s.serial
            self.old_primary_knows = action is Takeover.SVOL_SSUS

    def op_swaps(self) -> None:
        s = self.secondary()
        pair = s.pair()
        if pair is None or pair.status not in (Status.SSWS, Status.SSUS):
            return
        self.models[self.primary.serial] = None
        self.split_at = set()
        if self.at(s, lambda: s.live.remote.resync(NAME, swaps=True)):
            self.primary = s
            self.ssws_at = None
            self.old_primary_knows = False

    def op_delete(self) -> None:
        p = self.primary
        self.paired_at = set()
        if self.at(p, lambda: p.live.remote.delete(NAME)):
            self.deleted_at = {x.serial for x in self.alive() if x.pair() is None}

    def op_exchange(self, side: str) -> None:
        """What the daemon's periodic exchange does."""
        x = self.primary if side == "p" else self.secondary()
        pair = x.pair()
        if pair is None:
            return
        with running(x.serial), x.live.remote.lock:
            try:
                theirs = pair.exchange()
            except REFUSED:
                return
        if theirs is not None and x is self.primary and self.ssws_at is not None:
            self.old_primary_knows = True

    def op_kill(self, side: str, tear: bool) -> None:
        """SIGKILL and a power loss between commands, then a restart."""
        x = self.primary if side == "p" else self.secondary()
        if x.m is None:
            return
        self.restart(x, tear)

    # -- the checks -----------------------------------------------------------------------------

    def settle(self) -> None:
        """Let every copy end, then check what must hold between commands."""
        for x in self.alive():
            for pair in x.live.mirrors():
                assert pair.wait(30)
        self.check_states()
        self.check_mirror()

    def check_states(self) -> None:
        alive = self.alive()
        for x in alive:
            pair = x.pair()
            if x.serial in self.deleted_at:
                assert pair is None, f"array {x.name}: the deleted pair came back"
                continue
            if pair is None:
                assert x.serial not in self.paired_at, f"array {x.name}: the pair vanished"
                continue
            if x.serial in self.split_at:
                assert pair.status not in LIVE, f"array {x.name}: the split pair is {pair.status}"
            if self.ssws_at == x.serial and not self.unsure:
                assert pair.status is Status.SSWS, f"takeover undone on {x.name}: {pair.status}"
            if x is self.primary and not self.unsure:
                assert pair.role is Role.PVOL, f"array {x.name}: the P-VOL became {pair.role}"
        if len(alive) == 2:
            assert not (self.a.writable_pvol() and self.b.writable_pvol()), "two primaries"
        old = self.primary
        if self.ssws_at is not None and self.old_primary_knows and old.m is not None:
            assert not old.writable_pvol(), f"old primary {old.name} writable after a takeover"

    def check_mirror(self) -> None:
        """Both sides PAIR: S == P; a side whose model a copy voided gets one back from it."""
        if len(self.alive()) < 2:
            return
        pa, pb = self.a.pair(), self.b.pair()
        if pa is None or pb is None or pa.status is not Status.PAIR or pb.status is not Status.PAIR:
            return
        p, s = (self.a, self.b) if pa.role is Role.PVOL else (self.b, self.a)
        assert p.data() == s.data(), "S != P in PAIR"
        if self.models[s.serial] is None:
            model = Model(SECTORS)
            model.settled(s.data())  # the copy's end flushed the S-VOL
            self.models[s.serial] = model

    # -- crash and recovery ----------------------------------------------------------------------

    def restart(self, x: Array, tear: bool) -> None:
        """`x` is dead: it loses power; what it held durably must include every acknowledged
        durable write; then it starts again."""
        x.die()
        x.power_loss(self.rng if tear else None)
        model = self.models[x.serial]
        if model is not None:
            model.check(x.vol.durable())
            model.settled(x.vol.durable())
        if x is self.primary and self.ssws_at is not None:
            self.old_primary_knows = True  # it restarts fenced: it must not write alone
        x.start()

    def recover(self, dead: int | None, tear: bool) -> None:
        """After the scenario: the dead array (if any) restarts, the link comes back, both
        sides exchange, and the pair is brought back to PAIR; then S == P and P holds every
        durable write."""
        self.unsure = self.inflight is not None and self.inflight[0] in ("takeover", "swaps")
        for x in self.arrays:
            if x.serial == dead or x.m is None:
                self.restart(x, tear)
        self.settle()
        self.link.up = True
        for x in (self.a, self.b, self.a):
            self.op_exchange("p" if x is self.primary else "s")
            self.settle()
        self.observe_inflight()
        self.unsure = False
        self.settle()
        self.resume()
        self.final_check()

    def observe_inflight(self) -> None:
        """A takeover or resync --swaps the crash interrupted may or may not have happened:
        which array is the P side is then what the restarted arrays say."""
        op = self.inflight
        if op is None or op[0] not in ("takeover", "swaps"):
            return
        s = self.secondary()
        pair = s.pair()
        if pair is None:
            return
        if pair.role is Role.PVOL:
            self.primary = s
            self.split_at = set()
            self.ssws_at = None
            self.old_primary_knows = False
        elif pair.status is Status.SSWS and op[0] == "takeover":
            self.ssws_at = s.serial
            self.old_primary_knows = True  # the restart or the next exchange tells it

    def resume(self) -> None:
        p, s = self.primary, self.secondary()
        ps, ss = p.pair(), s.pair()
        if ps is None or ss is None:
            return
        if ss.status is Status.SSWS:
            self.apply(("swaps",))
            p, s = self.primary, self.secondary()
            ps, ss = p.pair(), s.pair()
            assert ps is not None and ss is not None
        if ps.status in (Status.PSUS, Status.PSUE):
            with running(p.serial):
                p.live.remote.resync(NAME)
            self.split_at = set()
            self.models[s.serial] = None
            self.settle()
        assert (ps.status, ss.status) == (Status.PAIR, Status.PAIR), (ps.status, ss.status)

    def final_check(self) -> None:
        p, s = self.primary, self.secondary()
        if p.pair() is not None and s.pair() is not None:
            assert p.data() == s.data(), "S != P after the resync"
        model = self.models[p.serial]
        if model is not None:
            model.check(p.data())


@contextlib.contextmanager
def hooked(hook: SiteFaults) -> Iterator[None]:
    global _hook
    _hook = hook
    try:
        with faults.installed(hook), mock.patch.object(RemotePair, "_run_copy",
                                                       _run_copy_at_its_array):  # fmt: skip
            yield
    finally:
        _hook = None


def play(ops: list[tuple], hook: SiteFaults, root: Path, wc: bool, tear: bool) -> Run:
    """Play `ops` with `hook` at every fault point until an array dies; then, without the
    hook, recover and check."""
    run = Run(root, wc, seed=len(ops))
    run.start()
    with hooked(hook):
        for op in ops:
            run.marks.append(len(hook.names))
            run.inflight = op
            try:
                run.apply(op)
            except Crash:
                assert hook.dead is not None
            if hook.dead is None:
                run.inflight = None
            else:
                break  # the operation may or may not have taken effect
        for x in run.arrays:
            if x.serial == hook.dead:
                x.die()
    try:
        run.recover(hook.dead, tear)
    finally:
        for x in run.arrays:
            if x.m is not None:
                x.m.close()
    return run


def crash_everywhere(
    ops: list[tuple], ks: Callable[[int], list[int]], wc: bool, tear: bool
) -> list[tuple[int, str]]:
    """Play `ops` once listing its fault points and recover; then again for each point
    `ks(count)` chooses, the array passing it dying there. Returns the points."""
    with tempfile.TemporaryDirectory(dir=FAST_DIR) as tmp:
        rec = SiteFaults()
        play(ops, rec, Path(tmp) / "all", wc, tear)
        for k in ks(len(rec.names)):
            hook = SiteFaults(k)
            try:
                play(ops, hook, Path(tmp) / f"k{k}", wc, tear)
            except AssertionError as e:
                raise AssertionError(f"array {hook.fired} died at point {k}: {e}") from e
            assert hook.fired == rec.names[k], (k, hook.fired, rec.names[k])
        return rec.names


_sector = st.integers(0, SECTORS - 1)
_side = st.sampled_from(["p", "s"])
_write = st.tuples(st.just("write"), _side, _sector, st.integers(1, 400), st.booleans())
OPS = st.one_of(
    _write,
    _write,
    _write,
    st.tuples(st.just("flush"), _side),
    st.just(("cut",)),
    st.just(("heal",)),
    st.just(("heal",)),
    st.tuples(st.just("split"), st.booleans()),
    st.just(("resync",)),
    st.just(("takeover",)),
    st.just(("swaps",)),
    st.just(("delete",)),
    st.tuples(st.just("exchange"), _side),
    st.tuples(st.just("kill"), _side, st.booleans()),
)


@settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    ops=st.lists(OPS, max_size=12),
    fence=st.sampled_from(["never", "data"]),
    wc=st.booleans(),
    tear=st.booleans(),
    data=st.data(),
)
def test_remote_pair_keeps_data_and_status_across_a_crash_of_either_array(
    ops: list[tuple], fence: str, wc: bool, tear: bool, data: st.DataObject
) -> None:
    def some(n: int) -> list[int]:
        return data.draw(st.lists(st.integers(0, n - 1), max_size=3, unique=True)) if n else []

    with quiet_crashes():
        crash_everywhere([("create", fence), *ops], some, wc, tear)


# mirror, a link cut under writes (fence never: P alone), resync, split --rw with S writes,
# resync, swap-takeover, writes at the new P, SVOL-takeover with the old P unreachable, its
# writes, resync --swaps, delete: each array dies at each of its fault points
SCENARIO = [
    ("create", "never"),
    ("write", "p", 0, 300, False),
    ("flush", "p"),
    ("cut",),
    ("write", "p", 500, 40, True),
    ("heal",),
    ("resync",),
    ("split", True),
    ("write", "s", 1000, 30, False),
    ("resync",),
    ("write", "p", 9, 9, False),
    ("takeover",),
    ("write", "p", 100, 50, True),
    ("cut",),
    ("takeover",),
    ("write", "s", 1500, 20, True),
    ("heal",),
    ("exchange", "p"),
    ("swaps",),
    ("write", "p", 200, 8, False),
    ("delete",),
]


def test_remote_pair_crashed_at_every_fault_point_of_a_scenario() -> None:
    with quiet_crashes():
        names = crash_everywhere(SCENARIO, lambda n: list(range(n)), True, True)
    assert len(names) > 100  # both arrays' committers, checkpoints, logs and volumes
    assert {site for site, _ in names} == {A, B}
    assert {n.split(".")[0] for _, n in names} >= {"commit", "pair", "wil", "Av0", "Bv0"}


# -- regressions: each bug the tests above found, at the point that showed it ------------------


def crash_in(ops: list[tuple], op: int, site: int, name: str, wc: bool = True) -> Run:
    """Play `ops`, the array `site` dying at the first `name` it passes in operation `op`;
    recover and check (a plain play when `site` is 0)."""
    with tempfile.TemporaryDirectory(dir=FAST_DIR) as tmp, quiet_crashes():
        rec = SiteFaults()
        run = play(ops, rec, Path(tmp) / "all", wc, True)
        if not site:
            return run
        end = run.marks[op + 1] if op + 1 < len(run.marks) else len(rec.names)
        k = rec.names.index((site, name), run.marks[op], end)
        return play(ops, SiteFaults(k), Path(tmp) / "k", wc, True)


def test_a_delete_reaches_the_s_side() -> None:
    run = crash_in([("create", "never"), ("delete",)], 0, 0, "")
    assert run.deleted_at == {A, B}


def test_a_p_side_restarted_with_writes_in_flight_copies_them_and_is_pair_again() -> None:
    """The recover copy (PAIR -> COPY on the P side only) must be able to end."""
    run = crash_in([("create", "never"), ("write", "p", 0, 8, False), ("kill", "p", True)], 0, 0,
                   "")  # fmt: skip
    assert run.a.pair() is not None and run.a.pair().status is Status.PAIR


def test_a_copy_the_s_side_refuses_suspends_the_pair() -> None:
    """The P side dies after recording a resync, before telling the S side (still SSUS): at
    its restart the copier is refused and must suspend the pair, not stop in COPY."""
    ops = [("create", "never"), ("split", True), ("write", "s", 1000, 30, False), ("resync",)]
    crash_in(ops, 3, A, "commit.renamed")


def test_a_swap_takeover_cut_short_never_leaves_two_primaries() -> None:
    """The S side dies after recording a swap-takeover: the old P side must not stay a
    writable P-VOL next to it."""
    ops = [("create", "never"), ("write", "p", 0, 8, False), ("takeover",)]
    crash_in(ops, 2, B, "commit.renamed")


def test_a_p_side_whose_peer_deleted_the_pair_starts_fenced() -> None:
    """The delete reached the S side, the P side died before its own tombstone: its restart
    must not fail on the peer's refusal."""
    run = crash_in([("create", "never"), ("delete",)], 1, A, "commit.written")
    pair = run.a.pair()
    assert pair is None or pair.access() is Access.READ_ONLY


def test_an_old_primary_told_of_a_takeover_is_demoted_at_once() -> None:
    """P suspended (its flush could not reach S), then an SVOL-takeover with the link back:
    the told P side must refuse writes at once, not at the next exchange."""
    crash_in([("create", "never"), ("cut",), ("flush", "p"), ("heal",), ("takeover",)], 0, 0, "")


def test_a_copy_suspended_under_the_copier_is_copied_in_full_by_the_resync(
    tmp_path: Path,
) -> None:
    """The S side restarts suspended (its log) while the P side's copy is paused between
    chunks; the exchange suspends the P side with most of the copy still to do. The resync
    must copy that too, not only the sides' changes."""
    a, b, _ = two_sites(tmp_path)
    a.crash()
    ma = a.start(b, copy_rate=64 << 10)  # a pause of seconds after each chunk
    a.vols["Av0"].write(0, [memoryview(os.urandom(PEERS_SIZE))])
    ma.remote.create("tc", "Av0", "B:Bv0", Fence.NEVER)
    pa = ma.remote.pair("tc")
    deadline = time.monotonic() + 10
    while (left := pa.remaining()) is not None and left.dirty_bytes() == PEERS_SIZE:
        assert time.monotonic() < deadline, "the copy did not start"
        time.sleep(0.01)
    b.crash()
    mb = b.start(a)
    assert mb.remote.pair("tc").status is Status.PSUE
    assert pa.exchange() is not None and pa.status is Status.PSUE
    pa.stop_copier()
    ma.resync_settings = dataclasses.replace(ma.resync_settings, copy_rate=0)
    ma.remote.resync("tc")
    assert pa.wait(10) and pa.status is Status.PAIR
    assert a.vols["Av0"].data == b.vols["Bv0"].data
    ma.close()
    mb.close()


def test_a_p_side_that_missed_a_takeover_cannot_undo_it() -> None:
    """The S side took over while the link was down; back on the link, the old P side's
    resync (and split) must be refused, not turn the SSWS S-VOL back into a copy target."""
    crash_in([("create", "never"), ("cut",), ("flush", "p"), ("takeover",), ("heal",),
              ("resync",), ("split", False)], 0, 0, "")  # fmt: skip
