"""`vscsi up` with `[daemon] transport = "libtcmu"`: the config field, the one-line failure when
libtcmu.so.2 is missing, and a volume served through the real library on the loopback ring."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner, Result

from tests.unit.test_libtcmu_serve import LoopDevice, LoopLib, needs_libtcmu
from tests.unit.test_tcmu_ring import rw
from vscsi import daemon as daemon_mod
from vscsi.cli import main
from vscsi.config import ConfigError, load
from vscsi.scsi.result import GOOD
from vscsi.tcmu import configfs, libtcmu

VOLUME = '[[volume]]\nname = "v0"\npath = "{tmp}/v0.img"\nsize = "1MiB"\ncreate = true\n'


def config(tmp_path: Path, daemon: str = 'transport = "libtcmu"') -> Path:
    cfg = tmp_path / "vscsi.toml"
    cfg.write_text(
        f'[daemon]\nsocket = "{tmp_path}/s.sock"\nstate_dir = "{tmp_path}/state"\n{daemon}\n'
        + VOLUME.format(tmp=tmp_path)
        + 'export = "none"\n'
    )
    return cfg


def test_transport_defaults_to_native_and_takes_libtcmu(tmp_path: Path) -> None:
    assert load(config(tmp_path, "")).transport == "native"
    assert load(config(tmp_path)).transport == "libtcmu"


@pytest.mark.parametrize(
    ("line", "why"),
    [('transport = "tcmu-runner"', "'tcmu-runner' must be one of native, libtcmu"),
     ("transport = 1", "expected str, got 1")],
)  # fmt: skip
def test_a_bad_transport_is_one_line_naming_the_field(tmp_path: Path, line: str, why: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(config(tmp_path, line))
    assert str(e.value) == f"daemon.transport: {why}"


class Kernel:
    """configfs and netlink as the daemon sees them, through monkeypatches."""

    def __init__(self) -> None:
        self.created: list[str] = []
        self.removed: list[str] = []


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> Kernel:
    k = Kernel()

    def create(name: str, *_: Any) -> SimpleNamespace:
        k.created.append(name)
        return SimpleNamespace(volume=name, uio_name="uio9")

    class Netlink:
        def __init__(self, *_handlers: object) -> None: ...

        def start(self) -> None: ...

        def stop(self) -> None: ...

    monkeypatch.setattr(configfs, "prepare_kernel", lambda: None)
    monkeypatch.setattr(configfs, "find_backstore", lambda _name: None)
    monkeypatch.setattr(configfs, "create_backstore", create)
    monkeypatch.setattr(configfs, "remove_backstore", lambda b: k.removed.append(b.volume))
    monkeypatch.setattr(daemon_mod, "NetlinkListener", Netlink)
    monkeypatch.setattr(daemon_mod, "resolve_family", lambda: (0, 1))
    monkeypatch.setattr(libtcmu, "held", lambda _uio: None)
    return k


def up(cfg: Path, action: Callable[[], None]) -> Result:
    """`vscsi up` in this thread while `action` plays the host; SIGTERM after 30 s at most."""
    guard = threading.Timer(30, os.kill, (os.getpid(), signal.SIGTERM))
    player = threading.Thread(target=action)
    guard.start()
    player.start()
    try:
        return CliRunner().invoke(main, ["up", "-c", str(cfg)])
    finally:
        guard.cancel()
        player.join(10)


def test_without_libtcmu_the_daemon_says_to_install_it_and_makes_nothing(
    kernel: Kernel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = libtcmu.load
    monkeypatch.setattr(libtcmu, "load", lambda: real("libtcmu-not-here.so.2"))
    r = up(config(tmp_path), lambda: None)
    assert r.exit_code == 1, r.output
    (line,) = r.output.strip().splitlines()
    assert line.startswith('vscsi: daemon.transport = "libtcmu": cannot load libtcmu-not-here')
    assert "install libtcmu2" in line
    assert kernel.created == [] and not (tmp_path / "v0.img").exists()


@pytest.fixture
def loop() -> Iterator[LoopDevice]:
    d = LoopDevice()
    yield d
    d.close()


@needs_libtcmu
def test_a_volume_served_through_libtcmu_and_stopped_cleanly(
    kernel: Kernel, tmp_path: Path, loop: LoopDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    lib = LoopLib(loop)
    monkeypatch.setattr(libtcmu, "load", lambda: lib)

    def play() -> None:
        deadline = time.monotonic() + 10
        while lib.handler is None or not (tmp_path / "s.sock").exists():
            assert time.monotonic() < deadline, "the daemon never attached"
            time.sleep(0.01)
        assert loop.execute(rw(0x2A, 1, 1), b"\x5a" * 512).status == GOOD
        assert loop.execute(rw(0x28, 1, 1), data_in_len=512).data == b"\x5a" * 512
        os.kill(os.getpid(), signal.SIGTERM)

    r = up(config(tmp_path), play)
    assert r.exit_code == 0, r.output
    assert "v0: (not exported) serving on uio9" in r.output
    assert (tmp_path / "v0.img").read_bytes()[512:1024] == b"\x5a" * 512
    assert lib.closed == 1 and kernel.removed == ["v0"]  # tcmulib_close, then the backstore
    assert lib.groups() == 0  # libtcmu's socket left the multicast group
