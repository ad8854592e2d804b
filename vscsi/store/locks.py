"""The locks of the write path: a write gate (quiesce for a single-instant state change) and
striped region locks (a copy chunk's read+write and a host write to the same region never
interleave, so the host's data is what ends on every copy). `Guards` bundles them with the
write-intent log, so that volumes stacked on each other take one of each, not one per layer.

Lock order, outermost first: the gate, region locks, then the owners' state locks."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from vscsi.tracker.wil import WriteIntentLog


class WriteGate:
    """Many host writes at once (shared), or one state change with no write in flight
    (exclusive). A waiting state change stops new writes from entering, so it cannot starve."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._writers = 0
        self._closed = False

    def shared(self) -> WriteGate:
        """`with gate.shared():` around one host write (a plain context manager: this is on
        every write's path)."""
        return self

    def __enter__(self) -> None:
        with self._cond:
            while self._closed:
                self._cond.wait()
            self._writers += 1

    def __exit__(self, *_exc: object) -> None:
        with self._cond:
            self._writers -= 1
            if self._closed and not self._writers:  # only a state change waits for this
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._closed:
                self._cond.wait()
            self._closed = True
            while self._writers:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._closed = False
                self._cond.notify_all()


class RegionLocks:
    """`count` locks, region i of `stripe` bytes guarded by lock i % count; a range takes its
    locks in ascending order, so two ranges never deadlock."""

    def __init__(self, stripe: int = 1 << 20, count: int = 64) -> None:
        self.stripe = stripe
        self._locks = [threading.Lock() for _ in range(count)]

    @contextmanager
    def hold(self, offset: int, length: int) -> Iterator[None]:
        first, last = offset // self.stripe, (offset + max(length, 1) - 1) // self.stripe
        count = len(self._locks)
        ids = (
            range(count)
            if last - first + 1 >= count
            else sorted({i % count for i in range(first, last + 1)})
        )
        for i in ids:
            self._locks[i].acquire()
        try:
            yield
        finally:
            for i in reversed(ids):
                self._locks[i].release()


@dataclass(frozen=True, slots=True)
class Guards:
    """A volume's write gate, region locks and write-intent log (None: it keeps none)."""

    gate: WriteGate
    regions: RegionLocks
    wil: WriteIntentLog | None


@runtime_checkable
class Guarded(Protocol):
    """A volume with guards of its own (a shadow set). A volume stacked on it uses its
    `guards` and calls the `_held` methods with the gate (writes), the region lock of the
    range and the write intent (writes) already held, so nothing is taken twice. The region
    stripes are whole grains of the volume's maps."""

    @property
    def guards(self) -> Guards: ...

    def readinto_held(self, offset: int, bufs: Sequence[memoryview]) -> None: ...

    def write_held(self, offset: int, bufs: Sequence[memoryview], fua: bool = False) -> None: ...

    def unmap_held(self, offset: int, length: int) -> None: ...
