"""Exclusive ownership against the real kernel: a store served by one daemon is refused to a
second one, `vscsi shadow add` refuses a mounted device, and the control socket refuses users
who are not root. On each transport (conftest's `transport`)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import VSCSI, Daemon, run, run_rc, start_all

MIB = 1 << 20


def volume(name: str, path: str, volume_id: int) -> str:
    return f"""
[[volume]]
name = "{name}"
path = "{path}"
size = "16MiB"
create = true
export = "none"
[volume.identity]
serial = 410009
volume_id = {volume_id}
"""


@pytest.fixture
def loop(here: Path) -> Iterator[str]:
    """A loop device of its own (64 MiB), detached afterwards."""
    run("modprobe", "loop")  # this module may run before any other test loaded it
    img = here / "own-loop.img"
    with img.open("wb") as f:
        f.truncate(64 * MIB)
    dev = run("losetup", "--find", "--show", str(img)).strip()
    yield dev
    run("losetup", "-d", dev, check=False)


def test_a_second_daemon_on_the_same_store_is_refused(
    here: Path, transport: str, loop: str
) -> None:
    img = f"{here}/own-shared.img"
    first = Daemon(here, f'transport = "{transport}"\nstate_dir = "{here}/own-a"\n'
                   + volume("owna", img, 0x10) + volume("ownb", loop, 0x11), "own-a")  # fmt: skip
    first.start()
    try:
        refused = {}  # side by side: each is an interpreter importing the daemon
        for tag, body, held in (
            ("own-b", volume("ownc", img, 0x12), f"{img} is held by another process"),
            ("own-c", volume("ownd", loop, 0x13), f"{loop} is in use by another process"),
        ):
            second = Daemon(here, f'state_dir = "{here}/{tag}"\n' + body, tag)
            refused[held] = subprocess.Popen(
                [VSCSI, "up", "-c", str(second.config)],
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        for held, p in refused.items():
            out, _ = p.communicate(timeout=180)
            assert p.returncode != 0 and f"volume[0].path: {held}" in out, out
            assert len(out.strip().splitlines()) == 1, out
    finally:
        assert first.stop() == 0, first.output()
    # the first daemon's claim ended with it
    again = Daemon(here, f'transport = "{transport}"\nstate_dir = "{here}/own-b"\n'
                   + volume("ownc", img, 0x12), "own-b")  # fmt: skip
    again.start()
    assert again.stop() == 0, again.output()


def shadow_daemon(here: Path, transport: str) -> Daemon:
    return Daemon(
        here,
        f"""transport = "{transport}"
state_dir = "{here}/own-shadow"
shadow_add_paths = ["/dev/"]

[[shadow_set]]
name = "owns"
members = ["{here}/owns-a.img", "{here}/owns-b.img"]
size = "16MiB"
create = true
export = "none"
[shadow_set.identity]
serial = 410009
volume_id = 0x20
""",
        "own-shadow",
    )


@pytest.fixture(scope="module")
def daemons(here: Path, transport: str, rundir: Path) -> Iterator[dict[str, Daemon]]:
    """The daemons of the tests below, started side by side; each must stop cleanly."""
    t = f'transport = "{transport}"'
    ds = [shadow_daemon(here, transport), socket_daemon(here, rundir, "ownsock", t),
          socket_daemon(here, rundir, "owngrp", f'{t}\nsocket_group = "nogroup"')]  # fmt: skip
    try:
        start_all(*ds)
        yield {d.config.stem: d for d in ds}
    finally:
        for d in ds:
            if d.proc is not None:
                assert d.stop() == 0, d.output()


def test_shadow_add_of_a_mounted_device_is_refused(
    here: Path, loop: str, daemons: dict[str, Daemon]
) -> None:
    run("mkfs.ext4", "-q", "-F", loop)
    mnt = here / "own-mnt"
    mnt.mkdir(exist_ok=True)
    run("mount", loop, str(mnt))
    d = daemons["own-shadow"]
    try:
        rc, out = run_rc(VSCSI, "shadow", "add", "owns", loop, "--socket", d.socket)
        assert (
            rc == 1
            and out
            == f"vscsi: {loop} is in use by another process (mounted, or "
            "held by md, LVM, device-mapper or another vscsi daemon)\n"
        ), out
        run("umount", str(mnt))
        out = run(VSCSI, "shadow", "add", "owns", loop, "--wait", "120", "--socket", d.socket)
        assert out.splitlines()[-1] == "owns: Steady State", out
    finally:
        run("umount", str(mnt), check=False)
        assert d.stop() == 0, d.output()  # before the loop device goes


CLIENT = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print(json.dumps({"connect": e.strerror}))
    sys.exit()
s.sendall(sys.argv[2].encode() + b"\\n")
print(s.makefile().readline().strip())
"""


def as_user(uid: int, gid: int, groups: str, sock: str, request: dict[str, object]) -> dict:
    """One request sent by a process with these credentials (not root, no capabilities)."""
    cmd = ["setpriv", f"--reuid={uid}", f"--regid={gid}",
           f"--groups={groups}" if groups else "--clear-groups", "--inh-caps=-all",
           "/usr/bin/python3", "-c", CLIENT, sock, json.dumps(request)]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd="/")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


@pytest.fixture(scope="module")
def rundir() -> Iterator[Path]:
    """Sockets where other users can reach them (the workdir is root's only)."""
    d = Path("/run/vscsi-own-test")
    d.mkdir(mode=0o755, exist_ok=True)
    os.chmod(d, 0o755)
    yield d


def socket_daemon(here: Path, rundir: Path, name: str, extra: str) -> Daemon:
    d = Daemon(here, f'state_dir = "{here}/{name}"\n{extra}\n'
               + volume(name, f"{here}/{name}.img", 0x30), name)  # fmt: skip
    d.socket = str(rundir / f"{name}.sock")
    d.config.write_text(d.config.read_text().replace(str(here / f"{name}.sock"), d.socket))
    return d


def test_the_control_socket_refuses_users_who_are_not_root(daemons: dict[str, Daemon]) -> None:
    d = daemons["ownsock"]
    assert stat.S_IMODE(os.stat(d.socket).st_mode) == 0o600
    assert as_user(65534, 65534, "", d.socket, {"cmd": "status"}) == {
        "connect": "Permission denied"
    }
    assert as_user(0, 0, "0", d.socket, {"cmd": "status"})["ok"]


def test_the_socket_group_may_read_but_not_change(daemons: dict[str, Daemon]) -> None:
    d = daemons["owngrp"]
    st = os.stat(d.socket)
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, 65534)
    reader = (12345, 12345, "65534")  # nogroup as a supplementary group
    status = as_user(*reader, d.socket, {"cmd": "status"})
    assert status["ok"] and status["result"]["volumes"][0]["name"] == "owngrp", status
    assert as_user(*reader, d.socket, {"cmd": "pair_delete", "name": "x"}) == {
        "ok": False,
        "exit": 1,
        "error": "pair_delete: group nogroup may run read-only commands only",
    }
    assert as_user(12345, 12345, "", d.socket, {"cmd": "status"}) == {
        "connect": "Permission denied"
    }
