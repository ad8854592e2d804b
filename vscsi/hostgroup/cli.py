"""`vscsi hostgroup add/remove/show` and `vscsi lun map/unmap`: host groups and LUN paths of a
running daemon, like raidcom's `add host_grp` and `add lun`. vscsi.cli registers these groups
(import that, not this module, first)."""

from __future__ import annotations

import json
import os
from typing import Any

import click

from vscsi.cli import call, columns, json_option, socket_option


@click.group()
def hostgroup() -> None:
    """Host groups: the initiators on a port and the volumes they see (LUN security)."""


@hostgroup.command("show")
@click.argument("port", required=False)
@click.argument("name", required=False)
@json_option
@socket_option
def hostgroup_show(port: str | None, name: str | None, as_json: bool, socket_path: str) -> None:
    """Every host group, or those of PORT, or host group NAME of PORT."""
    args = {k: v for k, v in (("port", port), ("name", name)) if v is not None}
    groups = call(socket_path, "hostgroup_show", **args)
    if as_json:
        click.echo(json.dumps(groups, indent=2))
        return
    for g in groups:
        click.echo(show(g))


def show(g: dict[str, Any]) -> str:
    """One host group: its initiators and its LUN paths, like `raidcom get lun`."""
    chap = f"CHAP {g['chap_user']}" if "chap_user" in g else "no CHAP"
    if "mutual_user" in g:
        chap += f", mutual {g['mutual_user']}"
    lines = [f"{g['port']} {g['name']} ({chap})"]
    lines += [f"  initiator {i}" for i in g["initiators"]] or ["  no initiators"]
    rows = [("  LUN", "VOLUME"), *((f"  {h}", v) for h, v in g["luns"].items())]
    lines.append(columns(rows) if g["luns"] else "  no LUNs")
    return "\n".join(lines)


@hostgroup.command("add")
@click.argument("port")
@click.argument("name")
@click.option(
    "--initiator",
    "initiators",
    multiple=True,
    metavar="IQN",
    help="An initiator of the host group (repeat for more).",
)
@click.option("--chap-user", help="CHAP: the user name the initiators log in with.")
@click.option(
    "--chap-secret-file",
    type=click.Path(dir_okay=False),
    help="CHAP: the file (0600) holding their secret.",
)
@click.option("--mutual-user", help="Mutual CHAP: the name this target answers with.")
@click.option(
    "--mutual-secret-file",
    type=click.Path(dir_okay=False),
    help="Mutual CHAP: the file (0600) holding the target's secret.",
)
@socket_option
def hostgroup_add(
    port: str, name: str, initiators: tuple[str, ...], chap_user: str | None,
    chap_secret_file: str | None, mutual_user: str | None, mutual_secret_file: str | None,
    socket_path: str,
) -> None:  # fmt: skip
    """Make host group NAME on PORT with its initiators (then `vscsi lun map` its volumes)."""
    args: dict[str, Any] = {"initiators": ",".join(initiators)}
    for key, value in (("chap_user", chap_user), ("mutual_user", mutual_user)):
        if value is not None:
            args[key] = value
    for key, value in (("chap_secret_file", chap_secret_file),
                       ("mutual_secret_file", mutual_secret_file)):  # fmt: skip
        if value is not None:
            args[key] = os.path.abspath(value)  # the daemon's directory is not ours
    call(socket_path, "hostgroup_add", port=port, name=name, **args)
    click.echo(f"host group {name} on {port}: added ({len(initiators)} initiator(s))")


@hostgroup.command("remove")
@click.argument("port")
@click.argument("name")
@socket_option
def hostgroup_remove(port: str, name: str, socket_path: str) -> None:
    """Remove host group NAME of PORT: its initiators see nothing more through PORT."""
    call(socket_path, "hostgroup_remove", port=port, name=name)
    click.echo(f"host group {name} on {port}: removed")


@click.group()
def lun() -> None:
    """LUN paths: which volume a host group sees at which host LUN."""


@lun.command("map")
@click.argument("port")
@click.argument("name")
@click.argument("hlun", type=click.IntRange(0, 2047))
@click.argument("volume")
@socket_option
def lun_map(port: str, name: str, hlun: int, volume: str, socket_path: str) -> None:
    """Make VOLUME host LUN HLUN of host group NAME on PORT."""
    call(socket_path, "lun_map", port=port, name=name, lun=hlun, volume=volume)
    click.echo(f"{port} {name}: LUN {hlun} -> {volume}")


@lun.command("unmap")
@click.argument("port")
@click.argument("name")
@click.argument("hlun", type=click.IntRange(0, 2047))
@socket_option
def lun_unmap(port: str, name: str, hlun: int, socket_path: str) -> None:
    """Remove host LUN HLUN from host group NAME on PORT."""
    call(socket_path, "lun_unmap", port=port, name=name, lun=hlun)
    click.echo(f"{port} {name}: LUN {hlun} unmapped")
