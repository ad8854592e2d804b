"""The control socket: private from the moment it exists, peers checked, arguments typed."""

from __future__ import annotations

import grp
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vscsi.config import parse
from vscsi.control import Command, ControlError, ControlServer, Peer, request
from vscsi.daemon import Daemon

NOBODY = Peer(pid=4242, uid=65534, gid=65534)


class RecordingSocket:
    """The server's socket, noting the socket file's mode the instant bind() made it."""

    def __init__(self, real: socket.socket) -> None:
        self.real = real
        self.mode_at_bind = -1

    def bind(self, path: str) -> None:
        self.real.bind(path)
        self.mode_at_bind = os.stat(path).st_mode & 0o777

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def serve(tmp_path: Path, commands: dict[str, Command], group: str | None = None,
          umask: int = 0o022) -> tuple[ControlServer, RecordingSocket]:  # fmt: skip
    srv = ControlServer(str(tmp_path / "ctl.sock"), commands, group=group)
    rec = RecordingSocket(srv._sock)
    srv._sock = rec  # type: ignore[assignment]
    old = os.umask(umask)
    try:
        srv.start()
    finally:
        os.umask(old)
    return srv, rec


def test_the_socket_is_0600_when_bind_creates_it(tmp_path: Path) -> None:
    srv, rec = serve(tmp_path, {"status": Command(lambda r: 1)}, umask=0)
    try:
        assert rec.mode_at_bind == 0o600
        assert os.stat(srv.path).st_mode & 0o777 == 0o600
        assert os.umask(0o022) == 0o022  # the daemon's umask is given back
    finally:
        srv.close()


def test_a_socket_group_gets_0660_and_the_group(tmp_path: Path) -> None:
    group = grp.getgrgid(os.getgid()).gr_name
    srv, rec = serve(tmp_path, {"status": Command(lambda r: 1)}, group=group, umask=0)
    try:
        st = os.stat(srv.path)
        assert rec.mode_at_bind == 0o600
        assert (st.st_mode & 0o777, st.st_gid) == (0o660, os.getgid())
    finally:
        srv.close()


def test_a_non_socket_at_the_socket_path_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    path.write_text("not mine")
    with pytest.raises(ControlError) as e:
        ControlServer(str(path), {}).start()
    assert str(e.value) == f"{path} exists and is not a socket (remove it, or set daemon.socket)"
    assert path.read_text() == "not mine"
    path.unlink()
    path.symlink_to(tmp_path / "elsewhere")  # a dangling link is not a stale socket either
    with pytest.raises(ControlError, match="is not a socket"):
        ControlServer(str(path), {}).start()
    assert path.is_symlink()


def line(cmd: str, **args: object) -> bytes:
    return json.dumps({"cmd": cmd, **args}).encode()


def test_a_stranger_is_refused_every_command_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ran: list[str] = []
    srv = ControlServer(
        str(tmp_path / "ctl.sock"),
        {"status": Command(lambda r: ran.append("status"), read_only=True)},
    )
    with caplog.at_level(logging.WARNING, logger="vscsi.control"):
        reply = srv.dispatch(line("status"), NOBODY)
    assert reply == {
        "ok": False,
        "exit": 1,
        "error": "uid 65534 may not use the vscsi control socket (root only)",
    }
    assert ran == [] and "refused uid 65534 (pid 4242)" in caplog.text
    root = Peer(pid=1, uid=0, gid=0)
    assert srv.dispatch(line("status"), root)["ok"] and ran == ["status"]


def test_the_socket_group_runs_read_only_commands_only(tmp_path: Path) -> None:
    group = grp.getgrgid(os.getgid()).gr_name
    commands = {"status": Command(lambda r: "up", read_only=True),
                "shadow_add": Command(lambda r: "added", {"name": str})}  # fmt: skip
    srv = ControlServer(str(tmp_path / "ctl.sock"), commands, group=group)
    member = Peer(pid=7, uid=12345, gid=os.getgid())
    supplementary = Peer(pid=8, uid=12345, gid=12345, groups=(4, os.getgid()))
    for peer in (member, supplementary):
        assert srv.dispatch(line("status"), peer) == {"ok": True, "result": "up"}
        assert srv.dispatch(line("shadow_add", name="dsa1"), peer) == {
            "ok": False,
            "exit": 1,
            "error": f"shadow_add: group {group} may run read-only commands only",
        }
    assert not srv.dispatch(line("status"), NOBODY)["ok"]


def test_a_real_connection_is_checked_by_its_credentials(tmp_path: Path) -> None:
    srv = ControlServer(str(tmp_path / "ctl.sock"), {"status": Command(lambda r: 1)})
    seen: list[Peer] = []
    access = srv.access
    srv.access = lambda peer: seen.append(peer) or access(peer)  # type: ignore[method-assign]
    srv.start()
    try:
        assert request(srv.path, "status") == 1
        assert seen and (seen[0].uid, seen[0].pid) == (os.geteuid(), os.getpid())
        assert set(seen[0].groups) == set(os.getgroups())
    finally:
        srv.close()


@pytest.fixture
def daemon_socket(tmp_path: Path) -> Iterator[str]:
    vols = [{"name": f"v{i}", "path": f"v{i}.img", "size": "4MiB", "create": True,
             "identity": {"volume_id": i}} for i in range(2)]  # fmt: skip
    cfg = {"daemon": {"socket": str(tmp_path / "ctl.sock"), "state_dir": "state"},
           "volume": vols}  # fmt: skip
    d = Daemon(parse(cfg, base=tmp_path))
    d.open()
    srv = ControlServer(d.config.socket, d.handlers())
    srv.start()
    yield srv.path
    srv.close()
    d.stop()


@pytest.mark.parametrize(
    ("cmd", "args", "error"),
    [
        ("pair_split", {"name": "p", "read_only": "false"},
         "pair_split: read_only must be a JSON bool (true/false), got 'false'"),
        ("pair_create", {"name": "p", "pvol": "v0", "svol": "v1", "mu": True},
         "pair_create: mu must be an integer, got True"),
        ("pair_create", {"name": "p", "pvol": "v0", "svol": "v1", "mu": "0"},
         "pair_create: mu must be an integer, got '0'"),
        ("pair_create", {"name": "p", "pvol": "v0", "svol": 1, "mu": 0},
         "pair_create: svol must be a string, got 1"),
        ("pair_create", {"name": "p", "pvol": "v0", "mu": 0},
         "pair_create: argument 'svol' is required"),
        ("pair_delete", {"name": "p", "force": True},
         "pair_delete: unknown argument 'force' (known: name)"),
        ("shadow_remove", {"name": "s", "member": "/m", "minicopy": 1},
         "shadow_remove: minicopy must be a JSON bool (true/false), got 1"),
        ("status", {"verbose": True}, "status: unknown argument 'verbose' (known: none)"),
        ("pair_display", {"name": None}, "pair_display: name must be a string, got None"),
    ],
)  # fmt: skip
def test_every_wrongly_typed_argument_is_refused_in_one_line(
    daemon_socket: str, cmd: str, args: dict[str, object], error: str
) -> None:
    with pytest.raises(ControlError) as e:
        request(daemon_socket, cmd, **args)
    assert str(e.value) == error


def test_a_request_that_is_not_an_object_is_refused(tmp_path: Path) -> None:
    srv = ControlServer(str(tmp_path / "ctl.sock"), {})
    root = Peer(pid=1, uid=0, gid=0)
    assert srv.dispatch(b"[1]", root)["error"] == "a request is a JSON object"
    assert srv.dispatch(b"{", root)["error"] == "a request is one line of JSON"
