"""The agent's loop against fake arrays on a fake clock, and a real control socket for the
storage server's follower: the takeover issued exactly once and only when due, the wait for
the pair to settle, the remount, the reasons logged once per change; a dry run changes
nothing."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vscsi.agent.config import AgentConfig, parse
from vscsi.agent.run import Agent
from vscsi.control import Command, ControlError, ControlServer, request

PVOL, SVOL = "P-VOL", "S-VOL"


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


class FakeArray:
    """What the agent asks an array: status, pair_display and takeover of pair "tc"."""

    def __init__(self, name: str, peer: str, role: str) -> None:
        self.name, self.peer, self.role = name, peer, role
        self.up = True
        self.answers = True  # False: alive, but the agent's path to its socket is broken
        self.links_up = True
        self.p = self.s = "PAIR"
        self.takeovers: list[str] = []
        self.settle_after = 0  # pair_display answers after a takeover before SSWS shows
        self.refuse: ControlError | None = None
        self.other: FakeArray | None = None  # the peer array: its link is down while it is

    def handle(self, cmd: str, args: dict[str, Any]) -> Any:
        if cmd == "status":
            up = self.links_up and (self.other is None or self.other.up)
            return {"links": [{"remote": self.peer, "serial": 1, "up": up}]}
        if cmd == "pair_display":
            return {"pairs": [self.row()], "volumes": []}
        assert cmd == "takeover", cmd
        self.takeovers.append(args["name"])
        if self.refuse is not None:
            raise self.refuse
        self.pending = self.settle_after
        return {"action": "svol_e", "exit": 225}

    def row(self) -> dict[str, Any]:
        if self.takeovers and self.refuse is None:
            self.pending -= 1
            if self.pending < 0:
                self.s = "SSWS"
        mine, theirs = f"{self.name}v", f"{self.peer}:{self.peer}v"
        pv, sv = (mine, theirs) if self.role == PVOL else (theirs, mine)
        return {"pair": "tc", "status": self.p if self.role == PVOL else self.s,
                "remote": self.peer, "fence": "never",
                "pvol": {"volume": pv, "role": PVOL, "status": self.p},
                "svol": {"volume": sv, "role": SVOL, "status": self.s},
                "fenced": False, "demoted": False, "split_brain": False}  # fmt: skip


class Host:
    """The storage server's follower, as a real control socket: remount records each call."""

    def __init__(self, path: Path) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.seen: Callable[[], Any] = lambda: None  # what a call records of the arrays
        self.srv = ControlServer(str(path), {
            "status": Command(lambda _r: {"filesystems": ["fs1"]}, read_only=True),
            "remount": Command(self.remount, {"name": str}),
        })  # fmt: skip
        self.srv.start()

    def remount(self, req: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((req["name"], self.seen()))
        return {"name": req["name"], "device": "/dev/sdc", "changeover_seconds": 4.3}


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[FakeArray, FakeArray, Host, Clock, AgentConfig]]:
    clock = Clock()
    a, b = FakeArray("siteA", "siteB", PVOL), FakeArray("siteB", "siteA", SVOL)
    a.other, b.other = b, a
    host = Host(tmp_path / "host.sock")
    cfg = parse({
        "agent": {"poll": 2.0, "down_after": 3, "changeover_timeout": 30},
        "site": [{"name": "siteA", "socket": "/fake/a.sock"},
                 {"name": "siteB", "socket": "/fake/b.sock"}],
        "pair": [{"name": "tc"}],
        "host": {"socket": str(tmp_path / "host.sock"), "filesystems": ["fs1"]},
    })  # fmt: skip
    yield a, b, host, clock, cfg
    host.srv.close()


def agent_for(world: tuple[FakeArray, FakeArray, Host, Clock, AgentConfig],
              dry_run: bool = False) -> Agent:  # fmt: skip
    a, b, _, clock, cfg = world
    arrays = {"/fake/a.sock": a, "/fake/b.sock": b}

    def ask(path: str, cmd: str, timeout: float = 30.0, **args: Any) -> Any:
        arr = arrays.get(path)
        if arr is None:  # the host's real socket
            return request(path, cmd, timeout=timeout, **args)
        if not (arr.up and arr.answers):
            raise ControlError(f"no vscsi daemon at {path} (Connection refused); start one")
        return arr.handle(cmd, args)

    return Agent(cfg, dry_run=dry_run, ask=ask, clock=clock, sleep=clock.sleep)


def run_for(agent: Agent, clock: Clock, seconds: float) -> None:
    end = clock.t + seconds
    agent.run(stop=lambda: clock.t >= end)


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "vscsi.agent"]


def test_the_p_site_down_takeover_once_then_settle_then_remount(
    world: tuple[FakeArray, FakeArray, Host, Clock, AgentConfig],
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b, host, clock, _ = world
    caplog.set_level(logging.INFO, "vscsi.agent")
    b.settle_after = 3  # the S array shows SSWS only at the 4th look
    host.seen = lambda: b.s
    takeovers_while_up = []

    def stop() -> bool:
        if clock.t >= 10 and a.up:  # five healthy rounds, then the P site goes away
            takeovers_while_up.append(len(b.takeovers))
            a.up = False
        return clock.t >= 70

    agent_for(world).run(stop)
    assert takeovers_while_up == [0]
    assert b.takeovers == ["tc"] and a.takeovers == []  # once, at the S site
    assert host.calls == [("fs1", "SSWS")]  # remounted once the pair settled, not before
    log = lines(caplog)
    start = log.index(
        "pair tc: siteA (P-VOL) check failed 1 of 3 (control socket: no vscsi "
        "daemon at /fake/a.sock (Connection refused); start one): waiting"
    )
    assert log[:start] == ["watching tc every 2s", "pair tc: P-VOL at siteA healthy: no action"]
    assert log[start + 1].startswith("pair tc: siteA (P-VOL) check failed 2 of 3")
    assert log[start + 2] == ("run takeover tc at siteB: siteA down for 3 checks (control "
                              "socket: no vscsi daemon at /fake/a.sock (Connection refused); "
                              "start one)")  # fmt: skip
    assert log[start + 3 : start + 7] == [
        "takeover tc at siteB: svol_e (exit 225)",
        "pair tc settled at siteB: S-VOL SSWS",
        "host remounted fs1 on /dev/sdc: changeover took 4.3s",
        "pair tc: already taken over (S-VOL SSWS, seen at siteB): no action",
    ]
    assert len(log) == len(set(log))  # each decision logged once, not every poll


def test_a_dry_run_through_the_loop_changes_nothing(
    world: tuple[FakeArray, FakeArray, Host, Clock, AgentConfig],
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b, host, clock, _ = world
    caplog.set_level(logging.INFO, "vscsi.agent")
    a.up = False
    run_for(agent_for(world, dry_run=True), clock, 120)
    assert b.takeovers == [] and host.calls == [] and b.s == "PAIR"
    would = [x for x in lines(caplog) if x.startswith("would run takeover tc at siteB: ")]
    assert would == [
        "would run takeover tc at siteB: siteA down for 3 checks (control socket: "
        "no vscsi daemon at /fake/a.sock (Connection refused); start one)"
    ]


def test_dry_run_in_the_config_file_counts_too(
    world: tuple[FakeArray, FakeArray, Host, Clock, AgentConfig],
) -> None:
    a, b, host, clock, cfg = world
    a.up = False
    world = (
        a,
        b,
        host,
        clock,
        parse(
            {
                "agent": {"dry_run": True},
                "site": [{"name": s.name, "socket": s.socket} for s in cfg.sites],
                "pair": [{"name": "tc"}],
            }
        ),
    )
    run_for(agent_for(world), clock, 60)
    assert b.takeovers == []


def test_a_pair_that_does_not_settle_is_not_remounted(
    world: tuple[FakeArray, FakeArray, Host, Clock, AgentConfig],
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b, host, clock, _ = world
    caplog.set_level(logging.INFO, "vscsi.agent")
    a.up = False
    b.settle_after = 10**6
    run_for(agent_for(world), clock, 200)
    assert b.takeovers == ["tc"] and host.calls == []
    assert ("pair tc at siteB did not settle within 30s (S-VOL, P-VOL PAIR, S-VOL PAIR): file "
            "systems not remounted") in lines(caplog)  # fmt: skip


def test_a_refused_takeover_is_logged_and_not_retried_every_poll(
    world: tuple[FakeArray, FakeArray, Host, Clock, AgentConfig],
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b, host, clock, _ = world
    caplog.set_level(logging.INFO, "vscsi.agent")
    a.up = False
    b.refuse = ControlError("cannot take over pair 'tc': unconformable", 223)
    run_for(agent_for(world), clock, 60)
    assert b.takeovers == ["tc"] and host.calls == []
    assert ("takeover tc at siteB failed: control socket: cannot take over pair 'tc': "
            "unconformable") in lines(caplog)  # fmt: skip


def test_a_link_failure_between_healthy_arrays_is_no_site_failure(
    world: tuple[FakeArray, FakeArray, Host, Clock, AgentConfig],
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b, host, clock, _ = world
    caplog.set_level(logging.INFO, "vscsi.agent")
    a.links_up = b.links_up = False
    a.p = "PSUE"  # fence never: the P-VOL suspended, still serving
    run_for(agent_for(world), clock, 60)
    assert b.takeovers == [] and host.calls == []
    assert lines(caplog)[1:] == ["pair tc: link down, both sites healthy: no action"]


def test_an_unreachable_p_array_whose_link_is_up_is_not_taken_over(
    world: tuple[FakeArray, FakeArray, Host, Clock, AgentConfig],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The agent loses its path to site A's control socket; site A still serves and its link
    to site B is up: taking over would move the primary away from a live array."""
    a, b, host, clock, _ = world
    caplog.set_level(logging.INFO, "vscsi.agent")
    a.answers = False
    run_for(agent_for(world), clock, 60)
    assert b.takeovers == [] and host.calls == []
    assert lines(caplog)[-1].startswith(
        "pair tc: takeover refused: the agent cannot reach siteA (control socket: no vscsi "
        "daemon at /fake/a.sock")  # fmt: skip
    assert lines(caplog)[-1].endswith(
        "but siteB's link to it is up: the P-VOL's array is alive, the failure is the agent's "
        "path to it")  # fmt: skip


def test_a_p_site_back_before_down_after_resets_the_count(
    world: tuple[FakeArray, FakeArray, Host, Clock, AgentConfig],
) -> None:
    a, b = world[:2]
    agent = agent_for(world)
    for _ in range(10):  # down for two checks, back for one, forever
        a.up = False
        agent.step()
        agent.step()
        a.up = True
        agent.step()
    assert b.takeovers == []
    assert agent.failures == {"siteA": 0, "siteB": 0}


def test_both_sites_unreachable_cannot_decide(
    world: tuple[FakeArray, FakeArray, Host, Clock, AgentConfig],
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b, _, clock, _ = world
    caplog.set_level(logging.INFO, "vscsi.agent")
    a.up = b.up = False
    run_for(agent_for(world), clock, 60)
    assert b.takeovers == []
    assert lines(caplog)[-1].startswith("pair tc: cannot decide: both sites unreachable")
