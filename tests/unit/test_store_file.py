"""The file backstore: sparse images, zero-copy vectored I/O, hole punching, extents."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vscsi.store import file as file_mod
from vscsi.store.base import MediumError, Volume
from vscsi.store.file import FileVolume, StoreConfigError


@pytest.fixture
def vol(tmp_path: Path) -> FileVolume:
    v = FileVolume("t", str(tmp_path / "t.img"), size=4 << 20, create=True)
    yield v
    v.close()


def test_is_a_volume_and_sparse(vol: FileVolume, tmp_path: Path) -> None:
    assert isinstance(vol, Volume)
    assert vol.size == 4 << 20 and vol.block_size == 512 and vol.supports_unmap
    assert os.stat(tmp_path / "t.img").st_blocks == 0


def test_vectored_round_trip(vol: FileVolume) -> None:
    a, b = bytearray(os.urandom(1024)), bytearray(os.urandom(3072))
    vol.write(8192, [memoryview(a), memoryview(b)], fua=True)
    out1, out2 = bytearray(2048), bytearray(2048)
    vol.readinto(8192, [memoryview(out1), memoryview(out2)])
    assert out1 + out2 == a + b


def test_unmap_reads_zeroes_and_reports_extents(vol: FileVolume) -> None:
    data = bytearray(b"\xaa" * (1 << 20))
    vol.write(0, [memoryview(data)])
    vol.flush()
    assert vol.extent_at(0).mapped
    vol.unmap(256 << 10, 256 << 10)
    out = bytearray(256 << 10)
    vol.readinto(256 << 10, [memoryview(out)])
    assert out == bytes(len(out))
    e = vol.extent_at(0)
    assert e.mapped and e.offset == 0 and e.length == 256 << 10
    hole = vol.extent_at(256 << 10)
    assert not hole.mapped and hole.length == 256 << 10
    tail = vol.extent_at(1 << 20)
    assert not tail.mapped and tail.offset + tail.length == vol.size


def test_read_only_rejects_descriptor_writes(tmp_path: Path) -> None:
    p = tmp_path / "ro.img"
    p.write_bytes(bytes(4096))
    v = FileVolume("ro", str(p), read_only=True)
    assert v.read_only
    with pytest.raises(MediumError):
        v.write(0, [memoryview(bytearray(512))])
    v.close()


def test_geometry_errors(tmp_path: Path) -> None:
    p = tmp_path / "odd.img"
    p.write_bytes(bytes(1000))
    with pytest.raises(StoreConfigError) as e:
        FileVolume("odd", str(p))
    assert e.value.field == "size"
    with pytest.raises(StoreConfigError) as e:
        FileVolume("x", str(tmp_path / "absent.img"))
    assert e.value.field == "path"
    with pytest.raises(StoreConfigError):
        FileVolume("dir", str(tmp_path))


@pytest.mark.parametrize("write_cache", [False, True])
def test_unmap_is_durable_when_the_write_cache_is_off(
    vol: FileVolume, monkeypatch: pytest.MonkeyPatch, write_cache: bool
) -> None:
    """D11: with WCE=0 an acknowledged UNMAP must be on stable storage like any write: the
    deallocation is followed by a data sync of the store before UNMAP returns."""
    vol.write(0, [memoryview(bytearray(b"\xaa" * 8192))], fua=True)
    vol.write_cache = write_cache
    calls: list[str] = []
    real_punch = file_mod._punch_hole
    monkeypatch.setattr(file_mod, "_punch_hole", lambda *a: (calls.append("punch"), real_punch(*a)))
    monkeypatch.setattr(file_mod.os, "fdatasync", lambda fd: calls.append("sync"))
    vol.unmap(0, 4096)
    assert calls == (["punch"] if write_cache else ["punch", "sync"])
