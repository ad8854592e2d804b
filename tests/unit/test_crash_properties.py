"""Shadow sets and pairs under the crash model: random operations, a crash at a fault point, a
power loss that tears what was not durable, a reopen from the surviving volumes.

A shadow set must then still hold every write it acknowledged as durable, its full members
must be identical (checked after every operation too), its generation must not go back, and no
stale member may serve. A pair's status must not be older than the last operation acknowledged
(a split is never PAIR again, a delete never comes back, a finished restore never resumes), its
P-VOL must hold every durable write, and a resync must make S == P byte for byte.

"Acknowledged durable" is SCSI's rule (SBC-4, 4.15 and SYNCHRONIZE CACHE): a WRITE that
completed is durable if it had FUA set or the write cache was disabled (WCE=0); otherwise it
becomes durable when a SYNCHRONIZE CACHE that was issued after it completed has completed. A
write that did not complete (in flight at the crash, or failed) and a completed write not yet
covered that way may or may not be found afterwards, each 512-byte sector on its own (a
power loss tears writes at sector granularity, never within a sector). The model below keeps,
per sector, the contents a read may return: the last acknowledged-durable write (or what a
check saw last) and every write issued after it.

The committer's files are real files: a commit counts as durable once renamed (the model does
not lose directory entries). Every run of a scenario passes the same fault points in the same
order: the write-intent log's cleaner runs only when an operation calls it, and the test waits
for the set's worker after every operation, so the worker runs only while the test waits.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.crashmodel import SECTOR, CrashableFile, CrashableVolume, CrashAt, Recorder
from tests.unit.pairvolumes import identities
from vscsi.durable import faults
from vscsi.durable.committer import Committer
from vscsi.durable.faults import Crash
from vscsi.pair.manager import PairManager
from vscsi.pair.states import Status
from vscsi.shadow import AREA, ShadowSet, Tuning
from vscsi.shadow.control import read_block
from vscsi.shadow.states import MemberState
from vscsi.store.base import VolumeError

SIZE = 512 << 10  # of the virtual unit
SECTORS = SIZE // SECTOR
GRAIN = 64 << 10
CHUNK = 128 << 10
# members written in turn (writers=0): every play of a scenario passes the same fault points in
# the same order; `test_a_crash_with_...` covers the states only writes side by side reach
TUNING = Tuning(
    grain=GRAIN,
    chunk=CHUNK,
    log_region=CHUNK,
    log_idle=3600.0,
    checkpoint_bytes=2 * CHUNK,
    writers=0,
)
# the state directories: the committer's fsyncs on a disk would cost more than all the rest
FAST_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else None
LATER = 1e12  # a flush_idle `now` at which every idle region of the log qualifies
FULL, COPYING = MemberState.FULL.value, MemberState.COPY_TARGET.value
REMOVED, STALE = MemberState.REMOVED.value, MemberState.STALE.value


def pattern(wid: int, sector: int) -> bytes:
    """Sector `sector` as write `wid` leaves it (write 0: the zeroes the set was created with)."""
    return bytes(SECTOR) if wid == 0 else struct.pack("<QQ", wid, sector) * (SECTOR // 16)


def identify(raw: bytes, sector: int) -> int:
    """The write whose data sector `sector` holds; -1 for anything no write put there."""
    wid = struct.unpack_from("<Q", raw)[0]
    return wid if raw == pattern(wid, sector) else -1


class Model:
    """Per sector: `base`, what may be there durably, and `pending`, the writes issued since
    ([write id, acknowledged])."""

    def __init__(self, sectors: int = SECTORS) -> None:
        self.base: list[set[int]] = [{0} for _ in range(sectors)]
        self.pending: list[list[list[int | bool]]] = [[] for _ in range(sectors)]

    def issued(self, wid: int, first: int, n: int) -> None:
        for s in range(first, first + n):
            self.pending[s].append([wid, False])

    def acknowledged(self, wid: int, first: int, n: int, durable: bool) -> None:
        for s in range(first, first + n):
            if durable:
                self.base[s], self.pending[s] = {wid}, []
            else:
                next(p for p in self.pending[s] if p[0] == wid)[1] = True

    def flushed(self) -> None:
        """A SYNCHRONIZE CACHE completed: every acknowledged write issued before it is durable
        (a write that failed after the last of them may still be there, or not)."""
        for s, pending in enumerate(self.pending):
            acked = [i for i, (_, ok) in enumerate(pending) if ok]
            if acked:
                self.base[s] = {int(w) for w, _ in pending[acked[-1] :]}
            else:
                self.base[s] |= {int(w) for w, _ in pending}
            self.pending[s] = []

    def candidates(self, s: int) -> set[int]:
        return self.base[s] | {int(w) for w, _ in self.pending[s]}

    def check(self, data: bytes, first: int = 0) -> None:
        for i in range(len(data) // SECTOR):
            s = first + i
            got = identify(data[i * SECTOR : (i + 1) * SECTOR], s)
            assert got in self.candidates(s), (
                f"sector {s} holds write {got}; possible: {sorted(self.candidates(s))}"
            )

    def settled(self, data: bytes) -> None:
        """A check read the whole set after recovery: what it saw is durable now."""
        for s in range(len(self.base)):
            self.base[s] = {identify(data[s * SECTOR : (s + 1) * SECTOR], s)}
            self.pending[s] = []


@dataclass
class Image:
    """A clean set on disk: every member's bytes, the log's, the state directory."""

    members: list[bytes]
    log: bytes
    state: Path
    write_cache: bool


def make_image(root: Path, nmembers: int, write_cache: bool) -> Image:
    vols = [
        CrashableVolume(SIZE + AREA, name=f"m{i}", write_cache=write_cache) for i in range(nmembers)
    ]
    log = CrashableFile(name="wil")
    state = root / "image"
    s = ShadowSet.create(
        "dsa1", vols, state_dir=state, tuning=TUNING, committer=Committer(state / "durable"),
        wil_file=lambda: log,
    )  # fmt: skip
    assert s.wait(30)
    s.close()
    return Image([v.durable() for v in vols], log.durable(), state, write_cache)


class Run:
    """One play of a scenario against a copy of an image, and what the test knows."""

    def __init__(self, image: Image, root: Path, seed: int) -> None:
        self.state = root / "state"
        shutil.copytree(image.state, self.state)
        self.vols = [
            CrashableVolume(SIZE + AREA, name=f"m{i}", write_cache=image.write_cache, durable=b)
            for i, b in enumerate(image.members)
        ]
        self.log = CrashableFile(image.log, name="wil")
        self.write_cache = image.write_cache
        self.model = Model()
        self.rng = random.Random(seed)
        self.set: ShadowSet | None = None
        self.failing: set[int] = set()
        self.reported = 0  # the highest generation the set reported
        self.wid = 0
        self.dead: Callable[[], bool] = lambda: False  # has the process crashed?

    # -- the set's life -------------------------------------------------------------------

    def open(self) -> None:
        log = self.log
        self.set = ShadowSet.open(
            "dsa1", list(self.vols), state_dir=self.state, tuning=TUNING,
            committer=Committer(self.state / "durable"), wil_file=lambda: log,
        )  # fmt: skip
        self.settle()

    def settle(self) -> None:
        """Wait for the worker; a worker killed by the crash kills the run too."""
        s = self.live
        while not s.wait(0.01) and not self.dead():
            assert s._worker.is_alive(), f"shadow set worker stopped: {s.show()['state']}"
        if self.dead():  # the worker crashed, perhaps after the state went steady
            raise Crash("the worker crashed")
        assert s.generation >= self.reported
        self.reported = s.generation
        self.identical()

    @property
    def live(self) -> ShadowSet:
        assert self.set is not None
        return self.set

    def die(self) -> None:
        """The process is gone: stop the worker (it crashes at its next fault point); the
        dead set's objects are dropped without another I/O."""
        if self.set is not None:
            self.set._stop_worker()
            self.set = None
        self.dead = lambda: False  # the next boot's process

    def power_loss(self, tear: bool) -> None:
        rng = self.rng if tear else None
        self.vols = [v.power_loss(rng) for v in self.vols]
        self.log = self.log.power_loss(rng)
        self.failing.clear()

    def recover(self) -> None:
        """Reopen from the surviving volumes and check every invariant."""
        self.open()
        self.check()

    def identical(self) -> bytes:
        """A steady set's full members carry its generation and the same data: returns it."""
        s = self.live
        images = []
        for mid in s.state.full_members():
            m = s._members[mid]
            assert isinstance(m.volume, CrashableVolume)
            assert read_block(m.volume)[0].generation == s.generation, f"{m.name} is stale"
            images.append(m.volume.read(0, SIZE))
        assert all(i == images[0] for i in images), "full members differ"
        return images[0]

    def check(self) -> None:
        """After a reopen: the host reads the members' data, and it holds every durable write."""
        data = self.read(0, SECTORS)
        assert data == self.identical()
        self.model.check(data)
        self.model.settled(data)

    def read(self, first: int, n: int) -> bytes:
        buf = bytearray(n * SECTOR)
        self.live.readinto(first * SECTOR, [memoryview(buf)])
        return bytes(buf)

    # -- operations -----------------------------------------------------------------------

    def states(self) -> dict[int, str]:
        names = {m["name"]: m["state"] for m in self.live.show()["members"]}
        return {i: str(names.get(v.name, "")) for i, v in enumerate(self.vols)}

    def apply(self, op: tuple) -> None:
        getattr(self, f"op_{op[0]}")(*op[1:])
        self.settle()

    def op_write(self, first: int, n: int, fua: bool) -> None:
        n = min(n, SECTORS - first)
        self.wid += 1
        wid = self.wid
        data = b"".join(pattern(wid, s) for s in range(first, first + n))
        self.model.issued(wid, first, n)
        self.live.write(first * SECTOR, [memoryview(data)], fua)
        self.model.acknowledged(wid, first, n, fua or not self.write_cache)

    def op_flush(self) -> None:
        self.live.flush()
        self.model.flushed()

    def op_read(self, first: int, n: int) -> None:
        n = min(n, SECTORS - first)
        self.model.check(self.read(first, n), first)

    def op_clean(self) -> None:
        """The log's cleaner (which flushes the members, or not, if nothing is idle)."""
        assert self.live._wil is not None
        self.live._wil.flush_idle(LATER)

    def pick(self, n: int, states: set[str]) -> int | None:
        """The `n`-th (cyclically) member slot in one of `states` ("" for no entry), if any."""
        found = [i for i, st in self.states().items() if st in states]
        return found[n % len(found)] if found else None

    def op_remove(self, n: int, minicopy: bool) -> None:
        """Only while a full member that does not fail stays: the set's last one failing is
        the host's error, not a property of the set."""
        slot = self.pick(n, {FULL})
        full = {i for i, st in self.states().items() if st == FULL}
        if slot is not None and full - self.failing - {slot}:
            self.live.remove(self.vols[slot].name, minicopy)

    def op_add(self, n: int) -> None:
        slot = self.pick(n, {REMOVED, STALE, ""})
        if slot is not None:
            self.vols[slot].heal()
            self.failing.discard(slot)
            self.live.add(self.vols[slot])

    def op_fail(self, n: int, what: str, sector: int) -> None:
        """A full member starts failing (every write or flush, or reads of one sector) while
        another stays sound and none in the set fails already."""
        slot = self.pick(n, {FULL})
        in_set = {i for i, st in self.states().items() if st in (FULL, COPYING)}
        if slot is None or len(in_set) < 2 or self.failing & in_set:
            return
        self.failing.add(slot)
        self.vols[slot].fail(what, sector * SECTOR if what == "read" else None)

    def op_restart(self) -> None:
        """A clean dismount and a new process over the same devices (caches intact)."""
        self.live.close()
        self.model.flushed()
        self.set = None
        self.vols = [v.restart() for v in self.vols]
        self.log = self.log.restart()
        self.failing.clear()
        self.recover()

    def op_cycle(self, tear: bool) -> None:
        """A clean dismount, then the power goes."""
        self.live.close()
        self.model.flushed()
        self.set = None
        self.power_loss(tear)
        self.recover()


_slot = st.integers(0, 2)
_sector = st.integers(0, SECTORS - 1)
_write = st.tuples(st.just("write"), _sector, st.integers(1, 600), st.booleans())
OPS = st.one_of(
    _write,
    _write,
    _write,
    st.just(("flush",)),
    st.tuples(st.just("read"), _sector, st.integers(1, 600)),
    st.just(("clean",)),
    st.tuples(st.just("remove"), _slot, st.booleans()),
    st.tuples(st.just("remove"), _slot, st.booleans()),
    st.tuples(st.just("add"), _slot),
    st.tuples(st.just("add"), _slot),
    st.tuples(st.just("fail"), _slot, st.sampled_from(["write", "flush", "read"]), _sector),
    st.just(("restart",)),
    st.tuples(st.just("cycle"), st.booleans()),
    st.tuples(st.just("cycle"), st.booleans()),
)


@contextlib.contextmanager
def quiet_crashes() -> Iterator[None]:
    """A worker thread the crash killed is expected: do not report it as unhandled."""
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is not None and issubclass(args.exc_type, Crash):
            return
        previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


def _replay(run: Any, ops: list[tuple], hook: Callable[[str], None]) -> Any:
    """Open `run` and apply `ops` with `hook` at every fault point; on a crash the process
    dies there (nothing it does afterwards reaches storage)."""
    run.dead = lambda: getattr(hook, "fired", None) is not None
    with faults.installed(hook):
        try:
            run.open()
            for op in ops:
                run.apply(op)
        except Crash:
            pass
        run.die()
    return run


def play(image: Image, ops: list[tuple], hook: Callable[[str], None], root: Path) -> Run:
    """Run `ops` on a copy of `image` (see `_replay`)."""
    return _replay(Run(image, root, seed=len(ops)), ops, hook)


def crash_everywhere(
    image: Image, ops: list[tuple], ks: Callable[[int], list[int]], tear: bool
) -> int:
    """Play `ops` once recording its fault points, lose power at the end, recover and check;
    then again for each point `ks(points)` chooses, crashing there. Returns the point count."""
    with tempfile.TemporaryDirectory(dir=FAST_DIR) as tmp:
        rec = Recorder()
        run = play(image, ops, rec, Path(tmp) / "all")
        run.power_loss(tear)
        run.recover()
        run.live.close()
        for k in ks(len(rec.names)):
            hook = CrashAt(k)
            run = play(image, ops, hook, Path(tmp) / f"k{k}")
            assert hook.fired == rec.names[k], (k, hook.fired, rec.names[k])
            run.power_loss(tear)
            run.recover()
            run.live.close()
        return len(rec.names)


_images: dict[tuple[int, bool], Image] = {}
_image_dir = tempfile.TemporaryDirectory(dir=FAST_DIR)


def image(nmembers: int, write_cache: bool) -> Image:
    """A clean set of `nmembers` members, built once per shape."""
    key = (nmembers, write_cache)
    if key not in _images:
        root = Path(_image_dir.name) / f"{nmembers}-{write_cache}"
        _images[key] = make_image(root, nmembers, write_cache)
    return _images[key]


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    ops=st.lists(OPS, max_size=8),
    nmembers=st.integers(2, 3),
    write_cache=st.booleans(),
    tear=st.booleans(),
    data=st.data(),
)
def test_shadow_set_keeps_every_durable_write_across_a_crash_anywhere(
    ops: list[tuple], nmembers: int, write_cache: bool, tear: bool, data: st.DataObject
) -> None:
    def some(n: int) -> list[int]:
        return data.draw(st.lists(st.integers(0, n - 1), max_size=2, unique=True)) if n else []

    with quiet_crashes():
        crash_everywhere(image(nmembers, write_cache), ops, some, tear)


# a member fails and comes back, the other is removed with minicopy, unflushed, and comes back
# after a power loss; the log cleaner, a restart and the worker's copies: a crash at each step
SCENARIO = [
    ("write", 0, 300, False),
    ("fail", 0, "flush", 0),
    ("write", 100, 600, True),
    ("flush",),
    ("add", 0),
    ("write", 1000, 20, False),
    ("remove", 1, True),
    ("write", 7, 300, False),
    ("clean",),
    ("cycle", True),
    ("add", 0),
    ("restart",),
    ("write", 9, 9, False),
]


def test_shadow_set_crashed_at_every_fault_point_of_a_scenario() -> None:
    with quiet_crashes():
        n = crash_everywhere(image(2, True), SCENARIO, lambda n: list(range(n)), True)
    assert n > 100  # the scenario reaches the set's and the log's fault points


def test_a_member_removed_with_minicopy_gets_back_the_writes_its_cache_lost() -> None:
    """Writes it took before it left were only in its cache; the clean dismount does not
    flush it (it is not in the set), the power goes, and its minicopy must copy them."""
    with tempfile.TemporaryDirectory(dir=FAST_DIR) as tmp:
        run = Run(image(2, True), Path(tmp), seed=0)
        run.open()
        for op in [("write", 0, 300, False), ("remove", 1, True), ("cycle", False), ("add", 1)]:
            run.apply(op)
        run.check()
        run.live.close()


# -- pairs ------------------------------------------------------------------------------------

PSIZE = 1 << 20  # of each pair volume (one write-intent log region)
ALLOWED_AFTER = {  # statuses an acknowledged operation leaves, whatever a restart does later
    "create": {Status.COPY, Status.PAIR},  # a restart may re-copy what was in flight
    "resync": {Status.COPY, Status.PAIR},
    "split": {Status.PSUS},
    "restore": {Status.RCPY, Status.PSUS},
    "delete": {None},
}


class PairRun:
    """A pair v0 -> v1 under the crash model: what the test knows of P's data (S is checked
    against P after a resync), and which statuses a restart may show."""

    def __init__(self, root: Path, write_cache: bool, seed: int, writers: int = 0) -> None:
        self.state = root / "state"
        self.writers = writers  # 0: the S-VOL written after the P-VOL, in a fixed order
        self.vols = {
            n: CrashableVolume(PSIZE, name=n, write_cache=write_cache) for n in ("v0", "v1")
        }
        self.logs = {n: CrashableFile(name=f"{n}.wil") for n in self.vols}
        self.write_cache = write_cache
        self.model: Model | None = Model(PSIZE // SECTOR)  # None: P is being restored
        self.rng = random.Random(seed)
        self.m: PairManager | None = None
        self.allowed: set[Status | None] = {None}
        self.generation = 0  # the pair's last acknowledged generation
        self.wid = 0
        self.dead: Callable[[], bool] = lambda: False

    def open(self) -> None:
        logs = self.logs
        self.m = PairManager(
            str(self.state), self.vols, identities(list(self.vols)), chunk=128 << 10,
            checkpoint_bytes=256 << 10, checkpoint_interval=1e9,
            committer=Committer(self.state / "durable"), wil_file=lambda n: logs[n],
            writers=self.writers,
        )  # fmt: skip
        self.settle()

    @property
    def live(self) -> PairManager:
        assert self.m is not None
        return self.m

    def status(self) -> Status | None:
        pair = self.live.pairs.get("p")
        return None if pair is None else pair.status

    def settle(self) -> None:
        """Let a copy end; the copier crashing kills the run."""
        pair = self.live.pairs.get("p")
        if pair is not None:
            assert pair.wait(30)
        if self.dead():
            raise Crash("the copier crashed")
        st = self.status()
        if self.vols["v1"]._failing:  # S fails: the pair may suspend by error at any time
            self.allowed.add(Status.PSUE)
        assert st in self.allowed, f"pair is {st}, expected one of {self.allowed}"
        if st is Status.PSUE:
            self.allowed = {Status.PSUE}  # suspended and recorded: it stays so until a resync
        if pair is not None:
            assert pair.rec.generation >= self.generation
            self.generation = pair.rec.generation
        if st is Status.PSUS and self.allowed == ALLOWED_AFTER["restore"]:
            self.allowed = {Status.PSUS}  # the restore is done: never again RCPY
        if st is Status.PSUS and self.model is None:
            self.model = Model(PSIZE // SECTOR)  # P is S's image now, and durable
            self.model.settled(self.vols["v0"].read(0, PSIZE))

    def die(self) -> None:
        """Stop the copier (it crashes at its next fault point); drop the dead manager."""
        if self.m is not None:
            for pair in self.m.pairs.values():
                pair.stopping.set()
                pair.wait()
            self.m = None
        self.dead = lambda: False

    def power_loss(self, tear: bool) -> None:
        rng = self.rng if tear else None
        self.vols = {n: v.power_loss(rng) for n, v in self.vols.items()}
        self.logs = {n: f.power_loss(rng) for n, f in self.logs.items()}

    def recover(self) -> None:
        """Reopen; P holds its durable writes; a resync (if split) makes S == P."""
        self.open()
        if self.model is not None:
            self.model.check(self.vols["v0"].read(0, PSIZE))
        if self.status() in (Status.PSUS, Status.PSUE):
            self.live.resync("p")
            self.allowed = ALLOWED_AFTER["resync"]
            self.settle()
        if self.status() is not None:
            assert self.status() is Status.PAIR
            assert self.vols["v0"].read(0, PSIZE) == self.vols["v1"].read(0, PSIZE), "S != P"

    # -- operations -----------------------------------------------------------------------

    def apply(self, op: tuple) -> None:
        getattr(self, f"op_{op[0]}")(*op[1:])
        self.settle()

    def _operate(self, name: str, call: Callable[[], None]) -> None:
        """An operator command: while it runs a crash may leave either status. One refused
        because the S-VOL fails (a split's flush) changed nothing."""
        before, self.allowed = self.allowed, self.allowed | ALLOWED_AFTER[name]
        try:
            call()
        except VolumeError:
            if not self.vols["v1"]._failing:
                raise
            self.allowed = before
            return
        self.allowed = set(ALLOWED_AFTER[name])

    def op_create(self) -> None:
        if self.status() is None:
            self._operate("create", lambda: self.live.create("p", "v0", "v1", 0))

    def op_split(self, read_only: bool) -> None:
        if self.status() is Status.PAIR:
            self._operate("split", lambda: self.live.split("p", read_only))

    def op_resync(self) -> None:
        if self.status() in (Status.PSUS, Status.PSUE):
            self.vols["v1"].heal()
            self._operate("resync", lambda: self.live.resync("p"))

    def op_fail_s(self, what: str) -> None:
        """The S-VOL starts failing every write or flush (a resync heals it first)."""
        if self.status() is Status.PAIR:
            self.vols["v1"].fail(what)

    def op_restore(self) -> None:
        if self.status() is Status.PSUS:
            self.model = None
            self._operate("restore", lambda: self.live.restore("p"))

    def op_delete(self) -> None:
        if self.status() is not None:
            self._operate("delete", lambda: self.live.delete("p"))
            self.generation = 0  # a pair created later under its name starts again

    def op_write(self, first: int, n: int, fua: bool) -> None:
        n = min(n, PSIZE // SECTOR - first)
        self.wid += 1
        wid = self.wid
        data = b"".join(pattern(wid, s) for s in range(first, first + n))
        if self.model is not None:
            self.model.issued(wid, first, n)
        self.live.volume("v0").write(first * SECTOR, [memoryview(data)], fua)
        if self.model is not None:
            self.model.acknowledged(wid, first, n, fua or not self.write_cache)

    def op_write_s(self, first: int, n: int) -> None:
        """The S-VOL of a split pair written by its host (a resync undoes it)."""
        pair = self.live.pairs.get("p")
        if self.vols["v1"]._failing:
            return
        if pair is not None and pair.status is Status.PSUS and not pair.rec.split_read_only:
            n = min(n, PSIZE // SECTOR - first)
            self.live.volume("v1").write(first * SECTOR, [memoryview(bytes([7]) * n * SECTOR)])

    def op_flush(self) -> None:
        self.live.volume("v0").flush()
        if self.model is not None:
            self.model.flushed()

    def op_clean(self) -> None:
        for pv in self.live.volumes.values():
            pv.wil.flush_idle(LATER)

    def op_restart(self) -> None:
        """A clean stop and a new process over the same devices (caches intact)."""
        self.live.close()
        self.vols = {n: v.restart() for n, v in self.vols.items()}
        self.logs = {n: f.restart() for n, f in self.logs.items()}
        self.m = None
        self.open()


_psector = st.integers(0, PSIZE // SECTOR - 1)
PAIR_OPS = st.one_of(
    st.tuples(st.just("write"), _psector, st.integers(1, 600), st.booleans()),
    st.tuples(st.just("write"), _psector, st.integers(1, 600), st.booleans()),
    st.tuples(st.just("write_s"), _psector, st.integers(1, 600)),
    st.just(("create",)),
    st.tuples(st.just("split"), st.booleans()),
    st.tuples(st.just("split"), st.booleans()),
    st.just(("resync",)),
    st.just(("restore",)),
    st.just(("restore",)),
    st.just(("delete",)),
    st.just(("flush",)),
    st.just(("clean",)),
    st.just(("restart",)),
    st.tuples(st.just("fail_s"), st.sampled_from(["write", "flush"])),
)


def play_pair(ops: list[tuple], hook: Callable[[str], None], root: Path, wc: bool) -> PairRun:
    return _replay(PairRun(root, wc, seed=len(ops)), ops, hook)


def crash_pair_everywhere(
    ops: list[tuple], ks: Callable[[int], list[int]], tear: bool, write_cache: bool
) -> int:
    """As `crash_everywhere`, for a pair."""
    with tempfile.TemporaryDirectory(dir=FAST_DIR) as tmp:
        rec = Recorder()
        run = play_pair(ops, rec, Path(tmp) / "all", write_cache)
        run.power_loss(tear)
        run.recover()
        run.live.close()
        for k in ks(len(rec.names)):
            hook = CrashAt(k)
            run = play_pair(ops, hook, Path(tmp) / f"k{k}", write_cache)
            assert hook.fired == rec.names[k], (k, hook.fired, rec.names[k])
            run.power_loss(tear)
            run.recover()
            run.live.close()
        return len(rec.names)


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    ops=st.lists(PAIR_OPS, max_size=10),
    write_cache=st.booleans(),
    tear=st.booleans(),
    data=st.data(),
)
def test_pair_keeps_its_status_and_data_across_a_crash_anywhere(
    ops: list[tuple], write_cache: bool, tear: bool, data: st.DataObject
) -> None:
    def some(n: int) -> list[int]:
        return data.draw(st.lists(st.integers(0, n - 1), max_size=3, unique=True)) if n else []

    with quiet_crashes():
        crash_pair_everywhere([("create",), *ops], some, tear, write_cache)


PAIR_SCENARIO = [
    ("create",),
    ("write", 0, 300, False),
    ("clean",),
    ("split", False),
    ("write", 500, 40, True),
    ("write_s", 1000, 30),
    ("resync",),
    ("write", 9, 9, False),
    ("split", False),
    ("restore",),
    ("restart",),
    ("delete",),
]


def test_pair_crashed_at_every_fault_point_of_a_scenario() -> None:
    with quiet_crashes():
        n = crash_pair_everywhere(PAIR_SCENARIO, lambda n: list(range(n)), True, True)
    assert n > 50


def test_a_crash_with_the_update_copy_landed_and_the_pvol_write_not() -> None:
    """Written side by side, the S-VOL may hold a write the P-VOL never got when the process
    dies (a state the plays in turn above never reach). The write-intent log's mark, durable
    before either write started, has the restart copy the range again: S ends equal to P."""
    with tempfile.TemporaryDirectory(dir=FAST_DIR) as tmp:
        run = PairRun(Path(tmp), write_cache=False, seed=0, writers=1)
        run.open()
        run.apply(("create",))
        p, s = run.vols["v0"], run.vols["v1"]
        landed = threading.Event()

        def s_write(offset: int, bufs: Any, fua: bool = False) -> None:
            CrashableVolume.write(s, offset, bufs, fua)
            landed.set()

        def p_write(offset: int, bufs: Any, fua: bool = False) -> None:
            assert landed.wait(10), "the S-VOL was not written beside the P-VOL"
            CrashableVolume.write(p, offset, bufs, fua)

        s.write, p.write = s_write, p_write  # type: ignore[method-assign]
        hook = CrashAt(0, "v0.write")
        with faults.installed(hook), contextlib.suppress(Crash):
            run.op_write(0, 64, False)
        assert hook.fired == "v0.write"
        assert s.durable()[: 64 * SECTOR] != p.durable()[: 64 * SECTOR]
        run.die()
        run.power_loss(False)
        run.recover()  # the logged range copied again (COPY, then PAIR), and S == P
        assert run.status() is Status.PAIR
        run.live.close()


def test_a_restore_crashed_copies_again_what_p_lost_from_its_cache() -> None:
    """P's last write (mirrored in PAIR) is still in P's cache when the split flushes only S;
    the restore is recorded, the power goes: P lost the write, S has it, and the restore that
    resumes must copy it back, as its end declares P and S identical."""
    ops = [("create",), ("write", 9, 9, False), ("split", False), ("restore",)]
    with quiet_crashes():
        crash_pair_everywhere(ops, lambda n: list(range(n)), False, True)


def test_a_stale_volume_added_back_is_shown_once_as_a_member() -> None:
    with tempfile.TemporaryDirectory(dir=FAST_DIR) as tmp:
        run = Run(image(2, True), Path(tmp), seed=0)
        run.open()
        for op in [("remove", 0, False), ("restart",)]:
            run.apply(op)
        assert sorted(run.states().values()) == [FULL, STALE]
        run.apply(("add", 0))
        shown = [(m["name"], m["state"]) for m in run.live.show()["members"]]
        assert sorted(shown) == [("m0", FULL), ("m1", FULL)]
        run.live.close()
