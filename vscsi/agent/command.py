"""`vscsi agent -c agent.toml [--dry-run]` and `vscsi agent check -c agent.toml [--json]`."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from types import FrameType

import click

from vscsi.agent.config import AgentConfig, load
from vscsi.agent.policy import Decision, Observation
from vscsi.agent.run import Agent, report
from vscsi.config import ConfigError

config_option = click.option("-c", "--config", "config_path", metavar="FILE",
                             help="The agent's TOML config file.")  # fmt: skip


def _load(config_path: str | None) -> AgentConfig:
    if config_path is None:
        click.echo("vscsi agent: -c/--config FILE is required (the agent's TOML config)", err=True)
        sys.exit(2)
    try:
        return load(config_path)
    except ConfigError as e:
        click.echo(f"vscsi agent: {e}", err=True)
        sys.exit(2)


@click.group(invoke_without_command=True)
@config_option
@click.option("--dry-run", is_flag=True, help="Log what would be done; change nothing.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.pass_context
def agent(ctx: click.Context, config_path: str | None, dry_run: bool, verbose: bool) -> None:
    """The external failover agent: watch both arrays of the remote pairs and run the takeover
    at the S site when the P-VOL's site is down (docs/failover.md)."""
    if ctx.invoked_subcommand is not None:
        return
    cfg = _load(config_path)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s vscsi-agent: %(message)s")  # fmt: skip
    stopping = threading.Event()

    def stop(_sig: int, _frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    Agent(cfg, dry_run=dry_run, sleep=stopping.wait).run(stopping.is_set)


# `vscsi agent check`'s exit status, for monitoring scripts (2: a usage or config error)
HEALTHY, DEGRADED, WOULD_TAKE_OVER = 0, 1, 3


def check_status(result: list[tuple[Observation, Decision]]) -> int:
    """WOULD_TAKE_OVER when a pair's decision is a takeover; DEGRADED when a site is down or
    unreachable, a link is down or a site could not show a pair; HEALTHY otherwise."""
    if any(d.action == "takeover" for _, d in result):
        return WOULD_TAKE_OVER
    for obs, _ in result:
        if obs.unknown or any(not s.healthy or s.links_up is False for s in obs.sites):
            return DEGRADED
    return HEALTHY


@agent.command("check")
@config_option
@click.option("--rounds", type=click.IntRange(1), default=1, show_default=True,
              help="Rounds of checks, poll seconds apart (down_after of them show whether the "
                   "agent would take over now).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def agent_check(config_path: str | None, rounds: int, as_json: bool) -> None:
    """One round of checks and the decision for each pair; nothing is done. Exit status: 0
    healthy, 1 degraded (a site, link or pair view missing), 3 a takeover would run now."""
    cfg = _load(config_path)
    a = Agent(cfg, dry_run=True)
    result = a.check()
    for _ in range(rounds - 1):
        a.sleep(cfg.poll)
        result = a.check()
    if as_json:
        click.echo(json.dumps(report(result), indent=2))
    else:
        for s in result[0][0].sites:
            state = "up" if s.healthy else "DOWN"
            links = {True: ", links up", False: ", link DOWN", None: ""}[s.links_up]
            why = f" ({s.reason})" if s.reason else ""
            click.echo(f"site {s.name}: {state}{links}{why}")
        for _, d in result:
            click.echo(d.describe(dry_run=True))
    sys.exit(check_status(result))
