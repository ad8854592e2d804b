"""The agent's checks: heartbeat file and command, the control socket (dead, hung, links),
and a remote pair as an array's pair_display shows it."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

from vscsi.agent.config import SiteConfig
from vscsi.agent.health import heartbeat, pair_view, probe
from vscsi.control import Command, ControlServer


def test_heartbeat_file_fresh_stale_missing(tmp_path: Path) -> None:
    f = tmp_path / "siteA.alive"
    site = SiteConfig("siteA", "/x.sock", heartbeat_file=str(f), heartbeat_max_age=10)
    assert heartbeat(site, 1.0).startswith(f"heartbeat file {f}: No such file")
    f.touch()
    assert heartbeat(site, 1.0) == ""
    old = f.stat().st_mtime - 11
    os.utime(f, (old, old))
    assert heartbeat(site, 1.0) == f"heartbeat file {f} not touched within 10s"


def test_heartbeat_command_exit_status_and_timeout() -> None:
    def site(*cmd: str) -> SiteConfig:
        return SiteConfig("siteA", "/x.sock", heartbeat_command=cmd)

    assert heartbeat(site("true"), 5.0) == ""
    assert heartbeat(site("false"), 5.0) == "heartbeat command 'false': exit status 1"
    slow = site(sys.executable, "-c", "import time; time.sleep(5)")
    assert heartbeat(slow, 0.2).endswith(": no exit within 0.2s")
    assert "No such file" in heartbeat(site("/nonexistent/ping"), 1.0)


def test_probe_a_dead_socket_a_hung_one_and_the_links(tmp_path: Path) -> None:
    dead = SiteConfig("siteA", str(tmp_path / "none.sock"))
    reachable, links, why = probe(dead, 1.0)
    assert (reachable, links) == (False, None)
    assert why.startswith(f"control socket: no vscsi daemon at {tmp_path}/none.sock")
    hung = socket.socket(socket.AF_UNIX)  # accepts, never answers
    hung.bind(str(tmp_path / "hung.sock"))
    hung.listen(1)
    try:
        assert probe(SiteConfig("siteA", str(tmp_path / "hung.sock")), 0.3) == (
            False, None, "control socket: no answer to status within 0.3s")  # fmt: skip
    finally:
        hung.close()
    links_up = [True, False]
    srv = ControlServer(str(tmp_path / "a.sock"), {"status": Command(
        lambda _r: {"links": [{"remote": "siteB", "up": links_up[0]},
                              {"remote": "siteC", "up": links_up[1]}]})})  # fmt: skip
    srv.start()
    try:
        site = SiteConfig("siteA", str(tmp_path / "a.sock"), heartbeat_command=("false",))
        assert probe(site, 2.0) == (True, False, "heartbeat command 'false': exit status 1")
        links_up[1] = True
        assert probe(site, 2.0)[:2] == (True, True)
    finally:
        srv.close()


def test_pair_view_reads_the_local_role_from_the_volume_names(tmp_path: Path) -> None:
    rows: list[dict[str, Any]] = [
        {"pair": "local", "pvol": {"volume": "a", "status": "PAIR"},
         "svol": {"volume": "b", "status": "PAIR"}},  # a local pair: never a remote view
        {"pair": "tc", "remote": "siteA", "split_brain": True,
         "pvol": {"volume": "siteA:siteAv", "status": "PSUE"},
         "svol": {"volume": "siteBv", "status": "SSWS"}},
    ]  # fmt: skip

    def display(req: dict[str, Any]) -> dict[str, Any]:
        return {"pairs": [r for r in rows if r["pair"] == req["name"]], "volumes": []}

    srv = ControlServer(str(tmp_path / "b.sock"), {
        "pair_display": Command(display, optional={"name": str})})  # fmt: skip
    srv.start()
    try:
        view, why = pair_view("siteB", str(tmp_path / "b.sock"), "tc", 2.0)
        assert why == "" and view is not None
        assert (view.local_role, view.pvol_status, view.svol_status, view.split_brain) == (
            "S-VOL", "PSUE", "SSWS", True)  # fmt: skip
        assert pair_view("siteB", str(tmp_path / "b.sock"), "local", 2.0) == (
            None, "no remote pair 'local' there")  # fmt: skip
        rows.append({"pair": "odd", "remote": "siteA", "pvol": None})
        view, why = pair_view("siteB", str(tmp_path / "b.sock"), "odd", 2.0)
        assert view is None and why.startswith("pair_display answered what no vscsi array does")
    finally:
        srv.close()
