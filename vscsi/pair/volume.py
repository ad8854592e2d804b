"""`PairVolume`: the host's view of a volume that may be paired. Every managed volume is
wrapped, so a pair can be created or deleted under a LUN that keeps serving."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

from vscsi.pair.replica import LocalReplica, Replica
from vscsi.pair.states import Access, Status
from vscsi.resync.engine import deallocate
from vscsi.store.base import DirectIo, Extent, NotReadyError, Volume, WriteProtectedError
from vscsi.store.fanout import Fanout, Pending, waits
from vscsi.store.locks import Guarded, Guards, RegionLocks, WriteGate
from vscsi.tracker import WriteIntentLog

if TYPE_CHECKING:
    from vscsi.pair.manager import PairManager
    from vscsi.pair.mirror import Mirror

GRAIN = 65536
WIL_REGION = 1 << 20  # fixed, so a restart with another copy chunk still reads the log
MAX_MIRRORS = 4  # S-VOLs the compiled path writes beside a P-VOL (csrc/ring.h, fast_lun)
# NOT READY causes (SPC-4 additional sense codes), see docs/pairs.md:
RESTORE_IN_PROGRESS = (0x04, 0x07)  # LOGICAL UNIT NOT READY, OPERATION IN PROGRESS
SUSPENDED_BY_ERROR = (0x04, 0x03)  # LOGICAL UNIT NOT READY, MANUAL INTERVENTION REQUIRED


class PairVolume:
    """The host's view of a managed volume in any role: simplex passes through, a P-VOL
    mirrors or tracks, an S-VOL enforces the access its pair status allows and tracks its own
    changes when split read/write. Stack it as the LUN's volume."""

    def __init__(self, base: Volume, manager: PairManager) -> None:
        self.base = base
        self.manager = manager
        guards = _shareable(base)
        self.guarded = guards is not None  # one gate, region locks and log for both layers
        self.gate = guards.gate if guards else WriteGate()
        self.regions = guards.regions if guards else RegionLocks(manager.chunk)
        wil = guards.wil if guards else None
        self.owns_wil = wil is None
        checkpoint = lambda: manager.checkpoint_volume(base.name)  # noqa: E731
        if wil is None:
            self.wil = self._open_log(checkpoint)
        else:
            self.wil = wil  # the set's: its cleaner checkpoints the pairs after the set
            wil.add_before_clear(checkpoint)
        self.held = HeldWrites(self)
        self.fanout = Fanout(f"mirror-{base.name}", manager.writers)  # S-VOL writes beside P's

    def _open_log(self, checkpoint: Callable[[], None]) -> WriteIntentLog:
        m = self.manager
        return WriteIntentLog(
            m.store.wil_path(self.base.name),
            self.base.size,
            region=WIL_REGION,
            grain=GRAIN,
            idle_delay=m.wil_idle,
            before_clear=checkpoint,
            file=None if m.wil_file is None else m.wil_file(self.base.name),
            background=m.wil_file is None,
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

    @property
    def waits_on_peer(self) -> bool:
        """A write waits for a peer array: this is the P-VOL of a remote pair."""
        return any(pair.remote for pair in self.manager.roles(self.name)[0])

    def access(self) -> Access:
        return self.manager.access(self.name)

    # -- I/O ------------------------------------------------------------------------------------

    def check_ready(self) -> None:
        """TEST UNIT READY: only an S-VOL of a suspended pair (no access) is not ready."""
        if self.access() is Access.NO_ACCESS:
            raise NotReadyError(f"{self.name}: S-VOL of a suspended pair", *SUSPENDED_BY_ERROR)

    @contextmanager
    def direct(self) -> Iterator[DirectIo | None]:
        """The base's descriptors, for reads `readinto` would pass straight to the base and
        writes `write` would: on a simplex volume, and on a P-VOL whose pairs all mirror
        plainly (`Mirror.mirrors_plainly`) to S-VOLs that hand out their own descriptors,
        with the write-intent log lent (`WriteIntentLog.lend`). The gate is held shared
        meanwhile: a pair created or a role changed waits, so no write made through the
        descriptors escapes a pair's tracking, and none is made after a transition that
        forbids it."""
        base = getattr(self.base, "direct", None)
        if base is None:
            yield None
            return
        with self.gate.shared(), base() as io:
            if io is None:
                yield None
                return
            primaries, secondary = self.manager.roles(self.name)
            access = self.access()
            reads = (
                io.reads
                and access is not Access.NO_ACCESS
                and all(p.status is not Status.RCPY for p in primaries)
            )
            if not (io.writes and access is Access.READ_WRITE):
                yield io._replace(reads=reads, writes=False)
            elif not primaries and secondary is None and not self.guarded:
                yield io._replace(reads=reads)
            else:
                with self._mirrored(primaries, secondary) as mirrored:
                    yield io._replace(reads=reads, writes=mirrored is not None, **mirrored or {})

    @contextmanager
    def _mirrored(
        self, primaries: list[Mirror], secondary: Mirror | None
    ) -> Iterator[dict[str, Any] | None]:
        """The S-VOLs' descriptors and the lent log, when every write here is plainly the
        same write on each of them (see `direct`); None otherwise."""
        plain = (
            secondary is None and not self.guarded and len(primaries) <= MAX_MIRRORS
            and all(p.mirrors_plainly() and isinstance(p.replica, LocalReplica) for p in primaries)
        )  # fmt: skip
        if not plain:
            yield None
            return
        with ExitStack() as stack:
            ios = [stack.enter_context(p.replica.direct()) for p in primaries]  # type: ignore[union-attr]
            if not all(io is not None and io.writes for io in ios):
                yield None
                return
            lent = self.wil.lend()
            if lent is None:
                yield None
                return
            try:
                yield {
                    "mirrors": tuple((io.fd, io.direct_fd) for io in ios if io is not None),
                    "intent": (self.wil.region, *lent),
                }
            finally:
                self.wil.give_back()

    def read_held(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """A read by a caller holding the range's region lock (a copy, a read during RCPY)."""
        if self.guarded:
            self.base.readinto_held(offset, bufs)  # type: ignore[attr-defined]
        else:
            self.base.readinto(offset, bufs)

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
            if not primaries and secondary is None and not self.guarded:
                self.base.write(offset, bufs, fua)
                return
            length = sum(len(b) for b in bufs)
            with self._tracked(offset, length, stream=True):
                self._paired(
                    offset, length, primaries, secondary,
                    lambda: self.held.write_base(offset, bufs, fua),
                    lambda replica: replica.write(offset, bufs, fua), self._waits(fua),
                )  # fmt: skip

    def unmap(self, offset: int, length: int) -> None:
        """Deallocate; while paired, the same access rules and mirroring as a write."""
        with self.gate.shared():
            self._check_writable()
            primaries, secondary = self.manager.roles(self.name)
            if not primaries and secondary is None and not self.guarded:
                self.base.unmap(offset, length)
                return
            with self._tracked(offset, length):
                self._paired(
                    offset, length, primaries, secondary,
                    lambda: self.held.unmap_base(offset, length),
                    lambda replica: replica.unmap(offset, length), self._waits(False),
                )  # fmt: skip

    def replicate(
        self,
        offset: int,
        bufs: Sequence[memoryview],
        fua: bool = False,
        admit: Callable[[], object] | None = None,
    ) -> None:
        """An update copy from the P side of the remote pair whose S-VOL this is: written like
        a host write, so the volume's local pairs mirror or track it (a cascade), but past the
        host's access check and not counted as a change of the S side. `admit` raises when
        the volume takes no update copies any more; it runs under the write gate, which a
        state change holds exclusively."""
        self._replicated(
            offset, sum(len(b) for b in bufs), admit,
            lambda: self.held.write_base(offset, bufs, fua),
            lambda replica: replica.write(offset, bufs, fua), self._waits(fua),
        )  # fmt: skip

    def replicate_unmap(
        self, offset: int, length: int, admit: Callable[[], object] | None = None
    ) -> None:
        """An update copy's deallocation, as `replicate`."""
        self._replicated(
            offset, length, admit,
            lambda: deallocate(self.held, offset, length),
            lambda replica: replica.unmap(offset, length), self._waits(False),
        )  # fmt: skip

    def _replicated(
        self,
        offset: int,
        length: int,
        admit: Callable[[], object] | None,
        local: Callable[[], None],
        mirror: Callable[[Replica], None],
        waits: bool,
    ) -> None:
        with self.gate.shared():
            if admit is not None:
                admit()
            with self._tracked(offset, length):
                primaries = self.manager.roles(self.name)[0]
                self._paired(offset, length, primaries, None, local, mirror, waits)

    def _paired(
        self,
        offset: int,
        length: int,
        primaries: list[Mirror],
        secondary: Mirror | None,
        local: Callable[[], None],
        mirror: Callable[[Replica], None],
        beside: bool,
    ) -> None:
        """Change this volume (`local`) and, at the same time when `beside`, each pair: its
        update copy (`mirror`) runs on the fanout beside `local` (after it when not `beside`),
        or it tracks the range. Every update copy has ended before anything is answered. A
        failed one is its pair's to answer (suspend; a fence may fail the command). When
        `local` fails the command fails with its error, but part of it may be on this volume:
        the range is tracked too."""
        updates = [
            (p, p.start_update(offset, length, mirror, self.fanout, beside)) for p in primaries
        ]
        try:
            local()
        except BaseException as e:
            for _, update in updates:
                if update is not None:
                    update.drop()  # none outlives the command: it writes from the host's buffers
            if isinstance(e, Exception):  # the host gets this volume's error
                _answer(offset, length, updates)
                for pair in primaries:
                    pair.primary_failed(offset, length)
                if secondary is not None:
                    secondary.secondary_written(offset, length)
            raise
        error = _answer(offset, length, updates)
        if secondary is not None:
            secondary.secondary_written(offset, length)
        if error is not None:
            raise error

    def _waits(self, fua: bool) -> bool:
        """Whether this volume's write waits for its device: then the S-VOLs' run beside it."""
        return waits(fua, self.base.write_cache)

    @contextmanager
    def _tracked(self, offset: int, length: int, stream: bool = False) -> Iterator[None]:
        """Region lock against the copier, and a durable write intent against a crash."""
        with self.regions.hold(offset, length), self.intent(offset, length, stream):
            yield

    @contextmanager
    def intent(self, offset: int, length: int, stream: bool = False) -> Iterator[None]:
        """`stream`: a host write, which may mark ahead (`WriteIntentLog.begin`)."""
        self.wil.begin(offset, length, stream)
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
        self.fanout.close()
        if self.owns_wil:
            self.wil.close()
        self.base.close()


def _answer(
    offset: int, length: int, updates: list[tuple[Mirror, Pending | None]]
) -> Exception | None:
    """Wait for every update copy, then let each pair answer its own: the first error a pair
    gives for the host (a fence), once every pair has answered."""
    for _, update in updates:
        if update is not None:
            update.wait()
    error = None
    for pair, update in updates:
        if update is None:
            continue
        try:
            pair.finish_update(offset, length, update)
        except Exception as e:
            error = error or e
    return error


def _shareable(base: Volume) -> Guards | None:
    """The base's guards, if the pair layer can use them: a log of another grain cannot take
    the pairs' marks, so the layers then keep their own."""
    if not isinstance(base, Guarded):
        return None
    guards = base.guards
    return guards if guards.wil is None or guards.wil.grain == GRAIN else None


class HeldWrites:
    """Writes to the volume's base by a caller that holds the range's region lock: the host
    write path (which began the intent) and a copy onto this volume (a restore, which has
    not). Through the base's `_held` methods when the layers share their guards."""

    def __init__(self, volume: PairVolume) -> None:
        self.volume = volume

    @property
    def supports_unmap(self) -> bool:
        return self.volume.base.supports_unmap

    def write_base(self, offset: int, bufs: Sequence[memoryview], fua: bool = False) -> None:
        base = self.volume.base
        if self.volume.guarded:
            base.write_held(offset, bufs, fua)  # type: ignore[attr-defined]
        else:
            base.write(offset, bufs, fua)

    def unmap_base(self, offset: int, length: int) -> None:
        base = self.volume.base
        if self.volume.guarded:
            base.unmap_held(offset, length)  # type: ignore[attr-defined]
        else:
            base.unmap(offset, length)

    def write(self, offset: int, bufs: Sequence[memoryview], fua: bool = False) -> None:
        """A copy's write: with its own write intent, as the base's own log needs one."""
        length = sum(len(b) for b in bufs)
        with self._copy_intent(offset, length):
            self.write_base(offset, bufs, fua)

    def unmap(self, offset: int, length: int) -> None:
        with self._copy_intent(offset, length):
            self.unmap_base(offset, length)

    def _copy_intent(self, offset: int, length: int) -> AbstractContextManager[None]:
        v = self.volume
        return v.intent(offset, length) if v.guarded and not v.owns_wil else nullcontext()


def window(bufs: Sequence[memoryview], start: int, length: int) -> list[memoryview]:
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
