"""agent.toml: `[agent]`, two `[[site]]` arrays, the `[[pair]]`s to watch, the `[host]`.

Every mistake is one `ConfigError` naming the field (`site[1].socket: ...`), as in
`vscsi.config`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vscsi.config import NAME_RE, ConfigError, read_toml

_AGENT_KEYS = {"poll", "down_after", "dry_run", "changeover_timeout", "timeout"}
_SITE_KEYS = {"name", "socket", "heartbeat_file", "heartbeat_max_age", "heartbeat_command"}
_PAIR_KEYS = {"name"}
_HOST_KEYS = {"socket", "filesystems"}
_TOP_KEYS = {"agent", "site", "pair", "host"}


@dataclass(frozen=True)
class SiteConfig:
    """One array: its control socket and the optional heartbeats of the site around it."""

    name: str
    socket: str
    heartbeat_file: str | None = None
    heartbeat_max_age: float = 10.0
    heartbeat_command: tuple[str, ...] | None = None


@dataclass(frozen=True)
class HostConfig:
    """The storage server's follower (`vscsi host`): its socket and the file systems it
    remounts after a takeover."""

    socket: str | None = None
    filesystems: tuple[str, ...] = ()


@dataclass(frozen=True)
class AgentConfig:
    poll: float
    down_after: int
    dry_run: bool
    changeover_timeout: float
    timeout: float  # for each control request and heartbeat command
    sites: tuple[SiteConfig, SiteConfig]
    pairs: tuple[str, ...]
    host: HostConfig
    source: str = "<memory>"


def load(path: str | Path) -> AgentConfig:
    """Read and validate an agent config file."""
    return parse(read_toml(path), source=str(path))


def parse(data: dict[str, Any], source: str = "<memory>") -> AgentConfig:
    _known(data, "", _TOP_KEYS)
    agent = _known(data.get("agent", {}), "agent", _AGENT_KEYS)
    sites = _list(data, "site")
    if len(sites) != 2:
        raise ConfigError(f"site: {len(sites)} [[site]] tables; the agent watches exactly two "
                          "arrays (the P-VOL's and the S-VOL's)")  # fmt: skip
    pairs = _list(data, "pair")
    if not pairs:
        raise ConfigError("pair: no [[pair]] table; name the remote pairs to watch")
    a, b = (_site(t, f"site[{i}]") for i, t in enumerate(sites))
    if a.name == b.name:
        raise ConfigError(f"site[1].name: {b.name!r} is already site[0]'s name")
    names = [_name(_known(t, f"pair[{i}]", _PAIR_KEYS), f"pair[{i}]") for i, t in enumerate(pairs)]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise ConfigError(f"pair[{i}].name: pair {n!r} is listed twice")
    return AgentConfig(
        poll=_positive(agent, "poll", 2.0, "agent"),
        down_after=_count(agent, "down_after", 3, "agent"),
        dry_run=_bool(agent, "dry_run", "agent"),
        changeover_timeout=_positive(agent, "changeover_timeout", 120.0, "agent"),
        timeout=_positive(agent, "timeout", 5.0, "agent"),
        sites=(a, b),
        pairs=tuple(names),
        host=_host(data.get("host", {})),
        source=source,
    )


def _site(table: object, where: str) -> SiteConfig:
    t = _known(table, where, _SITE_KEYS)
    command = t.get("heartbeat_command")
    if command is not None and (
        not isinstance(command, list) or not command
        or not all(isinstance(c, str) and c for c in command)
    ):  # fmt: skip
        raise ConfigError(f"{where}.heartbeat_command: must be a non-empty list of strings, "
                          'e.g. ["ping", "-c1", "-W1", "siteA-nas"]')  # fmt: skip
    return SiteConfig(
        name=_name(t, where),
        socket=_string(t, "socket", where, required=True) or "",
        heartbeat_file=_string(t, "heartbeat_file", where),
        heartbeat_max_age=_positive(t, "heartbeat_max_age", 10.0, where),
        heartbeat_command=tuple(command) if command is not None else None,
    )


def _host(table: object) -> HostConfig:
    t = _known(table, "host", _HOST_KEYS)
    fs = t.get("filesystems", [])
    if not isinstance(fs, list) or not all(isinstance(f, str) and f for f in fs):
        raise ConfigError('host.filesystems: must be a list of file system names, e.g. ["fs1"]')
    socket = _string(t, "socket", "host")
    if fs and socket is None:
        raise ConfigError("host.socket: required with host.filesystems (the `vscsi host` "
                          "control socket that remounts them)")  # fmt: skip
    if socket is not None and not fs:
        raise ConfigError('host.filesystems: required with host.socket: the file systems the '
                          'storage server remounts after a takeover, e.g. ["fs1"]')  # fmt: skip
    return HostConfig(socket=socket, filesystems=tuple(fs))


def _known(table: object, where: str, known: set[str]) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table")
    for key in table:
        if key not in known:
            field = f"{where}.{key}" if where else key
            raise ConfigError(f"{field}: unknown key (known: {', '.join(sorted(known))})")
    return table


def _list(data: dict[str, Any], key: str) -> list[Any]:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise ConfigError(f"{key}: write it as [[{key}]] tables")
    return value


def _name(t: dict[str, Any], where: str) -> str:
    name = t.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(f"{where}.name: {name!r} must be 1-32 of A-Z a-z 0-9 _ . - (required)")
    return name


def _string(t: dict[str, Any], key: str, where: str, required: bool = False) -> str | None:
    value = t.get(key)
    if value is None and required:
        raise ConfigError(f"{where}.{key}: required")
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigError(f"{where}.{key}: must be a non-empty string, got {value!r}")
    return value


def _positive(t: dict[str, Any], key: str, default: float, where: str) -> float:
    value = t.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{where}.{key}: must be a positive number of seconds, got {value!r}")
    return float(value)


def _count(t: dict[str, Any], key: str, default: int, where: str) -> int:
    value = t.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}.{key}: must be a whole number of checks >= 1, got {value!r}")
    return value


def _bool(t: dict[str, Any], key: str, where: str) -> bool:
    value = t.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}.{key}: must be true or false, got {value!r}")
    return value
