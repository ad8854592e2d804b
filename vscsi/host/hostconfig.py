"""`host.toml`: the storage server's filesystems and the mirrored volume each one lives on.

Parsed like the daemon's config: every mistake is one `ConfigError` naming the field
(`filesystem[1].volume`), found before anything is polled or mounted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vscsi.config import ConfigError, _get, _name, _table, read_toml

DEFAULT_HOST_SOCKET = "/run/vscsi/host.sock"
DEFAULT_DEVICES = ("/dev/sd*",)
DEFAULT_POLL = 2.0
DEFAULT_TIMEOUT = 1.0  # seconds a device may take to answer one poll's INQUIRYs
_VOLUME = re.compile(r"^\s*(\d+)\s*:\s*(?:0x)?([0-9A-Fa-f]{1,4})\s*$")
_FSTYPE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,31}$")
_HOST_KEYS = {"socket", "poll", "devices", "timeout"}
_FS_KEYS = {"name", "volume", "mountpoint", "fstype", "options", "fsck"}

Ident = tuple[int, int]  # (array serial, LDEV): what page 0xC0 names a volume by


def ident_text(ident: Ident) -> str:
    """`410011:0600`, the form `volume` is written in and every message uses."""
    return f"{ident[0]}:{ident[1]:04X}"


@dataclass(frozen=True)
class FilesystemConfig:
    """One `[[filesystem]]`: where to mount whichever side of `volume`'s mirror is primary."""

    name: str
    volume: Ident
    mountpoint: str
    fstype: str | None = None
    options: str = ""
    fsck: bool = False  # `fsck -p` the new primary before mounting it
    index: int = 0


@dataclass(frozen=True)
class HostConfig:
    """The whole file."""

    filesystems: list[FilesystemConfig]
    socket: str = DEFAULT_HOST_SOCKET
    poll: float = DEFAULT_POLL
    devices: tuple[str, ...] = DEFAULT_DEVICES
    timeout: float = DEFAULT_TIMEOUT
    source: str = ""


def parse_volume(value: object, where: str) -> Ident:
    """`"410011:0x0600"`: the array serial (decimal), then the LDEV (hex, 0x optional)."""
    m = _VOLUME.match(value) if isinstance(value, str) else None
    if m is None:
        raise ConfigError(f'{where}: {value!r} must be "SERIAL:LDEV", like "410011:0x0600"')
    serial = int(m.group(1))
    if not 0 < serial < 1 << 32:
        raise ConfigError(f"{where}: serial {serial} must be between 1 and 4294967295")
    return serial, int(m.group(2), 16)


def _seconds(table: dict[str, Any], key: str, default: float, limit: float) -> float:
    value = _get(table, key, (int, float), "host")
    if value is None:
        return default
    if not 0 < value <= limit:
        raise ConfigError(f"host.{key}: {value!r} must be more than 0 and at most {limit:g} s")
    return float(value)


def _devices(table: dict[str, Any]) -> tuple[str, ...]:
    value = table.get("devices")
    if value is None:
        return DEFAULT_DEVICES
    if not isinstance(value, list) or not value:
        raise ConfigError('host.devices: expected a list of globs, like ["/dev/sd*"]')
    for i, g in enumerate(value):
        if not isinstance(g, str) or not g.startswith("/"):
            raise ConfigError(f"host.devices[{i}]: {g!r} must be an absolute path or glob")
    return tuple(value)


def _filesystem(table: object, index: int) -> FilesystemConfig:
    where = f"filesystem[{index}]"
    table = _table(table, where, _FS_KEYS)
    name = _name(table, where)
    if "volume" not in table:
        raise ConfigError(f'{where}.volume: required, like "410011:0x0600"')
    volume = parse_volume(table["volume"], f"{where}.volume")
    mountpoint = _get(table, "mountpoint", str, where)
    if not mountpoint or not mountpoint.startswith("/") or mountpoint == "/":
        raise ConfigError(f"{where}.mountpoint: {mountpoint!r} must be an absolute path, not /")
    fstype = _get(table, "fstype", str, where)
    if fstype is not None and not _FSTYPE.match(fstype):
        raise ConfigError(f"{where}.fstype: {fstype!r} is not a filesystem type (like ext4)")
    options = _get(table, "options", str, where) or ""
    if any(c.isspace() for c in options):
        raise ConfigError(f"{where}.options: {options!r} must be mount -o's list, no spaces")
    return FilesystemConfig(
        name=name,
        volume=volume,
        mountpoint=str(Path(mountpoint)),
        fstype=fstype,
        options=options,
        fsck=bool(_get(table, "fsck", bool, where)),
        index=index,
    )


def _check_unique(filesystems: list[FilesystemConfig]) -> None:
    """Two filesystems on one volume or one mountpoint would fight over it."""
    for key in ("name", "volume", "mountpoint"):
        seen: dict[object, int] = {}
        for fs in filesystems:
            value = getattr(fs, key)
            if value in seen:
                shown = ident_text(value) if key == "volume" else value
                raise ConfigError(
                    f"filesystem[{fs.index}].{key}: {shown} is already used by "
                    f"filesystem[{seen[value]}]"
                )
            seen[value] = fs.index


def parse(data: dict[str, Any], source: str = "") -> HostConfig:
    """Validate a decoded TOML document."""
    for key in data:
        if key not in ("host", "filesystem"):
            raise ConfigError(f"{key}: unknown table (known: host, filesystem)")
    host = _table(data.get("host", {}), "host", _HOST_KEYS)
    tables = data.get("filesystem", [])
    if not isinstance(tables, list) or not tables:
        raise ConfigError("filesystem: at least one [[filesystem]] table is required")
    filesystems = [_filesystem(t, i) for i, t in enumerate(tables)]
    _check_unique(filesystems)
    socket = _get(host, "socket", str, "host") or DEFAULT_HOST_SOCKET
    if not socket.startswith("/"):
        raise ConfigError(f"host.socket: {socket!r} must be an absolute path")
    return HostConfig(
        filesystems=filesystems,
        socket=socket,
        poll=_seconds(host, "poll", DEFAULT_POLL, 3600),
        devices=_devices(host),
        timeout=_seconds(host, "timeout", DEFAULT_TIMEOUT, 60),
        source=source,
    )


def load(path: str | Path) -> HostConfig:
    """Read and validate a host config file."""
    return parse(read_toml(path), source=str(path))
