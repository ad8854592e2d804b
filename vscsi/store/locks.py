"""The two locks of the pair write path: a write gate (quiesce for a single-instant split) and
striped region locks (a copy chunk's read+write and a host write to the same region never
interleave, so the host's data is what ends on the S-VOL)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


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
        ids = sorted({i % len(self._locks) for i in range(first, last + 1)})
        for i in ids:
            self._locks[i].acquire()
        try:
            yield
        finally:
            for i in reversed(ids):
                self._locks[i].release()
