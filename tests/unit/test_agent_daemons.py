"""The agent against two real daemons linked over TLS (tests/unit/test_remote_daemons.py's
arrays, without the kernel) and a storage-server follower's control socket: `vscsi agent
check` through the CLI, then the P daemon stopped and the agent's loop taking over at the S
daemon, which then accepts writes."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.unit.test_remote_daemons import Array, linked_arrays
from vscsi.agent.config import load
from vscsi.agent.run import Agent
from vscsi.cli import main
from vscsi.control import Command, ControlServer


@pytest.fixture
def paired(tmp_path: Path) -> Iterator[tuple[Array, Array]]:
    """siteA's P-VOL mirrored to siteB's S-VOL, fence never, PAIR."""
    with linked_arrays(tmp_path) as (a, b):
        rc, out = a.cli("pair", "create", "siteAv", "siteB:siteBv", "--fence", "never",
                        "--name", "tc", "--wait", "30")  # fmt: skip
        assert rc == 0, out
        yield a, b


@pytest.fixture
def remounts(tmp_path: Path) -> Iterator[list[str]]:
    """The storage server's follower: its `remount` records the file system's name."""
    calls: list[str] = []

    def remount(req: dict[str, Any]) -> dict[str, Any]:
        calls.append(req["name"])
        return {"name": req["name"], "device": "/dev/sdc", "changeover_seconds": 1.5}

    srv = ControlServer(str(tmp_path / "host.sock"), {"remount": Command(remount, {"name": str})})
    srv.start()
    yield calls
    srv.close()


def agent_toml(tmp_path: Path, a: Array, b: Array) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(
        "[agent]\npoll = 0.2\ndown_after = 3\nchangeover_timeout = 30\ntimeout = 5\n"
        f'[[site]]\nname = "siteA"\nsocket = "{a.root}/ctl.sock"\n'
        f'[[site]]\nname = "siteB"\nsocket = "{b.root}/ctl.sock"\n'
        '[[pair]]\nname = "tc"\n'
        f'[host]\nsocket = "{tmp_path}/host.sock"\nfilesystems = ["fs1"]\n'
    )
    return p


def test_agent_check_through_the_cli(paired: tuple[Array, Array], tmp_path: Path) -> None:
    a, b = paired
    cfg = agent_toml(tmp_path, a, b)
    r = CliRunner().invoke(main, ["agent", "check", "-c", str(cfg), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert [(s["name"], s["reachable"], s["links_up"]) for s in out["sites"]] == [
        ("siteA", True, True), ("siteB", True, True)]  # fmt: skip
    (tc,) = out["pairs"]
    assert (tc["action"], tc["reason"]) == ("none", "P-VOL at siteA healthy: no action")
    assert tc["views"]["siteB"]["local_role"] == "S-VOL"
    a.stop()  # the P site goes away: one round shows it down, not yet for long enough
    r = CliRunner().invoke(main, ["agent", "check", "-c", str(cfg)])
    assert r.exit_code == 1, r.output  # degraded
    assert "pair tc: " in r.output and "takeover" not in r.output
    r = CliRunner().invoke(main, ["agent", "check", "-c", str(cfg), "--rounds", "3"])
    assert r.exit_code == 3, r.output  # three rounds: what the agent would do, nothing done
    lines = r.output.splitlines()
    assert lines[0].startswith("site siteA: DOWN (control socket: no vscsi daemon at ")
    assert lines[1].startswith("site siteB: up")
    assert lines[2].startswith("would run takeover tc at siteB: siteA down for 3 checks (")
    assert b.cli("pair", "check", "tc")[1].startswith("pairvolchk : Volstat is S-VOL.[status = "
                                                      "PAIR")  # fmt: skip


def test_the_p_daemon_stops_and_the_agent_takes_over_at_the_s_daemon(
    paired: tuple[Array, Array], tmp_path: Path, remounts: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    a, b = paired
    caplog.set_level(logging.INFO, "vscsi.agent")
    stop = threading.Event()
    agent = Agent(load(agent_toml(tmp_path, a, b)), sleep=stop.wait)
    loop = threading.Thread(target=agent.run, args=(stop.is_set,))
    loop.start()
    try:
        for _ in range(50):  # healthy: no action, however long
            if "pair tc: P-VOL at siteA healthy: no action" in caplog.messages:
                break
            stop.wait(0.1)
        assert b.lun_write() is not None  # the S-VOL refuses writes while paired
        a.stop()
        for _ in range(300):
            if remounts:
                break
            stop.wait(0.1)
    finally:
        stop.set()
        loop.join(10)
    assert remounts == ["fs1"]
    log = [m for m in caplog.messages if "takeover" in m]
    assert log[0].startswith("run takeover tc at siteB: siteA down for 3 checks (control socket")
    assert log[1] == "takeover tc at siteB: svol_e (exit 225)"  # SSWS, the P side unknown
    assert len([m for m in log if m.startswith("run takeover")]) == 1
    assert "host remounted fs1 on /dev/sdc: changeover took 1.5s" in caplog.messages
    out = b.cli("pair", "check", "tc")[1]
    assert "status = SSWS" in out, out
    assert b.lun_write(b"S" * 512) is None  # the new primary takes writes
