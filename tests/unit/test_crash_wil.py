"""The write-intent log under the crash model: crash at every fault point, lose power (tearing
what was not yet durable), reopen, and check that the log covers every write that may differ
between the two members."""

from __future__ import annotations

import contextlib
import random
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.crashmodel import (
    CrashableFile,
    CrashableVolume,
    CrashAt,
    fault_points,
    run_crashing,
)
from vscsi.durable import faults
from vscsi.tracker import DirtyMap, WriteIntentLog
from vscsi.tracker import wil as wil_module

REGION, GRAIN, SIZE = 4096, 512, 4 * 4096  # few regions: writes often share one
LATER = 1e12  # a flush_idle `now` at which every idle region qualifies


def _log(f: CrashableFile, **kw: object) -> WriteIntentLog:
    return WriteIntentLog(
        "wil", SIZE, region=REGION, grain=GRAIN, idle_delay=0, background=False, file=f, **kw
    )  # type: ignore[arg-type]


def _fresh_log_file() -> CrashableFile:
    """A formatted log, closed and reopened (as the durable image alone)."""
    f = CrashableFile(name="wil")
    _log(f).close()
    return f.power_loss()


# an operation: ("write", sector, sectors, keep_in_flight) | ("end", k) | ("flush",)
# | ("clear", inner operations, inner ops after the member flushes?, checkpoint fails?)
# | ("mark_clean",) | ("hold",) | ("release",)
_write = st.tuples(
    st.just("write"), st.integers(0, SIZE // GRAIN - 1), st.integers(1, 12), st.booleans()
)
_end = st.tuples(st.just("end"), st.integers(0, 7))
_inner = st.lists(st.one_of(_write, _end), max_size=3)
_clear = st.tuples(st.just("clear"), _inner, st.booleans(), st.booleans())
_op = st.one_of(
    _write,
    _write,
    _write,
    _end,
    _clear,
    _clear,
    st.sampled_from([("flush",), ("mark_clean",), ("hold",), ("release",)]),
)


@dataclass
class Mirror:
    """Two members A and B under one write-intent log, and what the test knows: the writes in
    flight (begin returned, not ended) and the ended writes whose data is not yet durable."""

    f: CrashableFile
    a: CrashableVolume = field(default_factory=lambda: CrashableVolume(SIZE, name="A"))
    b: CrashableVolume = field(default_factory=lambda: CrashableVolume(SIZE, name="B"))
    in_flight: list[tuple[int, int]] = field(default_factory=list)
    unflushed: list[tuple[int, int]] = field(default_factory=list)
    serial: int = 0
    log: WriteIntentLog | None = None
    stream: bool = False  # the writes are a host's (`begin(..., stream=True)`): they mark ahead
    lock: threading.Lock = field(default_factory=threading.Lock)
    ordered: threading.Lock = field(default_factory=threading.Lock)

    def open(self) -> None:
        self.log = _log(self.f, before_clear=self.checkpoint)
        self._checkpoint_ops: list[tuple] = []
        self._checkpoint_late = False
        self._checkpoint_fails = False

    def write(self, sector: int, sectors: int, keep: bool) -> None:
        assert self.log is not None
        offset = sector * GRAIN
        length = min(sectors * GRAIN, SIZE - offset)
        self.serial += 1
        data = memoryview(struct.pack("<Q", self.serial) * (length // 8))
        self.log.begin(offset, length, self.stream)
        self.in_flight.append((offset, length))
        self.a.write(offset, [data])
        if not keep:
            self._finish(len(self.in_flight) - 1, data)

    def end(self, k: int) -> None:
        if self.in_flight:
            i = k % len(self.in_flight)
            offset, length = self.in_flight[i]
            self._finish(i, memoryview(self.a.read(offset, length)))

    def _finish(self, i: int, data: memoryview) -> None:
        assert self.log is not None
        offset, length = self.in_flight[i]
        self.b.write(offset, [data])
        del self.in_flight[i]
        self.unflushed.append((offset, length))
        self.log.end(offset, length)

    def flush(self) -> None:
        done = list(self.unflushed)
        self.a.flush()
        self.b.flush()
        self.unflushed = [w for w in self.unflushed if w not in done]

    def checkpoint(self) -> None:
        """before_clear: the members' flush, with writes racing it before or after."""
        if not self._checkpoint_late:
            self.apply_all(self._checkpoint_ops)
        if self._checkpoint_fails:
            raise OSError(5, "checkpoint failed")
        self.flush()
        if self._checkpoint_late:
            self.apply_all(self._checkpoint_ops)

    def apply(self, op: tuple) -> None:
        assert self.log is not None
        kind = op[0]
        if kind == "write":
            self.write(*op[1:])
        elif kind == "end":
            self.end(op[1])
        elif kind == "flush":
            self.flush()
        elif kind == "clear":
            self._checkpoint_ops, self._checkpoint_late, self._checkpoint_fails = op[1:]
            with contextlib.suppress(OSError):  # a failed checkpoint keeps the regions
                self.log.flush_idle(LATER)
        elif kind == "mark_clean":
            self.flush()
            self.log.mark_clean()
        elif kind == "hold":
            self.log.hold()
        else:
            self.log.release()

    def apply_all(self, ops: list[tuple]) -> None:
        for op in ops:
            self.apply(op)

    def check_after_power_loss(self, rng: random.Random) -> None:
        """Reopen everything as the next boot would and check what the minimerge relies on."""
        a, b = self.a.power_loss(rng), self.b.power_loss(rng)
        with WriteIntentLog.open_existing(
            "wil", SIZE, region=REGION, grain=GRAIN, file=self.f.power_loss(rng)
        ) as log:
            dirty = log.recover()
        for offset, length in self.in_flight + self.unflushed:
            assert _covered(dirty, offset, length), (offset, length)
        for r in range(SIZE // REGION):
            if not dirty.test(r * REGION, REGION):
                assert a.read(r * REGION, REGION) == b.read(r * REGION, REGION), r


def _covered(dirty: DirtyMap, offset: int, length: int) -> bool:
    return all(dirty.test(g, 1) for g in range(offset, offset + length, GRAIN))


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(ops=st.lists(_op, max_size=14), tear=st.booleans())
def test_crash_at_every_fault_point_leaves_every_differing_region_marked(
    ops: list[tuple], tear: bool
) -> None:
    _crash_at_every_fault_point(ops, tear, stream=False)


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(ops=st.lists(_op, max_size=14), tear=st.booleans())
def test_crash_at_every_fault_point_with_host_writes_marking_ahead(
    ops: list[tuple], tear: bool
) -> None:
    """The same with every write a host's stream (any size marks ahead here): the marks made
    ahead are flushed with the write's own, and a clear may race them."""
    with mock.patch.object(wil_module, "STREAM", GRAIN):
        _crash_at_every_fault_point(ops, tear, stream=True)


def _crash_at_every_fault_point(ops: list[tuple], tear: bool, stream: bool) -> None:
    f = _fresh_log_file()

    def scenario(m: Mirror) -> None:
        m.open()
        m.apply_all(ops)

    whole = Mirror(f.power_loss(), stream=stream)
    points = fault_points(lambda: scenario(whole))
    whole.check_after_power_loss(random.Random(0) if tear else None)  # power loss at the end
    for k in range(len(points)):
        m = Mirror(f.power_loss(), stream=stream)
        assert run_crashing(lambda m=m: scenario(m), k) == points[k]
        m.check_after_power_loss(random.Random(k) if tear else None)


def test_the_exhaustive_crash_test_sees_the_checkpoint_race() -> None:
    """The D1 scenario through the crash model: a write begins during the checkpoint on an
    idle, marked region and is in flight at the crash (the old log cleared it)."""
    m = Mirror(_fresh_log_file())
    m.open()
    m.apply_all(
        [
            ("write", 0, 1, False),
            ("clear", [("write", 1, 1, True)], True, False),
        ]
    )
    assert m.in_flight == [(GRAIN, GRAIN)]
    m.check_after_power_loss(random.Random(1))


def _flush_members(m: Mirror) -> None:
    """before_clear for the threaded run: what was ended before the call becomes durable.
    It takes a while, as a real flush does, so that writes race it."""
    with m.lock:
        done = list(m.unflushed)
    time.sleep(0.0002)
    m.a.flush()
    m.b.flush()
    with m.lock:
        m.unflushed = [w for w in m.unflushed if w not in done]


def _writer(m: Mirror, seed: int) -> None:
    assert m.log is not None
    w = random.Random(seed)
    for n in range(200):
        offset = w.randrange(SIZE // GRAIN) * GRAIN
        length = min(w.randrange(1, 9) * GRAIN, SIZE - offset)
        data = [memoryview(struct.pack("<II", seed, n) * (length // 8))]
        m.log.begin(offset, length, m.stream)
        with m.lock:
            m.in_flight.append((offset, length))
        with m.ordered:  # overlapping writes reach A and B in one order, as region locks do
            m.a.write(offset, data)
            time.sleep(0)  # let the cleaner run while the write is in flight
            m.b.write(offset, data)
        with m.lock:
            m.in_flight.remove((offset, length))
            m.unflushed.append((offset, length))
        m.log.end(offset, length)


def _borrower(m: Mirror, seed: int) -> None:
    """The ring's compiled path: borrows the log, writes A then B only where `ready` says the
    mark is durable, flags what it wrote `touched`, gives the log back."""
    assert m.log is not None
    w = random.Random(seed)
    for n in range(300):
        lent = m.log.lend()
        if lent is None:
            continue  # a clear is waiting: the write would take the usual path
        ready, touched = lent
        try:
            for _ in range(w.randrange(1, 4)):
                r = w.randrange(SIZE // REGION)
                if not ready[r]:
                    continue
                touched[r] = 1
                offset, length = r * REGION + w.randrange(REGION // GRAIN) * GRAIN, GRAIN
                data = [memoryview(struct.pack("<II", seed, n) * (length // 8))]
                with m.lock:
                    m.in_flight.append((offset, length))
                with m.ordered:
                    m.a.write(offset, data)
                    time.sleep(0)
                    m.b.write(offset, data)
                with m.lock:
                    m.in_flight.remove((offset, length))
                    m.unflushed.append((offset, length))
        finally:
            m.log.give_back()


def _cleaner(m: Mirror, _: int) -> None:
    assert m.log is not None
    for _ in range(100):
        m.log.flush_idle(LATER)


def _until_crash(fn: Callable[[Mirror, int], None], m: Mirror, n: int) -> None:
    with contextlib.suppress(faults.Crash):
        fn(m, n)


def _race_until_crash(
    workers: list[tuple[Callable[[Mirror, int], None], int]], seed: int, stream: bool = False
) -> None:
    """`workers` (function, seed) in threads over one log, for 2 s and at least 5 runs; each
    run the process dies at a random fault point, then the power fails."""
    rnd = random.Random(seed)
    deadline = time.monotonic() + 2
    runs = 0
    while time.monotonic() < deadline or runs < 5:
        runs += 1
        m = Mirror(_fresh_log_file(), stream=stream)
        m.log = _log(m.f, before_clear=lambda m=m: _flush_members(m))
        threads = [threading.Thread(target=_until_crash, args=(fn, m, s)) for fn, s in workers]
        with faults.installed(CrashAt(rnd.randrange(400))):
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        m.check_after_power_loss(random.Random(runs))


def test_threads_racing_the_cleaner_and_a_crash_at_a_random_point() -> None:
    """Writers and a cleaner in threads; the process dies at a random fault point."""
    _race_until_crash([(_writer, 0), (_writer, 1), (_writer, 2), (_cleaner, 0)], 99)


def test_a_borrower_racing_writers_the_cleaner_and_a_crash_at_a_random_point() -> None:
    """As above, with a borrower of the log writing where marks are durable (`lend`)."""
    _race_until_crash([(_writer, 1), (_writer, 2), (_borrower, 3), (_cleaner, 0)], 7)


def test_a_borrower_writing_where_host_writes_marked_ahead_racing_a_crash() -> None:
    """As above, every write a host's stream that marks ahead: the borrower writes in regions
    marked ahead (ready only once durable and not cleared since) while the cleaner clears."""
    with mock.patch.object(wil_module, "STREAM", GRAIN):
        _race_until_crash(
            [(_writer, 1), (_writer, 2), (_borrower, 3), (_cleaner, 0)], 11, stream=True
        )


def test_a_failed_log_sync_is_rewritten_before_a_later_begin_returns() -> None:
    """After a failed fdatasync the page may never reach the disk; a later begin on the same
    region must not trust the earlier write."""
    f = _fresh_log_file()
    log = _log(f)
    f.fail("fdatasync")
    with pytest.raises(OSError):
        log.begin(0, 512)
    f.heal()
    log.begin(0, 512)
    assert list(_log(f.power_loss()).recover().extents()) == [(0, REGION)]
    log.end(0, 512)
    assert log.mark_clean()


def test_a_begin_that_fails_is_not_left_in_flight() -> None:
    f = _fresh_log_file()
    log = _log(f)
    f.fail("pwrite")
    with pytest.raises(OSError):
        log.begin(3 * REGION, 512)
    f.heal()
    assert log.mark_clean()  # nothing in flight: the caller never issued that write
    assert list(_log(f.power_loss()).recover().extents()) == []


def test_a_region_is_ready_only_where_its_mark_is_durable_at_every_fault_point() -> None:
    """What a compiled writer may write without a `begin` (`ready`) is marked in the log as a
    power loss would leave it, at every fault point of host writes that mark ahead (each
    marks the regions after it) interleaved with clears."""
    f = _fresh_log_file()
    regions = range(SIZE // REGION)
    checked: list[str] = []
    inside = False
    with mock.patch.object(wil_module, "STREAM", GRAIN):
        log = _log(f)

        def check(name: str) -> None:
            nonlocal inside
            if inside:  # the durable copy's own fault points
                return
            inside = True
            try:
                with WriteIntentLog.open_existing(
                    "wil", SIZE, region=REGION, grain=GRAIN, file=f.power_loss(),
                    background=False,
                ) as durable:  # fmt: skip
                    marked = set(durable._marked())
                ready = {r for r in regions if log._ready[r]}
                assert ready <= marked, (name, ready, marked)
                checked.append(name)
            finally:
                inside = False

        with faults.installed(check):
            for _ in range(3):
                for r in regions:
                    log.begin(r * REGION, GRAIN, stream=True)
                    log.end(r * REGION, GRAIN)
                log.flush_idle(LATER)
        log.close()
    assert "wil.flush.page" in checked and "wil.clear.flush" in checked
