"""The crash model's fakes and hooks behave as the crash tests assume."""

import errno
import random
import threading

import pytest

from tests.unit.crashmodel import (
    SECTOR,
    CrashableFile,
    CrashableVolume,
    CrashAt,
    fault_points,
    run_crashing,
)
from vscsi.durable import faults
from vscsi.store.base import MediumError, Volume


def _w(vol: CrashableVolume, offset: int, data: bytes, fua: bool = False) -> None:
    vol.write(offset, [memoryview(data)], fua)


def test_file_writes_are_volatile_until_fdatasync() -> None:
    f = CrashableFile()
    f.pwrite(b"a" * 4096, 0)
    assert f.pread(4096, 0) == b"a" * 4096
    assert f.power_loss().pread(4096, 0) == b""  # nothing durable: an empty file
    f.fdatasync()
    f.pwrite(b"b" * 100, 4096)
    f.pwrite(b"c" * 10, 5)
    after = f.power_loss()
    assert after.pread(8192, 0) == b"a" * 4096
    assert f.pread(20, 0) == b"aaaaaccccccccccaaaaa"


def test_file_power_loss_tears_unsynced_pages_at_sector_granularity() -> None:
    f = CrashableFile(bytes(4096))
    f.pwrite(b"\xff" * 4096, 0)
    seen = set()
    for seed in range(40):
        page = f.power_loss(random.Random(seed)).pread(4096, 0)
        sectors = [page[i : i + SECTOR] for i in range(0, 4096, SECTOR)]
        assert all(s in (bytes(SECTOR), b"\xff" * SECTOR) for s in sectors)
        seen.add(tuple(s[0] for s in sectors))
    assert len(seen) > 2  # whole, lost and torn pages all happen


def test_failed_fdatasync_never_makes_its_writes_durable() -> None:
    f = CrashableFile(bytes(4096))
    f.pwrite(b"x" * 512, 0)
    f.fail("fdatasync")
    with pytest.raises(OSError) as e:
        f.fdatasync()
    assert e.value.errno == errno.EIO
    f.heal()
    f.fdatasync()  # succeeds, but the failed writeback's data is gone
    assert f.pread(512, 0) == b"x" * 512
    assert f.power_loss().pread(512, 0) == bytes(512)
    f.pwrite(b"x" * 512, 0)  # a rewrite is what makes it durable
    f.fdatasync()
    assert f.power_loss().pread(512, 0) == b"x" * 512


def test_volume_honours_the_volume_protocol_and_its_cache() -> None:
    vol = CrashableVolume(64 * 1024, name="A")
    assert isinstance(vol, Volume)
    _w(vol, 0, b"1" * 1024)
    _w(vol, 4096, b"2" * 512, fua=True)
    buf = bytearray(1024)
    vol.readinto(0, [memoryview(buf)])
    assert buf == b"1" * 1024
    after = vol.power_loss()
    assert after.read(0, 1024) == bytes(1024)  # cached write lost
    assert after.read(4096, 512) == b"2" * 512  # FUA write kept
    vol.flush()
    assert vol.power_loss().read(0, 1024) == b"1" * 1024
    through = CrashableVolume(4096, write_cache=False)
    _w(through, 0, b"3" * 512)
    assert through.power_loss().read(0, 512) == b"3" * 512


def test_volume_failures_are_medium_errors_until_healed() -> None:
    vol = CrashableVolume(64 * 1024)
    vol.fail("write", offset=8192)
    _w(vol, 0, b"a" * 512)
    with pytest.raises(MediumError) as e:
        _w(vol, 7680, b"b" * 1024)
    assert (e.value.op, e.value.offset, e.value.errno) == ("write", 8192, errno.EIO)
    vol.fail("read")
    with pytest.raises(MediumError):
        vol.readinto(0, [memoryview(bytearray(512))])
    vol.fail("flush")
    with pytest.raises(MediumError):
        vol.flush()
    vol.heal()
    vol.flush()
    assert vol.read(0, 512) == b"a" * 512
    assert vol.power_loss().read(0, 512) == bytes(512)  # lost with the failed flush


def test_a_crash_during_a_fua_write_tears_it() -> None:
    vol = CrashableVolume(64 * 1024, name="A")
    assert run_crashing(lambda: _w(vol, 0, b"z" * 1024, fua=True), 0, "A.write.cached")
    outcomes = {vol.power_loss(random.Random(s)).read(0, 1024).count(b"z") for s in range(40)}
    assert outcomes == {0, 512, 1024}


def test_fault_points_are_listed_and_crash_stops_every_later_io() -> None:
    vol = CrashableVolume(64 * 1024, name="A")
    f = CrashableFile(name="log")

    def run() -> None:
        _w(vol, 0, b"a" * 512)
        f.pwrite(b"b" * 512, 0)
        f.fdatasync()
        vol.flush()

    assert fault_points(run) == ["A.write", "log.pwrite", "log.fdatasync", "A.flush"]
    vol, f = CrashableVolume(64 * 1024, name="A"), CrashableFile(name="log")
    assert run_crashing(run, 1) == "log.pwrite"
    assert f.pread(512, 0) == b""
    hook = CrashAt(0)
    with faults.installed(hook), pytest.raises(faults.Crash):
        vol.flush()

    def other_thread() -> None:
        with pytest.raises(faults.Crash):  # the process is dead in every thread
            f.fdatasync()

    with faults.installed(hook):
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
    assert run_crashing(run, 10) is None  # finished before a 10th point
