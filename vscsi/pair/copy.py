"""A pair's copy as a job of the resync engine: create and resync copy P -> S, a restore
copies S -> P. Holes on both sides are skipped, so a thin S-VOL stays thin."""

from __future__ import annotations

import logging
import mmap
from collections.abc import Sequence
from typing import TYPE_CHECKING

from vscsi.resync.engine import deallocate
from vscsi.resync.holes import Mapped, Run, copy_kind
from vscsi.store.base import VolumeError

if TYPE_CHECKING:
    from vscsi.pair.pair import Pair

log = logging.getLogger(__name__)


class PairCopy:
    """One run of a pair's copier (see `vscsi.resync.engine.Job`)."""

    paced = True

    def __init__(self, pair: Pair, restore: bool) -> None:
        self.pair = pair
        self.restore = restore
        self.moved = 0  # bytes copied (or deallocated) in this run
        self.skipped = 0  # bytes left alone: a hole on both sides

    def involved(self) -> Sequence[Mapped]:
        pair = self.pair
        return [pair.replica, pair.p.base] if self.restore else [pair.p.base, pair.replica]

    def kind(self, mapped: tuple[bool, ...]) -> Run:
        return copy_kind(mapped)

    def move(self, offset: int, length: int, run: Run) -> bool:
        """Copy one run; an error on either side suspends the pair (PSUE)."""
        if run is Run.SKIP:
            self.skipped += length
            return True
        pair = self.pair
        try:
            if run is Run.ZERO:
                self._zero(offset, length)
            else:
                self._copy(offset, length)
        except Exception as e:
            pair.suspend(offset, length, e)
            return False
        if self.restore:
            pair.manager.restored(pair, offset, length)
        self.moved += length
        return True

    def _copy(self, offset: int, length: int) -> None:
        buf = memoryview(mmap.mmap(-1, length))  # page aligned: block devices take O_DIRECT
        pair = self.pair
        if self.restore:
            pair.replica.readinto(offset, [buf])
            pair.p.held.write(offset, [buf])
        else:
            pair.p.read_held(offset, [buf])
            pair.replica.write(offset, [buf])

    def _zero(self, offset: int, length: int) -> None:
        if self.restore:
            deallocate(self.pair.p.held, offset, length)
        else:
            self.pair.replica.unmap(offset, length)

    def checkpoint(self) -> bool:
        """A checkpoint that cannot be written is retried at the next one; the copy goes on.
        False only when the pair suspended."""
        try:
            return self.pair.checkpoint()
        except (OSError, VolumeError) as e:
            log.warning("pair %s: checkpoint failed, retrying at the next one: %s",
                        self.pair.name, e)  # fmt: skip
            return True

    def finish(self) -> bool:
        """A record that cannot be written does not end the copy: it is logged and retried
        (the durable record stays behind: the safe side)."""
        pair = self.pair
        try:
            return pair.finish_copy()
        except (OSError, VolumeError) as e:
            log.warning("pair %s: copy end not recorded, retrying: %s", pair.name, e)
            pair.stopping.wait(pair.manager.checkpoint_interval)
            return False
