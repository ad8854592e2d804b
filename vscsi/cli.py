"""The `vscsi` command line: serve volumes, and talk to a running daemon over its socket."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from vscsi.config import DEFAULT_SOCKET, ConfigError, load
from vscsi.control import ControlError, request


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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vscsi")
def main() -> None:
    """vscsi: emulated array volumes served to Linux through LIO/TCMU."""


@main.command()
@click.option("-c", "--config", "config_path", required=True, help="The TOML config file.")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
def up(config_path: str, verbose: int) -> None:
    """Serve the configured volumes until Ctrl-C or SIGTERM, then tear everything down."""
    try:
        config = load(config_path)
    except ConfigError as e:
        fail(str(e), 2)
    from vscsi.daemon import Daemon, DaemonError  # the kernel-facing stack, only when serving

    try:
        Daemon(config, verbose=verbose).run()
    except (ConfigError, DaemonError) as e:
        fail(str(e), 2 if isinstance(e, ConfigError) else 1)


@main.command()
@click.option("-c", "--config", "config_path", required=True, help="The TOML config file.")
def check(config_path: str) -> None:
    """Validate a config file without serving anything."""
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
    head = ("VOLUME", "STATE", "SIZE", "BS", "SERIAL", "LDEV", "SD", "SG", "UIO", "BACKING")
    rows = [
        (
            v["name"],
            v["state"],
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
        fail(str(e))


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:g}{unit}" if unit == "B" else f"{n:.4g}{unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)
