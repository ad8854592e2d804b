"""The command line and control socket, as an operator or a failover agent uses them."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from vscsi.cli import main
from vscsi.control import Command, ControlError, ControlServer, request


@pytest.fixture
def server(tmp_path: Path) -> ControlServer:
    def refuse(_req: dict[str, object]) -> None:
        raise ControlError("pair p1 is in COPY; split needs PAIR")

    srv = ControlServer(
        str(tmp_path / "ctl.sock"),
        {
            "status": Command(
                lambda req: {
                    "pid": 1,
                    "config": "x.toml",
                    "volumes": [
                        {
                            "name": "v0",
                            "state": "serving",
                            "size": 1 << 20,
                            "block_size": 512,
                            "serial": 410001,
                            "volume_id": 0x100,
                            "sd": "/dev/sdb",
                            "sg": "/dev/sg1",
                            "uio": "uio0",
                            "path": "/srv/v0.img",
                        }
                    ],
                }
            ),
            "refuse": Command(refuse),
            "boom": Command(lambda req: 1 / 0),
        },
    )
    srv.start()
    yield srv
    srv.close()


def test_request_round_trip_and_errors(server: ControlServer) -> None:
    assert request(server.path, "status")["volumes"][0]["sd"] == "/dev/sdb"
    with pytest.raises(ControlError, match="split needs PAIR"):
        request(server.path, "refuse")
    with pytest.raises(ControlError, match="internal error"):
        request(server.path, "boom")
    with pytest.raises(ControlError, match="unknown command"):
        request(server.path, "nope")


def test_second_server_on_live_socket_is_refused(server: ControlServer) -> None:
    with pytest.raises(ControlError, match="another vscsi daemon is running"):
        ControlServer(server.path, {}).start()


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = str(tmp_path / "stale.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)  # a daemon that died without cleaning up: the file stays, nobody listens
    dead.close()
    second = ControlServer(path, {"status": Command(lambda r: 2)})
    second.start()
    assert request(path, "status") == 2
    second.close()


def test_status_json_and_table(server: ControlServer) -> None:
    r = CliRunner().invoke(main, ["status", "--json", "--socket", server.path])
    assert r.exit_code == 0
    assert json.loads(r.output)["volumes"][0]["name"] == "v0"
    r = CliRunner().invoke(main, ["status", "--socket", server.path])
    assert r.exit_code == 0 and "/dev/sdb" in r.output and "0100" in r.output


def test_status_without_daemon_is_one_line(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["status", "--socket", str(tmp_path / "none.sock")])
    assert r.exit_code == 1
    assert r.output.count("\n") == 1 and "no vscsi daemon" in r.output


def test_check_reports_bad_field(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[volume]]\nname = "a"\npath = "a.img"\nblock_size = 520\n')
    r = CliRunner().invoke(main, ["check", "-c", str(cfg)])
    assert r.exit_code == 2
    assert r.output == "vscsi: volume[0].block_size: 520 must be 512 or 4096\n"
    r = CliRunner().invoke(main, ["up", "-c", str(cfg)])
    assert r.exit_code == 2 and "volume[0].block_size" in r.output
