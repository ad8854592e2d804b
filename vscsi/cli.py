"""The `vscsi` command line: serve volumes, and talk to a running daemon over its socket."""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from typing import Any

import click

from vscsi.control import DEFAULT_SOCKET, ControlError, request


def fail(message: str, code: int = 1) -> None:
    """One line on stderr and a non-zero exit: user errors never show a traceback."""
    click.echo(f"vscsi: {message}", err=True)
    sys.exit(code)


socket_option = click.option(
    "--socket",
    "socket_path",
    default=DEFAULT_SOCKET,
    show_default=True,
    help="The daemon's control socket.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


class LazyGroup(click.Group):
    """A group whose heavier subcommands are imported only when one of them runs (or --help
    lists them): every `vscsi` process, the daemon's included, would otherwise pay for all."""

    def __init__(self, *args: Any, lazy: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy  # command name -> "module:attribute"

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy:
            module, attr = self.lazy[cmd_name].split(":")
            command: click.Command = getattr(importlib.import_module(module), attr)
            return command
        return super().get_command(ctx, cmd_name)


@click.group(
    cls=LazyGroup,
    lazy={
        "agent": "vscsi.agent.command:agent",
        "host": "vscsi.host.hostcli:host",
        "hostgroup": "vscsi.hostgroup.cli:hostgroup",
        "inq": "vscsi.host.inq:inq",
        "lun": "vscsi.hostgroup.cli:lun",
    },
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(package_name="vscsi")
def main() -> None:
    """vscsi: emulated array volumes served to Linux through LIO/TCMU."""


@main.command()
@click.option("-c", "--config", "config_path", required=True, help="The TOML config file.")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.option(
    "--force-mount",
    multiple=True,
    metavar="SET",
    help="Mount shadow set SET from the members present although the state directory recorded "
    "a newer generation: the writes only a missing member holds are given up.",
)
def up(config_path: str, verbose: int, force_mount: tuple[str, ...]) -> None:
    """Serve the configured volumes until Ctrl-C or SIGTERM, then tear everything down."""
    from vscsi.config import ConfigError, load

    try:
        config = load(config_path)
    except ConfigError as e:
        fail(str(e), 2)
    sets = {sc.name for sc in config.shadow_sets}
    for name in force_mount:
        if name not in sets:
            fail(f"--force-mount {name}: {config_path} has no shadow set of that name", 2)
    from vscsi.daemon import Daemon, DaemonError  # the kernel-facing stack, only when serving

    try:
        Daemon(config, verbose=verbose, force_mount=force_mount).run()
    except (ConfigError, DaemonError) as e:
        fail(str(e), 2 if isinstance(e, ConfigError) else e.exit_status)


@main.command()
@click.option("-c", "--config", "config_path", required=True, help="The TOML config file.")
def check(config_path: str) -> None:
    """Validate a config file without serving anything."""
    from vscsi.config import ConfigError, load

    try:
        config = load(config_path)
    except ConfigError as e:
        fail(str(e), 2)
    click.echo(f"{config_path}: {len(config.volumes)} volume(s), OK")


@main.command()
@socket_option
@json_option
def status(socket_path: str, as_json: bool) -> None:
    """Show what a running daemon serves."""
    result = call(socket_path, "status")
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"vscsi daemon pid {result['pid']} ({result['config']})")
    head = ("VOLUME", "STATE", "ROLE", "SIZE", "BS", "SERIAL", "LDEV", "SD", "SG", "UIO", "BACKING")
    rows = [
        (
            v["name"],
            v["state"],
            v.get("role", "-"),
            human(v["size"]),
            str(v["block_size"]),
            str(v["serial"]),
            f"{v['volume_id']:04X}",
            v.get("sd") or "-",
            v.get("sg") or "-",
            v.get("uio") or "-",
            v["path"],
        )
        for v in result["volumes"]
    ]
    click.echo(columns([head, *rows]))
    for link in result.get("links", []):
        state = "up" if link["up"] else "DOWN"
        click.echo(f"link to {link['remote']} (serial {link['serial']}): {state}")
    for port in result.get("ports", []):
        click.echo(ports_status(port))


def ports_status(port: dict[str, Any]) -> str:
    """A port, its host groups and the sessions logged in through each."""
    lines = [f"port {port['name']} {port['iqn']} on {' '.join(port['portals'])}"]
    for g in port["host_groups"]:
        sessions = [s for s in port["sessions"] if s["host_group"] == g["name"]]
        chap = ", CHAP" if g["chap"] else ""
        lines.append(f"  host group {g['name']}: {len(g['initiators'])} initiator(s), "
                     f"{g['luns']} LUN(s){chap}, {len(sessions)} logged in")  # fmt: skip
        lines += [f"    {s['initiator']} from {','.join(s['addresses'])} ({s['state']})"
                  for s in sessions]  # fmt: skip
    return "\n".join(lines)


def columns(rows: list[tuple[str, ...]]) -> str:
    """Plain aligned columns, like the array CLIs print: easy to read and to grep."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def call(socket_path: str, cmd: str, **args: Any) -> Any:
    try:
        return request(socket_path, cmd, **args)
    except ControlError as e:
        fail(str(e), e.exit_status)


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:g}{unit}" if unit == "B" else f"{n:.4g}{unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


# -- pairs ------------------------------------------------------------------------------------

COPYING = ("COPY", "RCPY")


@main.group()
def pair() -> None:
    """Local pairs (ShadowImage-style): create, split, resync, restore, delete, display."""


wait_option = click.option(
    "--wait", "wait_s", type=float, default=None, metavar="SECONDS",
    help="Wait (at most SECONDS) until the copy this starts has ended.",
)  # fmt: skip


@pair.command("create")
@click.argument("pvol")
@click.argument("svol")
@click.option("--mu", type=click.IntRange(0, 2), help="Mirror unit MU#0-2 (local pairs).")
@click.option(
    "--fence",
    type=click.Choice(["data", "status", "never"]),
    help="Fence level of a remote pair (SVOL given as REMOTE:VOLUME); default never.",
)
@click.option("--name", help="The pair's name (default PVOL-SVOL).")
@wait_option
@socket_option
def pair_create(
    pvol: str, svol: str, mu: int | None, fence: str | None, name: str | None,
    wait_s: float | None, socket_path: str,
) -> None:  # fmt: skip
    """Pair PVOL with SVOL (a local volume, or REMOTE:VOLUME on a peer array): full copy
    P -> S (COPY), then PAIR."""
    name = name or f"{pvol}-{svol}".replace(":", "-")
    args = {k: v for k, v in (("mu", mu), ("fence", fence)) if v is not None}
    call(socket_path, "pair_create", name=name, pvol=pvol, svol=svol, **args)
    how = f"MU#{mu}" if mu is not None else f"fence {fence or 'never'}"
    click.echo(f"pair {name}: COPY ({how} {pvol} -> {svol})")
    finish(socket_path, name, wait_s)


@pair.command("split")
@click.argument("name")
@click.option("--read-only", is_flag=True, help="Keep the S-VOL read only (local pairs).")
@click.option("--rw", is_flag=True, help="Make the S-VOL writable in SSUS (remote pairs).")
@click.option(
    "-RS",
    "--RS",
    "rs",
    is_flag=True,
    help="At the S-VOL's array: force SSWS whatever the P side says (remote pairs).",
)
@socket_option
def pair_split(name: str, read_only: bool, rw: bool, rs: bool, socket_path: str) -> None:
    """PAIR -> PSUS: the S-VOL keeps every write acknowledged before this instant, none after."""
    flags = {k: True for k, v in (("read_only", read_only), ("rw", rw), ("rs", rs)) if v}
    call(socket_path, "pair_split", name=name, **flags)
    (p,) = call(socket_path, "pair_display", name=name)["pairs"]
    click.echo(f"pair {name}: {p['status']}{' (S-VOL read only)' if read_only else ''}")


@pair.command("resync")
@click.argument("name")
@click.option("--swaps", is_flag=True,
              help="At the S-VOL's array after a takeover: become the P side and copy this "
                   "side's changes back over the old P-VOL (remote pairs).")  # fmt: skip
@wait_option
@socket_option
def pair_resync(name: str, swaps: bool, wait_s: float | None, socket_path: str) -> None:
    """PSUS/PSUE -> COPY -> PAIR, copying only what changed on either side."""
    call(socket_path, "pair_resync", name=name, **({"swaps": True} if swaps else {}))
    click.echo(f"pair {name}: COPY ({'resync --swaps' if swaps else 'resync'})")
    finish(socket_path, name, wait_s)


@pair.command("restore")
@click.argument("name")
@wait_option
@socket_option
def pair_restore(name: str, wait_s: float | None, socket_path: str) -> None:
    """PSUS -> RCPY -> PSUS: copy the S-VOL back onto the P-VOL where they differ."""
    call(socket_path, "pair_restore", name=name)
    click.echo(f"pair {name}: RCPY (restore from S-VOL)")
    finish(socket_path, name, wait_s)


@pair.command("delete")
@click.argument("name")
@socket_option
def pair_delete(name: str, socket_path: str) -> None:
    """Any status -> both SMPL (a copy in progress is abandoned)."""
    call(socket_path, "pair_delete", name=name)
    click.echo(f"pair {name}: deleted, both volumes SMPL")


@main.command()
@click.argument("name")
@json_option
@socket_option
def takeover(name: str, as_json: bool, socket_path: str) -> None:
    """horctakeover for remote pair NAME at this array: nop, swap-takeover, SVOL-takeover or
    PVOL-takeover as the takeover-switch table says; exits with CCI's code (0 nop, 1 swap,
    4 PVOL-PSUE, 5 SVOL-SSUS, 225 SVOL-SSUS with the P side unknown)."""
    result = call(socket_path, "takeover", name=name)
    click.echo(json.dumps(result) if as_json else f"pair {name}: {result['action']}")
    sys.exit(result["exit"])


EX_EWSTOT = 233  # CCI: timeout waiting for the specified status


@pair.command("wait")
@click.argument("name")
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds.")
@click.option("--status", "want", metavar="STATUS",
              help="Wait for this status (e.g. PAIR, PSUE, SSWS) instead of the copy's end; "
                   "exit 233 (EX_EWSTOT) at the timeout, like pairevtwait -s.")  # fmt: skip
@socket_option
def pair_wait(name: str, timeout: float | None, want: str | None, socket_path: str) -> None:
    """Wait until the pair's copy (COPY/RCPY) has ended, like CCI's pairevtwait."""
    wait_s = timeout if timeout is not None else float("inf")
    if want is None:
        finish(socket_path, name, wait_s)
        return
    deadline = time.monotonic() + wait_s
    while (status := _status(socket_path, name)) != want.upper():
        if time.monotonic() >= deadline:
            fail(f"pair {name}: {status}, not {want.upper()}, after {wait_s:g}s", EX_EWSTOT)
        time.sleep(0.2)
    click.echo(f"pair {name}: {status}")


def _status(socket_path: str, name: str) -> str:
    (p,) = call(socket_path, "pair_display", name=name)["pairs"]
    return str(p["status"])


@pair.command("check")
@click.argument("name")
@json_option
@socket_option
def pair_check(name: str, as_json: bool, socket_path: str) -> None:
    """This array's volume of pair NAME, like CCI's pairvolchk: its role, status and fence."""
    (p,) = call(socket_path, "pair_display", name=name)["pairs"]
    remote = "remote" in p  # then this array's side is the one not named REMOTE:VOLUME
    side = next((v for v in (p["pvol"], p["svol"]) if ":" not in v["volume"]), p["pvol"])
    status = side["status"] if remote else p["status"]
    fence = f" fence = {p['fence'].upper()}" if remote else ""
    if as_json:
        extra = {"fence": p["fence"]} if remote else {}
        click.echo(json.dumps({"volstat": side["role"], "status": status, **extra}))
        return
    click.echo(f"pairvolchk : Volstat is {side['role']}.[status = {status}{fence} ]")


def finish(socket_path: str, name: str, wait_s: float | None) -> None:
    """Poll until the pair leaves COPY/RCPY; exit 233 (EX_EWSTOT, as pairevtwait) if it is
    still copying at the deadline."""
    if wait_s is None:
        return
    deadline = time.monotonic() + wait_s
    while True:
        (p,) = call(socket_path, "pair_display", name=name)["pairs"]
        if p["status"] not in COPYING:
            click.echo(f"pair {name}: {p['status']}")
            return
        if time.monotonic() >= deadline:
            fail(
                f"pair {name}: still {p['status']} ({p['progress']}%) after {wait_s:g}s", EX_EWSTOT
            )
        time.sleep(0.2)


@pair.command("display")
@click.argument("name", required=False)
@json_option
@socket_option
def pair_display(name: str | None, as_json: bool, socket_path: str) -> None:
    """Pairs and their status, both sides, like CCI's pairdisplay (NAME: a pair or a volume)."""
    result = call(socket_path, "pair_display", **({"name": name} if name else {}))
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(pairdisplay(result))


main.add_command(pair_display, "pairdisplay")


def pairdisplay(result: dict[str, Any]) -> str:
    """One line per side of each pair, then simplex volumes that carry a note."""
    head = ("PAIR", "MU", "VOLUME(L/R)", "PORT", "SERIAL", "LDEV", "P/S", "STATUS", "%",
            "CHANGED", "P-LDEV", "ACCESS")  # fmt: skip
    rows = [head]
    for p in result["pairs"]:
        for side, other, lr in (("pvol", "svol", "L"), ("svol", "pvol", "R")):
            v, o = p[side], p[other]
            status = p["status"] + ("(RO)" if side == "svol" and p["split_read_only"] else "")
            rows.append((p["pair"], str(p["mu"]), f"{v['volume']}({lr})", v["port"],
                         str(v["serial"]), f"{v['volume_id']:04X}", v["role"], status,
                         str(p["progress"]), human(v["changed_bytes"]),
                         f"{o['volume_id']:04X}", v["access"]))  # fmt: skip
    lines = [columns(rows)] if len(rows) > 1 else ["no pairs"]
    for v in result["volumes"]:
        if v["role"] == "SMPL" and v.get("content"):
            lines.append(f"{v['volume']}: SMPL, content {v['content']}")
    return "\n".join(lines)


# -- shadow sets --------------------------------------------------------------------------------


@main.group()
def shadow() -> None:
    """Shadow sets (OpenVMS-style): show, add a member (copy), remove one (minicopy)."""


@shadow.command("show")
@click.argument("name", required=False)
@json_option
@socket_option
def shadow_show(name: str | None, as_json: bool, socket_path: str) -> None:
    """The sets as SHOW SHADOW prints them: state, members, merge master, progress, queue."""
    sets = call(socket_path, "shadow_show", **({"name": name} if name else {}))
    if as_json:
        click.echo(json.dumps(sets, indent=2))
        return
    click.echo("\n\n".join(show_shadow(s) for s in sets) or "no shadow sets")


def show_shadow(s: dict[str, Any]) -> str:
    log = s["log"]
    wil = "disabled" if not log["enabled"] else "enabled" + (
        ", valid at mount" if log["valid_at_mount"] else ", not valid at mount"
    )  # fmt: skip
    lines = [
        f"{s['name']}: shadow set {s['set_id']}",
        f"  Virtual Unit State:   {s['state']}",
        f"  Size: {human(s['size'])}  Block size: {s['block_size']}  "
        f"Generation: {s['generation']}  Write-intent log: {wil}",
        "",
    ]
    rows = [("  MEMBER", "STATE")] + [(f"  {m['name']}", m["display"]) for m in s["members"]]
    lines.append(columns(rows))
    for op in s["operations"]:
        target = f" -> {op['target']}" if op["target"] else ""
        lines.append(f"  {'active ' if op['active'] else 'pending'}  {op['kind']}{target} "
                     f"{op['percent']}%")  # fmt: skip
    stats = ", ".join(f"{k.replace('_', ' ')} {human(v)}" for k, v in s["stats"].items()
                      if k != "read_repairs")  # fmt: skip
    lines.append(f"  Counters: {stats}, read repairs {s['stats'].get('read_repairs', 0)}")
    return "\n".join(lines)


@shadow.command("add")
@click.argument("name")
@click.argument("member", type=click.Path())
@click.option("--wait", "wait_s", type=float, default=None, metavar="SECONDS",
              help="Wait (at most SECONDS) until the copy has ended.")  # fmt: skip
@socket_option
def shadow_add(name: str, member: str, wait_s: float | None, socket_path: str) -> None:
    """Mount MEMBER (a file or block device) into set NAME: a copy, or a minicopy when it left
    with the minicopy policy."""
    s = call(socket_path, "shadow_add", name=name, member=os.path.abspath(member))
    click.echo(f"{name}: {s['state']}")
    if wait_s is not None:
        shadow_finish(socket_path, name, wait_s)


@shadow.command("remove")
@click.argument("name")
@click.argument("member", type=click.Path())
@click.option("--minicopy", is_flag=True, help="Track writes from now on for a minicopy back.")
@socket_option
def shadow_remove(name: str, member: str, minicopy: bool, socket_path: str) -> None:
    """Dismount MEMBER from set NAME (never the last full member)."""
    s = call(socket_path, "shadow_remove", name=name, member=os.path.abspath(member),
             minicopy=minicopy)  # fmt: skip
    click.echo(f"{name}: {os.path.abspath(member)} removed; {s['state']}")


@shadow.command("wait")
@click.argument("name")
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds.")
@socket_option
def shadow_wait(name: str, timeout: float | None, socket_path: str) -> None:
    """Wait until the set is steady (no copy or merge pending), with a progress bar on a
    terminal."""
    shadow_finish(socket_path, name, timeout if timeout is not None else float("inf"))


def shadow_finish(socket_path: str, name: str, wait_s: float) -> None:
    """Poll until no operation is pending; exit 1 if one still is at the deadline."""
    from rich.progress import Progress  # only here: it costs more than the rest of the CLI

    deadline = time.monotonic() + wait_s
    bar = Progress(transient=True, disable=not sys.stdout.isatty())
    task = bar.add_task(name, total=100)
    with bar:
        while True:
            (s,) = call(socket_path, "shadow_show", name=name)
            ops = s["operations"]
            if not ops:
                break
            head = ops[0]
            bar.update(task, completed=head["percent"], description=f"{name}: {s['state']}")
            if time.monotonic() >= deadline:
                fail(f"{name}: still {s['state']} after {wait_s:g}s")
            time.sleep(0.2)
    click.echo(f"{name}: {s['state']}")


# -- links between arrays -----------------------------------------------------------------------


@main.group()
def link() -> None:
    """Links to peer arrays (remote pairs)."""


@link.command("keys")
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False),
              help="Where to write NAME.key and NAME.crt.")  # fmt: skip
@click.option("--name", required=True, help="This array's name, as peers will call it.")
@click.option("--serial", required=True, type=click.IntRange(1, (1 << 32) - 1),
              help="This array's serial; peers check it against their [[remote]].")  # fmt: skip
def link_keys(directory: str, name: str, serial: int) -> None:
    """Make this array's link key (EC P-256) and self-signed certificate."""
    from pathlib import Path

    from vscsi.link.keys import KeyMaterialError, make_keys

    try:
        key, cert = make_keys(Path(directory).resolve(), name, serial)
    except (KeyMaterialError, OSError) as e:
        fail(str(e) if isinstance(e, KeyMaterialError) else f"--dir {directory}: {e.strerror}", 2)
    click.echo(
        f"made {key} (private: keep it here, mode 0600) and {cert}\n"
        f"\nIn this array's config ({name}, serial {serial}):\n"
        f"  [daemon]\n"
        f'  link_cert = "{cert}"\n'
        f'  link_key = "{key}"\n'
        f'  link_listen = "0.0.0.0:PORT"    # to accept peers\n'
        f"\nCopy {cert} to each peer array, and add to its config:\n"
        f"  [[remote]]\n"
        f'  name = "{name}"\n'
        f'  address = "HOST:PORT"           # where this array listens\n'
        f"  serial = {serial}\n"
        f'  peer_cert = "/path/to/{cert.name}"'
    )
