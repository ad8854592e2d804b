"""Persistent reservations across restarts of `vscsi up`: the daemon against FakeLio (see
test_reservations_configfs), with a ring that only waits to be stopped."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import rtslib_fb.tcm

from tests.unit.test_reservations_configfs import FakeLio, install, nexus
from vscsi import daemon as daemon_mod
from vscsi.config import load
from vscsi.daemon import Daemon, DaemonError
from vscsi.scsi.lun import Lun
from vscsi.tcmu import configfs
from vscsi.tcmu.uio import UioDevice


class Ring:
    """A uio device whose ring never gets a command."""

    name = "uio-fake"
    error = None

    def serve(self, _lun: Lun, stop: threading.Event, *_args: object, **_kw: object) -> None:
        stop.wait()

    def wake(self) -> None: ...

    def close(self) -> None: ...


class Netlink:
    def __init__(self, *_handlers: object) -> None: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


@pytest.fixture
def lio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeLio]:
    fake = install(tmp_path, monkeypatch)
    monkeypatch.setattr(configfs, "uio_for_device", lambda *_: "uio-fake")
    monkeypatch.setattr(configfs, "find_disk", lambda *_a, **_k: ("/dev/sdz", "/dev/sg9"))
    monkeypatch.setattr(UioDevice, "open", staticmethod(lambda _uio: Ring()))
    monkeypatch.setattr(daemon_mod, "NetlinkListener", Netlink)
    yield fake
    rtslib_fb.tcm.bs_cache.clear()


def up(tmp_path: Path) -> Daemon:
    """`vscsi up` with two volumes exported through tcm_loop; a new process each time."""
    d = configured(tmp_path)
    d.start()
    return d


def configured(tmp_path: Path) -> Daemon:
    """The daemon `up` starts, not started yet."""
    rtslib_fb.tcm.bs_cache.clear()
    cfg = tmp_path / "vscsi.toml"
    volumes = "".join(
        f'[[volume]]\nname = "{v}"\npath = "{tmp_path}/{v}.img"\nsize = "1MiB"\n'
        'create = true\nexport = "loop"\n'
        for v in ("v0", "v1")
    )
    cfg.write_text(
        f'[daemon]\nsocket = "{tmp_path}/s.sock"\nstate_dir = "{tmp_path}/state"\n{volumes}'
    )
    return Daemon(load(cfg))


def test_reservations_survive_a_clean_restart_of_the_daemon(lio: FakeLio, tmp_path: Path) -> None:
    d = up(tmp_path)
    first = (nexus(lio, "v0"), nexus(lio, "v1"))
    assert first[0] != first[1]
    lio.register("v0", 0x1234, reserve_type=1)
    d.stop()
    assert not list(lio.lio.glob("core/user_*/*")) and lio.live == {}
    d = up(tmp_path)
    try:
        assert (nexus(lio, "v0"), nexus(lio, "v1")) == first
        assert [s.reattached for s in d.served.values()] == [False, False]
        assert lio.keys("v0") == [0x1234] and lio.holder("v0") == (0x1234, 1)
        assert lio.keys("v1") == []
    finally:
        d.stop()


def test_a_killed_daemons_successor_re_attaches_and_keeps_the_kernels_state(
    lio: FakeLio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = up(tmp_path)
    lio.register("v0", 0x1234)
    with monkeypatch.context() as killed:  # it dies before removing anything from configfs
        killed.setattr(configfs, "remove_export", lambda _e: None)
        killed.setattr(configfs, "remove_backstore", lambda _b: None)
        d.stop()
    before = len(lio.writes)
    d = up(tmp_path)
    try:
        assert [s.reattached for s in d.served.values()] == [True, True]
        assert lio.writes[before:] == []  # nothing rewritten, nothing reloaded
        assert lio.keys("v0") == [0x1234] and lio.holder("v0") == (0x1234, 1)
    finally:
        d.stop()


def test_the_exported_disks_are_awaited_after_the_last_export(
    lio: FakeLio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel probes each new disk on its own: `vscsi up` exports every LUN before it
    waits for the first /dev/sdX, so the probes overlap the exports."""
    seen: list[str] = []
    export = configfs.export_loop
    monkeypatch.setattr(configfs, "export_loop", lambda bs: seen.append("export") or export(bs))
    monkeypatch.setattr(
        configfs, "find_disk", lambda *_a, **_k: seen.append("disk") or ("/dev/sdz", "/dev/sg9")
    )
    d = up(tmp_path)
    try:
        assert seen == ["export", "export", "disk", "disk"]
        assert [s.state for s in d.served.values()] == ["serving", "serving"]
    finally:
        d.stop()


def test_a_disk_that_never_appears_fails_its_volume_with_one_line(
    lio: FakeLio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def find_disk(export: configfs.LoopExport, timeout: float = 60) -> tuple[str, str]:
        if export.wwn == configfs.loop_wwn("v1"):
            raise configfs.ConfigfsError(f"no SCSI disk appeared for {export.wwn} within 60s")
        return "/dev/sdz", "/dev/sg9"

    monkeypatch.setattr(configfs, "find_disk", find_disk)
    d = configured(tmp_path)
    try:
        with pytest.raises(DaemonError) as e:
            d.start()
        wwn = configfs.loop_wwn("v1")
        assert str(e.value) == f"volume v1: no SCSI disk appeared for {wwn} within 60s"
        assert [s.state for s in d.served.values()] == ["serving", "failed"]
    finally:
        d.stop()
    assert not list(lio.lio.glob("core/user_*/*"))  # the stop removed both backstores
