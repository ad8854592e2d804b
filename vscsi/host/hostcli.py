"""`vscsi host`: the storage server's side of a failover (docs/failover.md).

`run` follows each filesystem's primary volume; `status` and `remount` talk to it over its
control socket (the external agent uses the same two commands); `scan` shows one poll.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from typing import Any, NoReturn

import click

from vscsi.config import ConfigError
from vscsi.control import Command, ControlError, ControlServer, request
from vscsi.host import hostconfig
from vscsi.host.follow import REMOUNT_TIMEOUT, Follower, Plan, Reading, is_primary
from vscsi.host.hostconfig import DEFAULT_HOST_SOCKET, HostConfig, ident_text
from vscsi.host.mounts import SystemMounter
from vscsi.host.reader import SgReader, candidates

log = logging.getLogger(__name__)

socket_option = click.option(
    "--socket", "socket_path", default=DEFAULT_HOST_SOCKET, show_default=True,
    help="The follower's control socket ([host] socket).",
)  # fmt: skip
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def _fail(message: str, code: int = 1) -> NoReturn:
    """One line on stderr, as `vscsi` reports every user error."""
    click.echo(f"vscsi: {message}", err=True)
    sys.exit(code)


def _load(path: str) -> HostConfig:
    try:
        return hostconfig.load(path)
    except ConfigError as e:
        _fail(str(e), 2)


def _follower(config: HostConfig) -> Follower:
    return Follower(config, SgReader(config.timeout), SystemMounter(),
                    lambda: candidates(config.devices))  # fmt: skip


def commands(follower: Follower) -> dict[str, Command]:
    """The control socket's commands: `status` (read only), `unmount` (name) and `remount`
    (name, wait)."""
    return {
        "status": Command(follower.status, read_only=True),
        "unmount": Command(follower.unmount, required={"name": str}),
        "remount": Command(follower.remount, required={"name": str}, optional={"wait": int}),
    }


def _call(socket_path: str, cmd: str, timeout: float = 30.0, **args: Any) -> Any:
    if not os.path.exists(socket_path):
        _fail(f"no vscsi host follower at {socket_path}; start one with 'vscsi host run -c FILE'")
    try:
        return request(socket_path, cmd, timeout=timeout, **args)
    except ControlError as e:
        _fail(str(e), e.exit_status)


@click.group()
def host() -> None:
    """The storage server: mount each filesystem on the primary side of its mirror."""


@host.command("run")
@click.option("-c", "--config", "config_path", required=True, help="The host.toml file.")
@click.option("-v", "--verbose", count=True, help="Log every poll, not only changes.")
@click.option(
    "--unmount-on-exit",
    is_flag=True,
    help="Unmount the filesystems it mounted when stopped (default: leave them).",
)
def run(config_path: str, verbose: int, unmount_on_exit: bool) -> None:
    """Follow the primaries in the foreground until SIGTERM or Ctrl-C."""
    config = _load(config_path)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(message)s", stream=sys.stderr)  # fmt: skip
    follower = _follower(config)
    server = ControlServer(config.socket, commands(follower))
    try:
        server.start()
    except (ControlError, OSError) as e:
        _fail(f"{config.socket}: {e}" if isinstance(e, OSError) else str(e))
    previous = {s: signal.signal(s, lambda n, _f: _stop(follower, n))
                for s in (signal.SIGTERM, signal.SIGINT)}  # fmt: skip
    log.info("following %d filesystem(s) from %s, polling every %g s",
             len(config.filesystems), config_path, config.poll)  # fmt: skip
    try:
        follower.run()
    finally:
        server.close()
        for s, h in previous.items():
            signal.signal(s, h)
        if unmount_on_exit:
            follower.unmount_all()


def _stop(follower: Follower, signum: int) -> None:
    log.info("%s: stopping", signal.Signals(signum).name)
    follower.stop.set()


@host.command("status")
@socket_option
@json_option
def status(socket_path: str, as_json: bool) -> None:
    """Each filesystem: state, device, the claims seen, the last changeover and the reason."""
    result = _call(socket_path, "status")
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"vscsi host pid {result['pid']} ({result['config']}), "
               f"polling every {result['poll']:g} s")  # fmt: skip
    for fs in result["filesystems"]:
        last = fs["last_changeover_seconds"]
        took = f", last changeover {last:.3f} s" if last is not None else ""
        click.echo(f"{fs['name']}: {fs['state']} {fs['device'] or '-'} on {fs['mountpoint']} "
                   f"(volume {fs['volume']}{took})")  # fmt: skip
        click.echo(f"  {fs['reason']}")
        for c in fs["claims"]:
            click.echo(f"  {_claim_line(c)}")


def _claim_line(c: dict[str, Any]) -> str:
    if c["error"]:
        return f"{c['device']}  {c['volume'] or '-'}  unreachable: {c['error']}"
    mark = "  primary" if c["primary"] else ""
    return f"{c['device']}  {c['volume']}  {c['role']} {c['status']}{mark}"


@host.command("remount")
@click.argument("name")
@click.option(
    "--timeout",
    "wait",
    type=click.IntRange(0, 3600),
    default=REMOUNT_TIMEOUT,
    show_default=True,
    help="Seconds to wait for exactly one primary.",
)
@socket_option
def remount(name: str, wait: int, socket_path: str) -> None:
    """Unmount NAME, wait for exactly one primary, mount it (after a takeover)."""
    result = _call(socket_path, "remount", timeout=wait + 30.0, name=name, wait=wait)
    click.echo(f"{result['name']}: mounted {result['device']}, "
               f"changeover {result['changeover_seconds']:.3f} s")  # fmt: skip


@host.command("unmount")
@click.argument("name")
@socket_option
def unmount(name: str, socket_path: str) -> None:
    """Unmount NAME before a planned role change; it stays unmounted until `remount`."""
    result = _call(socket_path, "unmount", name=name)
    what = f"unmounted {result['device']}" if result["device"] else "was not mounted"
    click.echo(f"{result['name']}: {what}; held until 'vscsi host remount {result['name']}'")


@host.command("scan")
@click.option("-c", "--config", "config_path", help="Also show what each filesystem would get.")
@json_option
def scan(config_path: str | None, as_json: bool) -> None:
    """One poll: every device's identity and role, and each filesystem's decision. Changes
    nothing."""
    if config_path is None:
        readings, plans = SgReader(hostconfig.DEFAULT_TIMEOUT).read(
            candidates(hostconfig.DEFAULT_DEVICES)), {}  # fmt: skip
        volumes: dict[str, Any] = {}
    else:
        config = _load(config_path)
        readings, plans = _follower(config).preview()
        volumes = {fs.name: fs.volume for fs in config.filesystems}
    if as_json:
        click.echo(json.dumps({"devices": [_reading(r) for r in readings],
                               "filesystems": [_plan(n, p) for n, p in plans.items()]},
                              indent=2))  # fmt: skip
        return
    for r in readings:
        click.echo(_scan_line(r))
    for name, plan in plans.items():
        click.echo(f"{name}: {_action(plan)}: {plan.reason}")
        for r in plan.claims:
            mark = "  primary" if is_primary(r, volumes[name]) else ""
            click.echo(f"  {r.describe()}{mark}")


def _reading(r: Reading) -> dict[str, Any]:
    return {
        "device": r.device, "volume": ident_text(r.ident) if r.ident else None,
        "role": r.role, "status": r.status,
        "partner": ident_text(r.partner) if r.partner else None,
        "shadowimage_svol": r.si_svol, "error": r.error,
    }  # fmt: skip


def _plan(name: str, plan: Plan) -> dict[str, Any]:
    return {"name": name, "state": plan.state, "unmount": plan.unmount, "mount": plan.mount,
            "reason": plan.reason, "claims": [_reading(r) for r in plan.claims]}  # fmt: skip


def _action(plan: Plan) -> str:
    if plan.mount is not None:
        return f"would {'unmount, then ' if plan.unmount else ''}mount {plan.mount}"
    return "would unmount" if plan.unmount else plan.state


def _scan_line(r: Reading) -> str:
    if r.error:
        return f"{r.device} -> unreachable: {r.error}"
    if r.ident is None:
        return f"{r.device} -> not a vscsi volume"
    partner = f" partner {ident_text(r.partner)}" if r.partner else ""
    si = " (ShadowImage S-VOL)" if r.si_svol else ""
    return f"{r.device} -> {ident_text(r.ident)} HORC {r.role} {r.status}{partner}{si}"
