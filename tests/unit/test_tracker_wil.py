"""WriteIntentLog: durability, lazy clearing, torn pages, and SIGKILL at random moments."""

import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest

from vscsi.tracker import InvalidLogError, WriteIntentLog
from vscsi.tracker.wil import _BITS_PER_PAGE, AHEAD, PAGE, STREAM

MiB = 1 << 20


def test_begin_on_durable_region_does_no_io(tmp_path: Path) -> None:
    with WriteIntentLog(str(tmp_path / "wil"), 64 * MiB, region=MiB) as log:
        log.begin(0, 4096)
        flushes = log.flushes
        log.begin(4096, 4096)
        log.end(0, 4096)
        log.end(4096, 4096)
        log.begin(MiB - 1, 1)
        assert log.flushes == flushes
        log.begin(MiB - 1, 2)  # reaches the next region
        assert log.flushes == flushes + 1


def test_concurrent_begins_share_flushes(tmp_path: Path) -> None:
    with WriteIntentLog(str(tmp_path / "wil"), 1024 * MiB, region=MiB) as log:
        barrier = threading.Barrier(8)

        def work(k: int) -> None:
            barrier.wait()
            for i in range(50):  # every other region: no sequential stream to mark ahead of
                log.begin((k * 100 + 2 * i) * MiB, 512)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert log.dirty_regions() == 400
        assert log.flushes <= 400


def test_a_stream_of_large_writes_marks_ahead_in_one_flush_and_unused_marks_clear(
    tmp_path: Path,
) -> None:
    with WriteIntentLog(str(tmp_path / "wil"), 64 * MiB, region=MiB, background=False) as log:
        log.begin(60 * MiB, MiB, stream=True)  # nothing marked before it: nothing ahead
        log.begin(10 * MiB, 4096)
        log.begin(11 * MiB, 4096, stream=True)  # small, after a marked region: nothing ahead
        log.begin(12 * MiB, MiB)  # a copy's chunk, after a marked region: nothing ahead
        assert log._marked() == [10, 11, 12, 60]
        flushes = log.flushes
        log.begin(13 * MiB, STREAM, stream=True)  # a large host write: 14 .. 13 + AHEAD too
        assert log.flushes == flushes + 1
        assert log._marked() == [10, 11, 12, *range(13, 14 + AHEAD), 60]
        ready, _ = log.lend()  # type: ignore[misc]
        assert all(ready[r] for r in range(13, 14 + AHEAD))  # a compiled writer may go ahead
        log.give_back()
        for r in range(14, 14 + AHEAD):  # the stream's next writes need no flush
            log.begin(r * MiB, MiB, stream=True)
            log.end(r * MiB, MiB)
        assert log.flushes == flushes + 1
        log.begin((14 + AHEAD) * MiB, MiB, stream=True)  # the next fresh region: ahead again
        assert log.dirty_regions() == 6 + 2 * AHEAD
        for r, n in ((10, 4096), (11, 4096), (12, MiB), (13, STREAM), (60, MiB),
                     (14 + AHEAD, MiB)):  # fmt: skip
            log.end(r * MiB, n)
        assert log.flush_idle(time.monotonic() + 60) == 6 + 2 * AHEAD  # unused ones too
        ready, _ = log.lend()  # type: ignore[misc]
        assert not any(ready) and log.dirty_regions() == 0
        log.give_back()


def test_random_small_writes_in_a_hot_area_mark_only_what_they_write(tmp_path: Path) -> None:
    """What a crash costs stays what was written: a host writing 4 KiB blocks at random in
    4 MiB logs (and after a crash copies) those 4 regions, no more."""
    rng = random.Random(5)
    with WriteIntentLog(str(tmp_path / "wil"), 64 * MiB, region=MiB, background=False) as log:
        for _ in range(2000):
            at = rng.randrange(4 * MiB // 4096) * 4096
            log.begin(at, 4096, stream=True)
            log.end(at, 4096)
        assert log._marked() == [0, 1, 2, 3]


def test_a_mark_ahead_cleared_before_its_flush_is_not_ready(tmp_path: Path) -> None:
    """The regions marked ahead are not in flight: one idle-cleared between the mark and the
    flush that made it durable must not be handed to a compiled writer as ready."""
    with WriteIntentLog(str(tmp_path / "wil"), 64 * MiB, region=MiB, background=False) as log:
        log.begin(0, 2 * MiB)
        log.end(0, 2 * MiB)
        real_flush = log._flush
        cleared: list[int] = []

        def flush_after_a_clear(need: int) -> None:
            log._flush = real_flush  # type: ignore[method-assign]
            cleared.append(log.flush_idle(time.monotonic() + 60))
            real_flush(need)

        log._flush = flush_after_a_clear  # type: ignore[method-assign]
        log.begin(2 * MiB, STREAM, stream=True)  # marks 3 .. 2 + AHEAD, then a clear takes them
        assert cleared == [2 + AHEAD]  # regions 0, 1 and the ones ahead
        ready, _ = log.lend()  # type: ignore[misc]
        assert ready[2] and not any(ready[3 : 3 + AHEAD])
        log.give_back()
        log.end(2 * MiB, STREAM)


def test_idle_regions_clear_lazily_but_not_in_flight_or_held(tmp_path: Path) -> None:
    path = str(tmp_path / "wil")
    with WriteIntentLog(path, 64 * MiB, region=MiB, idle_delay=3600) as log:
        log.begin(0, 4096)
        log.begin(5 * MiB, 4096)
        log.end(0, 4096)
        assert log.flush_idle() == 0  # not idle long enough
        later = time.monotonic() + 7200
        log.hold()
        assert log.flush_idle(later) == 0
        log.release()
        assert log.flush_idle(later) == 1  # region 5 is still in flight
        assert log.dirty_regions() == 1
        assert not log.mark_clean()
        log.end(5 * MiB, 4096)
        assert log.mark_clean()
        assert log.dirty_regions() == 0


def test_close_clears_ended_writes_at_once_and_keeps_those_in_flight(tmp_path: Path) -> None:
    """A clean stop right after a write must not look like a crash at the next start (a
    remote S array would suspend its pair and recopy), whatever the idle delay."""
    path = str(tmp_path / "wil")
    log = WriteIntentLog(path, 64 * MiB, region=MiB, idle_delay=3600)
    made_durable: list[int] = []
    log.add_before_clear(lambda: made_durable.append(1))
    log.begin(3 * MiB, 10)
    log.end(3 * MiB, 10)
    log.begin(7 * MiB, 10)  # still in flight at the stop
    log.close()
    assert made_durable  # cleared only after the data was made durable
    again = WriteIntentLog.open_existing(path, 64 * MiB, region=MiB)
    assert list(again.recover().extents()) == [(7 * MiB, MiB)]
    again.flush_idle(time.monotonic() + 7200)  # recovered marks wait for mark_clean
    assert again.dirty_regions() == 1
    again.close()


def _recovered(path: str, size: int, region: int) -> list[tuple[int, int]]:
    """What the next start would merge (the log reopened as after a SIGKILL)."""
    with WriteIntentLog.open_existing(path, size, region=region) as again:
        return list(again.recover().extents())


def test_write_begun_during_checkpoint_stays_marked(tmp_path: Path) -> None:
    """A write beginning on an idle, marked region while before_clear runs does no I/O; the
    region must not be cleared under it."""
    path = str(tmp_path / "wil")
    log: WriteIntentLog | None = None
    racing = [True]

    def checkpoint() -> None:
        assert log is not None
        if racing:  # the first checkpoint only
            racing.pop()
            log.begin(0, 4096)  # a host write starts while the checkpoint flushes the members

    log = WriteIntentLog(path, 64 * MiB, region=MiB, idle_delay=3600, before_clear=checkpoint)
    log.begin(0, 4096)
    log.end(0, 4096)
    assert log.flush_idle(time.monotonic() + 7200) == 0
    assert _recovered(path, 64 * MiB, MiB) == [(0, MiB)]  # the write is still in flight
    log.end(0, 4096)
    assert log.flush_idle(time.monotonic() + 7200) == 1
    log.close()
    assert _recovered(path, 64 * MiB, MiB) == []


def test_write_begun_and_ended_during_checkpoint_keeps_region(tmp_path: Path) -> None:
    """Its data may have missed the checkpoint's flush: the region waits for the next one."""
    path = str(tmp_path / "wil")
    log: WriteIntentLog | None = None
    calls: list[int] = []

    def checkpoint() -> None:
        assert log is not None
        calls.append(1)
        if len(calls) == 1:
            log.begin(MiB, 512)
            log.end(MiB, 512)

    log = WriteIntentLog(path, 64 * MiB, region=MiB, idle_delay=3600, before_clear=checkpoint)
    for off in (0, MiB):
        log.begin(off, 512)
        log.end(off, 512)
    later = time.monotonic() + 7200
    assert log.flush_idle(later) == 1  # region 0 only
    assert _recovered(path, 64 * MiB, MiB) == [(MiB, MiB)]
    assert log.flush_idle(later) == 1  # the next checkpoint covers it
    assert log.dirty_regions() == 0
    log.close()


def test_a_borrower_writing_during_a_checkpoint_keeps_its_region_until_given_back(
    tmp_path: Path,
) -> None:
    """A borrower (the ring's compiled path) writes only where `ready` says the mark is
    durable and flags the region touched. A write it makes after the checkpoint's flush may
    not be durable: the clear waits for the log to come back and then keeps that region,
    while another idle region is cleared. No borrower is let in while the clear is waited on."""
    path = str(tmp_path / "wil")
    log: WriteIntentLog | None = None
    checkpointed = threading.Event()
    calls: list[int] = []

    def checkpoint() -> None:
        calls.append(1)
        checkpointed.set()

    log = WriteIntentLog(path, 64 * MiB, region=MiB, idle_delay=3600, before_clear=checkpoint)
    assert log.lend() == (bytearray(64), bytearray(64))  # nothing is ready before a begin
    log.give_back()
    for off in (0, MiB):
        log.begin(off, 512)
        log.end(off, 512)
    lent = log.lend()
    assert lent is not None
    ready, touched = lent
    assert ready[:3] == b"\x01\x01\x00"
    cleared: list[int] = []
    t = threading.Thread(target=lambda: cleared.append(log.flush_idle(time.monotonic() + 7200)))
    t.start()
    assert checkpointed.wait(5)
    touched[1] = 1  # the borrower writes region 1 after the checkpoint's flush
    t.join(0.3)
    assert t.is_alive() and log.lend() is None  # the clear waits for the borrower
    log.give_back()
    t.join(5)
    assert cleared == [1] and ready[:2] == b"\x00\x01"
    assert _recovered(path, 64 * MiB, MiB) == [(MiB, MiB)]
    assert log.flush_idle(time.monotonic() + 7200) == 1  # the next checkpoint covers it
    assert log.dirty_regions() == 0 and ready[:2] == b"\x00\x00" and len(calls) == 2
    log.close()


def test_a_log_reopened_with_marks_is_ready_there(tmp_path: Path) -> None:
    """Marks a crash left are durable: a borrower may write there at once."""
    path = str(tmp_path / "wil")
    log = WriteIntentLog(path, 64 * MiB, region=MiB, idle_delay=3600, background=False)
    log.begin(3 * MiB, 512)  # never ended: as if the daemon died
    log._io.close()
    log = WriteIntentLog(path, 64 * MiB, region=MiB, idle_delay=3600, background=False)
    lent = log.lend()
    assert lent is not None and lent[0][:4] == b"\x00\x00\x00\x01"
    log.give_back()
    log.close()


def test_failed_checkpoint_keeps_regions_and_the_cleaner_retries(tmp_path: Path) -> None:
    path = str(tmp_path / "wil")
    failures = [OSError(5, "pair record save failed")] * 3
    attempts: list[float] = []

    def checkpoint() -> None:
        attempts.append(time.monotonic())
        if failures:
            raise failures.pop()

    log = WriteIntentLog(path, 64 * MiB, region=MiB, idle_delay=0.01, before_clear=checkpoint)
    log.begin(0, 512)
    log.end(0, 512)
    deadline = time.monotonic() + 10
    while failures and time.monotonic() < deadline:
        assert _recovered(path, 64 * MiB, MiB) == [(0, MiB)]
        time.sleep(0.005)
    while log.dirty_regions() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert log.dirty_regions() == 0  # the cleaner survived the failures and cleared it
    assert len(attempts) == 4
    log.close()
    assert _recovered(path, 64 * MiB, MiB) == []


def test_failed_checkpoint_raises_to_a_direct_caller_and_keeps_every_region(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "wil")

    def checkpoint() -> None:
        raise OSError(5, "volume flush failed")

    log = WriteIntentLog(path, 64 * MiB, region=MiB, idle_delay=3600, before_clear=checkpoint)
    for off in (0, 2 * MiB, 7 * MiB):
        log.begin(off, 512)
        log.end(off, 512)
    with pytest.raises(OSError, match="volume flush failed"):
        log.flush_idle(time.monotonic() + 7200)
    assert log.dirty_regions() == 3
    log.close()  # logs the failure, keeps the marks
    assert _recovered(path, 64 * MiB, MiB) == [(0, MiB), (2 * MiB, MiB), (7 * MiB, MiB)]


def test_torn_page_counts_as_all_dirty(tmp_path: Path) -> None:
    path = tmp_path / "wil"
    nregions = _BITS_PER_PAGE + 1000
    size = nregions * 512
    with WriteIntentLog(str(path), size, region=512, grain=512, offset=PAGE) as log:
        log.begin(7 * 512, 1)
    raw = bytearray(path.read_bytes())
    raw[PAGE * 3 + 100] ^= 0xFF  # second bitmap page, after the header page at `offset`
    path.write_bytes(bytes(raw))
    with WriteIntentLog.open_existing(str(path), size, region=512, grain=512, offset=PAGE) as log:
        got = list(log.recover().extents())
    assert got == [(7 * 512, 512), (_BITS_PER_PAGE * 512, 1000 * 512)]


def test_lost_or_foreign_log_is_invalid(tmp_path: Path) -> None:
    path = str(tmp_path / "wil")
    with pytest.raises(InvalidLogError):
        WriteIntentLog.open_existing(path, 64 * MiB)
    WriteIntentLog(path, 64 * MiB).close()
    with pytest.raises(InvalidLogError):
        WriteIntentLog.open_existing(path, 128 * MiB)
    log = WriteIntentLog(path, 32 * MiB)
    assert not log.valid
    with pytest.raises(InvalidLogError):
        log.recover()
    log.close()


def _writer(path: str, size: int, region: int, out: int, seed: int, checkpoint: float) -> None:
    """The child: 4 threads write forever, reporting each begun and each ending range. With a
    `checkpoint` time, before_clear takes that long (as a member flush does) and writes last
    longer than it, so writes begin during the checkpoint and are still in flight after it."""
    log = WriteIntentLog(
        path,
        size,
        region=region,
        idle_delay=0.005,
        before_clear=(lambda: time.sleep(checkpoint)) if checkpoint else None,
    )
    log.mark_clean()
    longest = max(checkpoint * 3, 0.0005)

    def work(k: int) -> None:
        rnd = random.Random(seed * 10 + k)
        while True:
            off = rnd.randrange(size)
            length = rnd.choice([512, 4096, 65536, 3 * region])
            log.begin(off, length)
            os.write(out, f"b {k} {off} {length}\n".encode())
            time.sleep(rnd.random() * longest)
            os.write(out, f"e {k}\n".encode())
            log.end(off, length)

    for k in range(4):
        threading.Thread(target=work, args=(k,), daemon=True).start()
    time.sleep(60)


def _in_flight(report: bytes) -> list[tuple[int, int]]:
    current: dict[str, tuple[int, int]] = {}
    for line in report.decode().splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0] == "b":
            current[parts[1]] = (int(parts[2]), int(parts[3]))
        elif len(parts) == 2 and parts[0] == "e":
            current.pop(parts[1], None)
    return list(current.values())


@pytest.mark.parametrize(
    ("size", "checkpoint", "seconds"),
    [(64 * MiB, 0.0, 15), (8 * MiB, 0.001, 10)],
    ids=["no-checkpoint", "writes-race-the-checkpoint"],
)
def test_sigkill_never_loses_an_in_flight_write(
    tmp_path: Path, size: int, checkpoint: float, seconds: float
) -> None:
    path, region = str(tmp_path / "wil"), MiB
    rnd = random.Random(1234)
    checked = 0
    deadline = time.monotonic() + seconds
    for i in range(300):
        if time.monotonic() > deadline and checked >= 50:  # a loaded host takes longer
            break
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                _writer(path, size, region, w, i, checkpoint)
            finally:
                os._exit(1)
        os.close(w)
        time.sleep(rnd.random() * 0.03)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        with os.fdopen(r, "rb") as pipe:
            report = pipe.read()
        if not Path(path).exists():
            continue
        with WriteIntentLog.open_existing(path, size, region=region) as log:
            dirty = log.recover()
        for off, length in _in_flight(report):
            end = min(off + length, size)
            for grain in range(off // dirty.grain, (end - 1) // dirty.grain + 1):
                assert dirty.test(grain * dirty.grain, 1), (i, off, length)
            checked += 1
    assert checked >= 50
