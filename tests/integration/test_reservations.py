"""Persistent reservations on a vscsi LUN, as cluster software uses them (sg_persist), answered
by LIO's core for the TCMU backstore (docs/reservations.md): a registration and a reservation
survive a clean restart of the daemon (forced APTPL, a stable tcm_loop initiator port) and a
SIGKILL (the kernel device is re-attached); on both transports."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import Daemon, run


@pytest.fixture(scope="module")
def daemon(transport: str, workdir: Path) -> Iterator[Daemon]:
    """On each transport its own volume (another volume ID: LIO keeps APTPL state per
    device identity)."""
    t = transport
    d = Daemon(workdir, (
        f'transport = "{t}"\nstate_dir = "{workdir}/prstate-{t}"\n'
        f'\n[[volume]]\nname = "pr0"\npath = "{workdir}/pr0-{t}.img"\nsize = "8MiB"\n'
        f'create = true\n[volume.identity]\nserial = 410005\n'
        f'volume_id = {0x500 if t == "native" else 0x510}\n'
    ), f"reservations-{t}")  # fmt: skip
    d.start()
    yield d
    if d.proc is not None:
        d.stop()


def persist(daemon: Daemon, *args: str) -> str:
    return run("sg_persist", "-n", *args, daemon.sg("pr0"))


def held(daemon: Daemon) -> None:
    keys = persist(daemon, "--in", "--read-keys")
    assert "1 registered reservation key follows" in keys and "0x1234" in keys, keys
    res = persist(daemon, "--in", "--read-reservation")
    assert "Key=0x1234" in res and "Write Exclusive" in res, res
    caps = persist(daemon, "--in", "--report-capabilities")
    assert "(PTPL_A): 1" in caps, caps


def test_a_reservation_survives_a_clean_restart_and_a_sigkill(daemon: Daemon) -> None:
    caps = persist(daemon, "--in", "--report-capabilities")
    assert "(PTPL_C): 1" in caps, caps
    persist(daemon, "--out", "--register", "--param-sark=0x1234")
    persist(daemon, "--out", "--reserve", "--param-rk=0x1234", "--prout-type=1")
    held(daemon)
    assert daemon.stop(signal.SIGTERM) == 0
    daemon.start()
    held(daemon)
    daemon.kill()
    daemon.start()
    held(daemon)
    persist(daemon, "--out", "--clear", "--param-rk=0x1234")
    assert "there are NO registered reservation keys" in persist(daemon, "--in", "--read-keys")
