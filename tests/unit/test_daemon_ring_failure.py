"""`vscsi up` when a ring breaks: the daemon exits 3 with one line and leaves configfs alone,
so a supervisor's restart re-attaches. The kernel side is the in-process loopback."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner, Result

from tests.unit.test_tcmu_ring import rw
from vscsi import daemon as daemon_mod
from vscsi.cli import main
from vscsi.scsi.lun import Lun
from vscsi.scsi.result import GOOD
from vscsi.tcmu import abi, configfs
from vscsi.tcmu.loopback import CMDR_OFF, LoopbackDevice, LoopbackKernel
from vscsi.tcmu.uio import UioDevice


class Kernel:
    """What the daemon sees of LIO through monkeypatches: one loopback ring per backstore."""

    def __init__(self) -> None:
        self.loop = LoopbackKernel(cmdr_size=2048)
        self.device = LoopbackDevice(self.loop)
        self.removed: list[str] = []

    def attached(self, timeout: float = 10) -> LoopbackDevice:
        deadline = time.monotonic() + timeout
        while self.device.ring is None:
            assert time.monotonic() < deadline, "the daemon never served the ring"
            time.sleep(0.01)
        return self.device


class Netlink:
    def __init__(self, *_handlers: object) -> None: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> Iterator[Kernel]:
    k = Kernel()
    monkeypatch.setattr(configfs, "prepare_kernel", lambda: None)
    monkeypatch.setattr(configfs, "find_backstore", lambda _name: None)
    monkeypatch.setattr(
        configfs, "create_backstore", lambda name, *_: SimpleNamespace(volume=name, uio_name="x")
    )
    monkeypatch.setattr(configfs, "remove_backstore", lambda b: k.removed.append(b.volume))
    monkeypatch.setattr(UioDevice, "open", staticmethod(lambda _uio: k.device))
    monkeypatch.setattr(daemon_mod, "NetlinkListener", Netlink)
    yield k


def up(tmp_path: Path, action: Callable[[], None]) -> Result:
    """Run `vscsi up` in this (the main) thread while `action` plays the kernel; a SIGTERM
    after 30 s keeps a broken daemon from hanging the test run."""
    cfg = tmp_path / "vscsi.toml"
    cfg.write_text(
        f'[daemon]\nsocket = "{tmp_path}/s.sock"\nstate_dir = "{tmp_path}/state"\n'
        f'[[volume]]\nname = "v0"\npath = "{tmp_path}/v0.img"\nsize = "1MiB"\n'
        'create = true\nexport = "none"\n'
    )
    guard = threading.Timer(30, os.kill, (os.getpid(), signal.SIGTERM))
    player = threading.Thread(target=action)
    guard.start()
    player.start()
    try:
        return CliRunner().invoke(main, ["up", "-c", str(cfg)])
    finally:
        guard.cancel()
        player.join(10)


def serve_one_write(k: Kernel) -> None:
    assert k.attached().execute(rw(0x2A, 0, 1), b"\x77" * 512).status == GOOD


def head_out_of_range(k: Kernel) -> None:
    abi.U32.pack_into(k.loop.mem, 12, k.loop.cmdr_size + 64)


def zero_length_entry(k: Kernel) -> None:
    abi.HEADER.pack_into(k.loop.mem, CMDR_OFF + k.loop.head, abi.OP_CMD, 1, 0, 0)
    abi.U32.pack_into(k.loop.mem, 12, k.loop.head + abi.ENTRY_ALIGN)


def reset_that_raises(k: Kernel) -> None:
    k.loop.submit_tmr(abi.TMR_LUN_RESET, [])


@pytest.mark.parametrize(
    ("corrupt", "why"),
    [
        (head_out_of_range, "cmd_head 2112 outside the 2048-byte ring"),
        (zero_length_entry, "corrupt entry at 128: length 0"),
        (reset_that_raises, "unexpected RuntimeError: reset bug"),
    ],
)
def test_broken_ring_ends_the_daemon_with_status_3_and_keeps_configfs(
    kernel: Kernel,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    corrupt: Callable[[Kernel], None],
    why: str,
) -> None:
    def bug(_lun: Lun) -> None:
        raise RuntimeError("reset bug")

    monkeypatch.setattr(Lun, "reset", bug)

    def play() -> None:
        serve_one_write(kernel)
        corrupt(kernel)
        kernel.device.ring_doorbell()

    r = up(tmp_path, play)
    assert r.exit_code == 3, r.output
    last = r.output.splitlines()[-1]
    assert last == (
        f"vscsi: volume v0: ring on loopback stopped: {why}; "
        "exiting (status 3) for a restart to re-attach"
    )
    assert kernel.removed == []  # the backstore stays for the restarted daemon
    assert (tmp_path / "v0.img").read_bytes()[:512] == b"\x77" * 512


def test_sigterm_still_removes_what_the_daemon_made(kernel: Kernel, tmp_path: Path) -> None:
    def play() -> None:
        serve_one_write(kernel)
        os.kill(os.getpid(), signal.SIGTERM)

    r = up(tmp_path, play)
    assert r.exit_code == 0, r.output
    assert kernel.removed == ["v0"]
