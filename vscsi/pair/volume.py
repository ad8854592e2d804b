"""`PairVolume`: the host's view of a volume that may be paired. Every managed volume is
wrapped, so a pair can be created or deleted under a LUN that keeps serving."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from vscsi.pair.replica import Replica
from vscsi.pair.states import Access, Status
from vscsi.store.base import Extent, NotReadyError, Volume, WriteProtectedError
from vscsi.store.locks import RegionLocks, WriteGate
from vscsi.tracker import WriteIntentLog

if TYPE_CHECKING:
    from vscsi.pair.manager import PairManager
    from vscsi.pair.pair import Pair

GRAIN = 65536
WIL_REGION = 1 << 20  # fixed, so a restart with another copy chunk still reads the log
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
