"""The TOML configuration: one `[[volume]]` table per emulated volume, `[[remote]]` peer arrays,
`[[port]]` iSCSI target ports and the `[[host_group]]`s behind them (docs/host-groups.md).

Every problem is reported as one `ConfigError` naming the field (`volume[1].path`), and is found
before anything is created: `load()` validates the whole file, `open_volumes()` opens every
backing store and closes them all again if any fails.
"""

from __future__ import annotations

import grp
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vscsi.control import DEFAULT_SOCKET
from vscsi.link import netns
from vscsi.scsi.identity import Identity
from vscsi.store.claim import store_key
from vscsi.store.file import FileVolume, StoreConfigError

DEFAULT_STATE_DIR = "/var/lib/vscsi"
DEFAULT_LINK_TIMEOUT = 10.0  # seconds without a frame from a peer before it counts as dead
DEFAULT_IO_WORKERS = 8  # a LUN's commands that wait on a peer array, run at once
MAX_IO_WORKERS = 64
EXPORTS = ("loop", "iscsi", "none")
READ_POLICIES = ("balanced", "master")
TRANSPORTS = ("native", "libtcmu")  # how the daemon talks to the ring (docs/config.md)
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}$")  # volumes, sets, arrays
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


class ConfigError(ValueError):
    """A configuration mistake; the message is one line naming the field and the fix."""


@dataclass(frozen=True)
class VolumeConfig:
    """One `[[volume]]` table, validated."""

    name: str
    path: str
    size: int | None
    block_size: int | None
    write_cache: bool
    create: bool
    export: tuple[str, ...]  # "loop" and/or "iscsi"; empty for export = "none"
    identity: Identity
    index: int = 0
    follow_symlinks: bool = False

    @property
    def where(self) -> str:
        return f"volume[{self.index}]"

    @property
    def label(self) -> str:
        return f"volume {self.name!r}"


@dataclass(frozen=True)
class ShadowSetConfig:
    """One `[[shadow_set]]` table, validated: a virtual unit over member devices or files."""

    name: str
    members: list[str]
    size: int | None  # for members to create; the set is as large as its smallest member
    block_size: int | None
    create: bool
    write_intent_log: bool
    read_policy: str
    export: tuple[str, ...]
    identity: Identity
    index: int = 0
    follow_symlinks: bool = False

    @property
    def where(self) -> str:
        return f"shadow_set[{self.index}]"

    @property
    def label(self) -> str:
        return f"shadow set {self.name!r}"

    @property
    def path(self) -> str:
        """How `vscsi status` names the backing: the members."""
        return "shadow:" + ",".join(self.members)


@dataclass(frozen=True)
class RemoteConfig:
    """One `[[remote]]` table: a peer array, pinned by its certificate, which names `serial`."""

    name: str
    host: str
    port: int
    serial: int
    peer_cert: str
    index: int = 0

    @property
    def where(self) -> str:
        return f"remote[{self.index}]"


class Secret(str):
    """A CHAP secret: its repr and str formatting never show it, so no log or error can."""

    def __repr__(self) -> str:
        return "Secret(***)"

    def __format__(self, spec: str) -> str:
        return "***"


@dataclass(frozen=True)
class Chap:
    """CHAP credentials of a host group: the initiator proves `user`/`secret`; with `mutual_user`
    the target proves itself back with `mutual_user`/`mutual_secret`."""

    user: str
    secret: Secret = field(repr=False)
    mutual_user: str | None = None
    mutual_secret: Secret | None = field(default=None, repr=False)
    secret_file: str = ""  # where they came from (for `hostgroup show`, never the secret)
    mutual_secret_file: str | None = None


@dataclass(frozen=True)
class PortConfig:
    """One `[[port]]` table: an iSCSI target (one LIO target, TPG 1) named like an array port."""

    name: str
    iqn: str
    portals: tuple[tuple[str, int], ...]
    index: int = 0

    @property
    def where(self) -> str:
        return f"port[{self.index}]"


@dataclass(frozen=True)
class HostGroupConfig:
    """One `[[host_group]]`: initiators on one port and the volumes they see, by host LUN."""

    port: str
    name: str
    initiators: tuple[str, ...]
    luns: dict[int, str]
    chap: Chap | None = None
    where: str = "host_group"


@dataclass(frozen=True)
class LinkConfig:
    """This array's end of its links (`[daemon] link_*`); name and serial come from its
    certificate, so what it says in HELLO is what a peer can check."""

    cert: str
    key: str
    name: str
    serial: int
    listen: tuple[str, int] | None = None  # None: accept no peer (only connect to them)
    timeout: float = DEFAULT_LINK_TIMEOUT
    netns: str | None = None  # the network namespace the link's sockets live in; None: ours


@dataclass(frozen=True)
class Config:
    """The whole file: daemon settings, the volumes, the shadow sets and the peer arrays."""

    volumes: list[VolumeConfig]
    shadow_sets: list[ShadowSetConfig] = field(default_factory=list)
    socket: str = DEFAULT_SOCKET
    state_dir: str = DEFAULT_STATE_DIR
    copy_rate: int = 0  # bytes/s for pair and shadow-set copies; 0 = as fast as the devices go
    command_timeout: int | None = None  # TCMU cmd_time_out for new backstores; None: kernel's
    io_workers: int = DEFAULT_IO_WORKERS  # threads per LUN for commands that wait on a peer
    fast_path: bool = True  # READ/WRITE the compiled ring path may serve go through it
    transport: str = "native"  # the ring: our own (vscsi.tcmu.uio) or libtcmu.so.2
    socket_group: str | None = None  # may run read-only commands over the socket
    shadow_add_paths: list[str] = field(default_factory=list)  # where `shadow add` may look
    link: LinkConfig | None = None  # set when the config has [[remote]] tables or link_listen
    remotes: list[RemoteConfig] = field(default_factory=list)
    ports: list[PortConfig] = field(default_factory=list)
    host_groups: list[HostGroupConfig] = field(default_factory=list)
    source: str = ""


def parse_size(value: object, where: str) -> int:
    """Sizes are integers (bytes) or strings like "64MiB", "1G", "4096"."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a size, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        n = int(m.group(1)) * _UNITS[m.group(2).lower()]
    else:
        raise ConfigError(f'{where}: {value!r} is not a size (bytes, or like "64MiB")')
    if n <= 0:
        raise ConfigError(f"{where}: size must be positive, got {value!r}")
    return n


def _get(table: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = table.get(key)
    if value is not None and (
        not isinstance(value, kind) or isinstance(value, bool) != (kind is bool)
    ):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(f"{where}.{key}: expected {names}, got {value!r}")
    return value


def _identity(table: dict[str, Any], where: str, index: int) -> Identity:
    ident = table.get("identity", {})
    if not isinstance(ident, dict):
        raise ConfigError(f"{where}.identity: expected a table")
    known = {"vendor", "product", "revision", "serial", "volume_id", "port"}
    for key in ident:
        if key not in known:
            raise ConfigError(
                f"{where}.identity.{key}: unknown key (known: {', '.join(sorted(known))})"
            )
    w = f"{where}.identity"
    limits = {"vendor": 8, "product": 16, "revision": 4, "port": 16}
    kwargs: dict[str, Any] = {}
    for key, limit in limits.items():
        value = _get(ident, key, str, w)
        if value is None:
            continue
        if len(value) > limit or not value.isascii() or not value.isprintable():
            raise ConfigError(
                f"{w}.{key}: {value!r} must be printable ASCII, at most {limit} chars"
            )
        kwargs[key] = value
    serial = _get(ident, "serial", int, w)
    if serial is not None and not 0 < serial < 1 << 32:
        raise ConfigError(f"{w}.serial: {serial} must be between 1 and 4294967295")
    volume_id = _get(ident, "volume_id", int, w)
    if volume_id is not None and not 0 <= volume_id < 1 << 16:
        raise ConfigError(f"{w}.volume_id: {volume_id} must be between 0 and 65535")
    return Identity(
        **kwargs,
        **({"serial": serial} if serial is not None else {}),
        volume_id=volume_id if volume_id is not None else index,
    )


_SHADOW_KEYS = {
    "name", "members", "size", "block_size", "create", "write_intent_log", "read_policy",
    "export", "identity", "follow_symlinks",
}  # fmt: skip
_DAEMON_KEYS = {
    "socket", "state_dir", "copy_rate", "command_timeout", "io_workers", "fast_path",
    "socket_group", "transport", "shadow_add_paths", "link_listen", "link_cert", "link_key",
    "link_timeout", "link_netns",
}  # fmt: skip
_REMOTE_KEYS = {"name", "address", "serial", "peer_cert"}
_TOP = ("daemon", "volume", "shadow_set", "remote", "port", "host_group")
_PORT_KEYS = {"name", "iqn", "portals"}
_HOST_GROUP_KEYS = {
    "port", "name", "initiators", "luns", "chap_user", "chap_secret_file", "mutual_user",
    "mutual_secret_file",
}  # fmt: skip
PORT_RE = re.compile(r"^CL[1-9A-H]-[A-Z]$")  # CL1-A .. CLH-Z, as the array labels its ports
IQN_RE = re.compile(
    r"^(iqn\.\d{4}-\d{2}\.[a-z0-9][a-z0-9.:-]{0,210}|eui\.[0-9a-f]{16}|naa\.[0-9a-f]{16,32})$"
)  # RFC 3720 names in the lower case LIO keeps them in
MAX_HLUN = 2047  # the array's host LUN range (0-2047)
_VOLUME_KEYS = {
    "name", "path", "size", "block_size", "write_cache", "create", "export", "identity",
    "follow_symlinks",
}  # fmt: skip


def _table(table: object, where: str, known: set[str]) -> dict[str, Any]:
    """A table with only known keys."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table")
    for key in table:
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(sorted(known))})")
    return table


def _name(table: dict[str, Any], where: str) -> str:
    name = _get(table, "name", str, where)
    if name is None or not NAME_RE.match(name):
        raise ConfigError(f"{where}.name: {name!r} must be 1-32 of A-Z a-z 0-9 _ . - (required)")
    return name


def _block_size(table: dict[str, Any], where: str) -> int | None:
    block_size = _get(table, "block_size", int, where)
    if block_size is not None and block_size not in (512, 4096):
        raise ConfigError(f"{where}.block_size: {block_size} must be 512 or 4096")
    return block_size


def _export(table: dict[str, Any], where: str) -> tuple[str, ...]:
    """`export`: one of EXPORTS or a list of "loop" and "iscsi"; "none" is the empty tuple."""
    value = table.get("export", "loop")
    values = value if isinstance(value, list) else [value]
    if (
        not values
        or any(v not in EXPORTS for v in values)
        or ("none" in values and len(values) > 1)
    ):
        raise ConfigError(
            f'{where}.export: {value!r} must be "loop", "iscsi", "none" or a list like '
            '["loop", "iscsi"]'
        )
    if len(set(values)) != len(values):
        raise ConfigError(f"{where}.export: {value!r} names an export twice")
    return tuple(v for v in values if v != "none")


def _choice(table: dict[str, Any], key: str, choices: tuple[str, ...], where: str) -> str:
    """A string from `choices`, the first one by default."""
    value = _get(table, key, str, where) or choices[0]
    if value not in choices:
        raise ConfigError(f"{where}.{key}: {value!r} must be one of {', '.join(choices)}")
    return value


def _size(table: dict[str, Any], where: str) -> int | None:
    size = table.get("size")
    return parse_size(size, f"{where}.size") if size is not None else None


def _path(base: Path, path: str) -> str:
    """Relative paths are relative to the config file's directory."""
    return str(Path(path) if Path(path).is_absolute() else base / path)


def _volume(table: object, index: int, base: Path) -> VolumeConfig:
    where = f"volume[{index}]"
    table = _table(table, where, _VOLUME_KEYS)
    name = _name(table, where)
    path = _get(table, "path", str, where)
    if not path:
        raise ConfigError(f"{where}.path: required (a file or a block device)")
    write_cache = _get(table, "write_cache", bool, where)
    return VolumeConfig(
        name=name,
        path=_path(base, path),
        size=_size(table, where),
        block_size=_block_size(table, where),
        write_cache=True if write_cache is None else write_cache,
        create=bool(_get(table, "create", bool, where)),
        export=_export(table, where),
        identity=_identity(table, where, index),
        index=index,
        follow_symlinks=bool(_get(table, "follow_symlinks", bool, where)),
    )


def _shadow_set(table: object, index: int, base: Path, volumes: int) -> ShadowSetConfig:
    where = f"shadow_set[{index}]"
    table = _table(table, where, _SHADOW_KEYS)
    name = _name(table, where)
    members = table.get("members")
    if not isinstance(members, list) or not members:
        raise ConfigError(f"{where}.members: a list of files or block devices is required")
    paths = []
    for i, m in enumerate(members):
        if not isinstance(m, str) or not m:
            raise ConfigError(f"{where}.members[{i}]: expected a path, got {m!r}")
        paths.append(_path(base, m))
    wil = _get(table, "write_intent_log", bool, where)
    return ShadowSetConfig(
        name=name,
        members=paths,
        size=_size(table, where),
        block_size=_block_size(table, where),
        create=bool(_get(table, "create", bool, where)),
        write_intent_log=True if wil is None else wil,
        read_policy=_choice(table, "read_policy", READ_POLICIES, where),
        export=_export(table, where),
        identity=_identity(table, where, volumes + index),
        index=index,
        follow_symlinks=bool(_get(table, "follow_symlinks", bool, where)),
    )


def parse(data: dict[str, Any], source: str = "", base: Path | None = None) -> Config:
    """Validate a decoded TOML document."""
    base = base or Path.cwd()
    for key in data:
        if key not in _TOP:
            raise ConfigError(f"{key}: unknown table (known: {', '.join(_TOP)})")
    daemon = _table(data.get("daemon", {}), "daemon", _DAEMON_KEYS)
    socket = _get(daemon, "socket", str, "daemon") or DEFAULT_SOCKET
    state_dir = _get(daemon, "state_dir", str, "daemon") or DEFAULT_STATE_DIR
    rate = daemon.get("copy_rate")
    timeout = _get(daemon, "command_timeout", int, "daemon")
    if timeout is not None and not 0 <= timeout <= 3600:
        raise ConfigError(f"daemon.command_timeout: {timeout} must be 0 (never) to 3600 seconds")
    workers = _get(daemon, "io_workers", int, "daemon")
    if workers is not None and not 0 <= workers <= MAX_IO_WORKERS:
        raise ConfigError(f"daemon.io_workers: {workers} must be 0 (in order) to {MAX_IO_WORKERS}")
    fast = _get(daemon, "fast_path", bool, "daemon")
    tables = data.get("volume", [])
    sets = data.get("shadow_set", [])
    if not isinstance(tables, list) or not isinstance(sets, list) or not (tables or sets):
        raise ConfigError("volume: at least one [[volume]] or [[shadow_set]] table is required")
    volumes = [_volume(t, i, base) for i, t in enumerate(tables)]
    shadow_sets = [_shadow_set(t, i, base, len(volumes)) for i, t in enumerate(sets)]
    _check_unique([*volumes, *shadow_sets])
    remote_tables = data.get("remote", [])
    if not isinstance(remote_tables, list):
        raise ConfigError("remote: expected [[remote]] tables")
    remotes = [_remote(t, i, base) for i, t in enumerate(remote_tables)]
    link = _link(daemon, base, remotes)
    ports = _ports(data.get("port", []))
    host_groups = _host_groups(data.get("host_group", []), base, ports, [*volumes, *shadow_sets])
    return Config(
        volumes=volumes,
        shadow_sets=shadow_sets,
        socket=socket,
        state_dir=str(base / state_dir),
        copy_rate=parse_size(rate, "daemon.copy_rate") if rate is not None else 0,
        command_timeout=timeout,
        io_workers=DEFAULT_IO_WORKERS if workers is None else workers,
        fast_path=True if fast is None else fast,
        transport=_choice(daemon, "transport", TRANSPORTS, "daemon"),
        socket_group=_socket_group(daemon),
        shadow_add_paths=_shadow_add_paths(daemon),
        link=link,
        remotes=remotes,
        ports=ports,
        host_groups=host_groups,
        source=source,
    )


def _ports(tables: object) -> list[PortConfig]:
    if not isinstance(tables, list):
        raise ConfigError("port: expected [[port]] tables")
    ports: list[PortConfig] = []
    seen: dict[object, str] = {}
    for index, t in enumerate(tables):
        where = f"port[{index}]"
        table = _table(t, where, _PORT_KEYS)
        name = _get(table, "name", str, where)
        if name is None or not PORT_RE.match(name):
            raise ConfigError(f'{where}.name: {name!r} must name a port like "CL1-A" (required)')
        iqn = iqn_of(table.get("iqn"), f"{where}.iqn")
        portals = table.get("portals")
        if not isinstance(portals, list) or not portals:
            raise ConfigError(f'{where}.portals: a list like ["192.0.2.10:3260"] is required')
        addrs = tuple(_address(p, f"{where}.portals[{i}]") for i, p in enumerate(portals))
        for key, field_name in [(name, "name"), (iqn, "iqn"), *((a, "portals") for a in addrs)]:
            if key in seen:
                raise ConfigError(f"{where}.{field_name}: {key!r} is already used by {seen[key]}")
            seen[key] = where
        ports.append(PortConfig(name, iqn, addrs, index))
    return ports


def iqn_of(value: object, where: str) -> str:
    """An iSCSI name: `iqn.yyyy-mm.reversed.domain[:anything]`, `eui.` or `naa.` hex."""
    if not isinstance(value, str) or not IQN_RE.match(value):
        raise ConfigError(
            f'{where}: {value!r} must be an iSCSI name like "iqn.2026-01.com.example:host1" '
            "(lower case)"
        )
    return value


def _host_groups(
    tables: object, base: Path, ports: list[PortConfig], units: list[VolumeConfig | ShadowSetConfig]
) -> list[HostGroupConfig]:
    if not isinstance(tables, list):
        raise ConfigError("host_group: expected [[host_group]] tables")
    groups = [host_group(t, f"host_group[{i}]", base, ports, units) for i, t in enumerate(tables)]
    check_host_groups(groups)
    return groups


def host_group(
    table: object,
    where: str,
    base: Path,
    ports: list[PortConfig],
    units: list[VolumeConfig | ShadowSetConfig],
) -> HostGroupConfig:
    """One host group on its own (the daemon checks `hostgroup add` with it, too)."""
    table = _table(table, where, _HOST_GROUP_KEYS)
    port = _get(table, "port", str, where)
    if port not in {p.name for p in ports}:
        known = ", ".join(p.name for p in ports) or "no [[port]] tables"
        raise ConfigError(f"{where}.port: {port!r} is not a configured port (known: {known})")
    name = _name(table, where)
    initiators = table.get("initiators", [])
    if not isinstance(initiators, list):
        raise ConfigError(f"{where}.initiators: expected a list of iSCSI initiator names")
    iqns = tuple(iqn_of(x, f"{where}.initiators[{i}]") for i, x in enumerate(initiators))
    if len(set(iqns)) != len(iqns):
        raise ConfigError(f"{where}.initiators: an initiator is listed twice")
    luns = table.get("luns", {})
    if not isinstance(luns, dict):
        raise ConfigError(f'{where}.luns: expected a table like {{0 = "volume"}}')
    mapped = {hlun_of(k, f"{where}.luns.{k}"): v for k, v in luns.items()}
    for hlun, volume in mapped.items():
        check_mappable(volume, units, f"{where}.luns.{hlun}")
    return HostGroupConfig(port, name, iqns, mapped, _chap(table, where, base), where)


def hlun_of(key: object, where: str) -> int:
    """A host LUN: 0 to MAX_HLUN, given as a TOML key or an integer."""
    text = str(key)
    if not text.isdigit() or int(text) > MAX_HLUN:
        raise ConfigError(f"{where}: host LUN {key!r} must be 0 to {MAX_HLUN}")
    return int(text)


def check_mappable(volume: object, units: list[VolumeConfig | ShadowSetConfig], where: str) -> None:
    """Only a served volume whose `export` includes "iscsi" can be mapped to a host LUN."""
    unit = next((u for u in units if u.name == volume), None)
    if unit is None:
        raise ConfigError(f"{where}: {volume!r} is not a configured volume or shadow set")
    if "iscsi" not in unit.export:
        raise ConfigError(
            f'{where}: {unit.label} is not exported over iSCSI (add "iscsi" to {unit.where}.export)'
        )


def _chap(table: dict[str, Any], where: str, base: Path) -> Chap | None:
    user = _get(table, "chap_user", str, where)
    secret_file = _get(table, "chap_secret_file", str, where)
    mutual_user = _get(table, "mutual_user", str, where)
    mutual_file = _get(table, "mutual_secret_file", str, where)
    if user is None and secret_file is None and mutual_user is None and mutual_file is None:
        return None
    if not user or not secret_file:
        missing = "chap_secret_file" if user else "chap_user"
        raise ConfigError(f"{where}.{missing}: required with CHAP (chap_user and its secret file)")
    if (mutual_user is None) != (mutual_file is None):
        missing = "mutual_secret_file" if mutual_user else "mutual_user"
        raise ConfigError(f"{where}.{missing}: required with mutual CHAP")
    for key, value in (("chap_user", user), ("mutual_user", mutual_user)):
        if value is not None and not (value.isascii() and value.isprintable() and value.strip()):
            raise ConfigError(f"{where}.{key}: must be printable ASCII")
    secret_file = _path(base, secret_file)
    secret = read_secret(secret_file, f"{where}.chap_secret_file")
    mutual = None
    if mutual_file is not None:
        mutual_file = _path(base, mutual_file)
        mutual = read_secret(mutual_file, f"{where}.mutual_secret_file")
        if mutual == secret:
            raise ConfigError(
                f"{where}.mutual_secret_file: must differ from the CHAP secret (RFC 3720)"
            )
    return Chap(user, secret, mutual_user, mutual, secret_file, mutual_file)


def read_secret(path: str, where: str) -> Secret:
    """A CHAP secret from its own file: 0600 (or stricter), owned by root or by us, one line of
    12 to 255 printable characters. Errors name the file, never its content."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"{where}: cannot read {path} ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_uid not in (0, os.geteuid()):
            raise ConfigError(f"{where}: {path} must be owned by root (chown root {path})")
        if st.st_mode & 0o077:
            raise ConfigError(f"{where}: {path} is open to group or others (chmod 600 {path})")
        raw = f.read(4096)
    text = raw.decode("ascii", errors="replace").rstrip("\n")
    if not 12 <= len(text) <= 255 or not text.isprintable() or "\ufffd" in text or " " in text:
        raise ConfigError(
            f"{where}: {path} must hold one line of 12-255 printable ASCII characters, no spaces"
        )
    return Secret(text)


def check_host_groups(groups: list[HostGroupConfig]) -> None:
    """Across host groups: names unique per port, an initiator in one host group per port, a
    and CHAP on every host group of a port or on none (LIO enforces it per TPG)."""
    names: dict[tuple[str, str], str] = {}
    members: dict[tuple[str, str], str] = {}
    chap: dict[str, HostGroupConfig] = {}
    for g in groups:
        if (g.port, g.name) in names:
            raise ConfigError(
                f"{g.where}.name: {g.name!r} is already a host group of {g.port} "
                f"({names[g.port, g.name]})"
            )
        names[g.port, g.name] = g.where
        for i, iqn in enumerate(g.initiators):
            if (g.port, iqn) in members:
                raise ConfigError(
                    f"{g.where}.initiators[{i}]: {iqn} is already in {members[g.port, iqn]} on "
                    f"{g.port} (an initiator belongs to one host group per port)"
                )
            members[g.port, iqn] = f"host group {g.name}"
        first = chap.setdefault(g.port, g)
        if (first.chap is None) != (g.chap is None):
            with_chap = first if first.chap is not None else g
            raise ConfigError(
                f"{g.where}.chap_user: {g.port} authenticates with CHAP ({with_chap.where}); "
                "every host group on a port needs CHAP, or none does"
            )


def _socket_group(daemon: dict[str, Any]) -> str | None:
    """A group that exists here: its members may run the read-only commands."""
    group = _get(daemon, "socket_group", str, "daemon")
    if group is not None:
        try:
            grp.getgrnam(group)
        except KeyError:
            raise ConfigError(f"daemon.socket_group: no group {group!r} on this host") from None
    return group


def _shadow_add_paths(daemon: dict[str, Any]) -> list[str]:
    """Absolute directories (with a trailing /) under which `vscsi shadow add` may open."""
    value = daemon.get("shadow_add_paths", [])
    if not isinstance(value, list):
        raise ConfigError("daemon.shadow_add_paths: expected a list of absolute directories")
    dirs = []
    for i, d in enumerate(value):
        if not isinstance(d, str) or not d.startswith("/"):
            raise ConfigError(f"daemon.shadow_add_paths[{i}]: {d!r} must be an absolute directory")
        dirs.append(os.path.normpath(d).rstrip("/") + "/")
    return dirs


def _address(value: object, where: str) -> tuple[str, int]:
    """ "host:port" or "[v6 address]:port"."""
    if not isinstance(value, str) or ":" not in value:
        raise ConfigError(f'{where}: {value!r} must be "host:port" (required)')
    host, _, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f'{where}: {value!r} must be "host:port" with a port of 1-65535')
    return host, int(port)


def _serial(table: dict[str, Any], where: str) -> int:
    serial = _get(table, "serial", int, where)
    if serial is None or not 0 < serial < 1 << 32:
        raise ConfigError(f"{where}.serial: {serial} must be between 1 and 4294967295 (required)")
    return serial


def _cert_identity(path: str, where: str) -> tuple[str, int]:
    from vscsi.link.keys import KeyMaterialError, cert_identity  # cryptography: only for links

    try:
        return cert_identity(path)
    except KeyMaterialError as e:
        raise ConfigError(f"{where}: {e}") from None


def _check_key_pair(cert: str, key: str) -> None:
    import ssl  # only for links: a config without one does not pay for it

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key)
    except (OSError, ssl.SSLError):
        raise ConfigError(f"daemon.link_key: {key} is not the key of {cert}") from None


def _remote(table: object, index: int, base: Path) -> RemoteConfig:
    where = f"remote[{index}]"
    table = _table(table, where, _REMOTE_KEYS)
    name = _name(table, where)
    host, port = _address(table.get("address"), f"{where}.address")
    serial = _serial(table, where)
    cert = _get(table, "peer_cert", str, where)
    if not cert:
        raise ConfigError(f"{where}.peer_cert: required (the peer's certificate file)")
    cert = _path(base, cert)
    _, cert_serial = _cert_identity(cert, f"{where}.peer_cert")
    if cert_serial != serial:
        raise ConfigError(
            f"{where}.serial: {serial}, but {cert} is the certificate of serial {cert_serial} "
            "(fix serial or peer_cert)"
        )
    return RemoteConfig(name, host, port, serial, cert, index)


def _link(daemon: dict[str, Any], base: Path, remotes: list[RemoteConfig]) -> LinkConfig | None:
    """This array's certificate and key, which every link needs; None when nothing links."""
    cert = _get(daemon, "link_cert", str, "daemon")
    key = _get(daemon, "link_key", str, "daemon")
    listen = daemon.get("link_listen")
    timeout = _get(daemon, "link_timeout", (int, float), "daemon")
    netns = _get(daemon, "link_netns", str, "daemon")
    if not (remotes or listen is not None or cert or key):
        return None
    if not cert or not key:
        missing = "link_key" if cert else "link_cert"
        raise ConfigError(f"daemon.{missing}: required for links (make it with `vscsi link keys`)")
    cert, key = _path(base, cert), _path(base, key)
    try:
        mode = os.stat(key).st_mode
    except OSError as e:
        raise ConfigError(f"daemon.link_key: cannot read {key} ({e.strerror})") from None
    if mode & 0o077:
        raise ConfigError(f"daemon.link_key: {key} is open to group or others (chmod 600 it)")
    name, serial = _cert_identity(cert, "daemon.link_cert")
    _check_key_pair(cert, key)
    if timeout is not None and not 0.1 <= timeout <= 600:
        raise ConfigError(f"daemon.link_timeout: {timeout} must be 0.1 to 600 seconds")
    _check_remotes(remotes, serial)
    if netns is not None:
        _check_netns(netns)
    return LinkConfig(
        cert=cert,
        key=key,
        name=name,
        serial=serial,
        listen=_address(listen, "daemon.link_listen") if listen is not None else None,
        timeout=float(timeout) if timeout is not None else DEFAULT_LINK_TIMEOUT,
        netns=netns,
    )


def _check_netns(name: str) -> None:
    try:
        path = netns.path_of(name)
    except ValueError as e:
        raise ConfigError(f"daemon.link_netns: {e}") from None
    if not path.exists():
        raise ConfigError(f"daemon.link_netns: no network namespace {name} (ip netns add {name})")


def _check_remotes(remotes: list[RemoteConfig], own_serial: int) -> None:
    """A peer is known by its name and by its serial: both unique, neither this array's."""
    names: dict[str, str] = {}
    serials: dict[int, str] = {}
    for r in remotes:
        if r.name in names:
            raise ConfigError(f"{r.where}.name: {r.name!r} is already used by {names[r.name]}")
        if r.serial == own_serial:
            raise ConfigError(f"{r.where}.serial: {r.serial} is this array's own serial")
        if r.serial in serials:
            raise ConfigError(
                f"{r.where}.serial: {r.serial} is already used by {serials[r.serial]}"
            )
        names[r.name], serials[r.serial] = r.where, r.where


def _check_unique(units: list[VolumeConfig | ShadowSetConfig]) -> None:
    """Names, backing stores and identities are unique across volumes and shadow sets.

    Stores are compared as the kernel sees them (device number, inode), so a hard link or a
    second device node of one disk is found before anything is opened."""
    names: dict[str, str] = {}
    paths: dict[object, str] = {}
    ids: dict[tuple[int, int], str] = {}
    for u in units:
        if u.name in names:
            raise ConfigError(f"{u.where}.name: {u.name!r} is already used by {names[u.name]}")
        names[u.name] = u.where
        backing = u.members if isinstance(u, ShadowSetConfig) else [u.path]
        for i, path in enumerate(backing):
            field_name = f"members[{i}]" if isinstance(u, ShadowSetConfig) else "path"
            key = store_key(path) or str(Path(path).resolve())
            if key in paths:
                raise ConfigError(
                    f"{u.where}.{field_name}: {path} is already the store of {paths[key]}"
                )
            paths[key] = u.label
        key = (u.identity.serial, u.identity.volume_id)
        if key in ids:
            raise ConfigError(
                f"{u.where}.identity.volume_id: serial {key[0]} volume {key[1]} "
                f"is already used by {ids[key]}"
            )
        ids[key] = u.where


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML config file's tables (the daemon's, the agent's, the host follower's); one-line
    ConfigError when it cannot be read or parsed."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config ({e.strerror})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML ({e})") from None


def load(path: str | Path) -> Config:
    """Read and validate a config file."""
    return parse(read_toml(path), source=str(path), base=Path(path).resolve().parent)


def open_volume(v: VolumeConfig) -> FileVolume:
    try:
        return FileVolume(
            v.name,
            v.path,
            size=v.size,
            block_size=v.block_size,
            write_cache=v.write_cache,
            create=v.create,
            follow_symlinks=v.follow_symlinks,
        )
    except StoreConfigError as e:
        raise ConfigError(f"{v.where}.{e.field}: {e}") from None


def open_volumes(config: Config) -> dict[str, FileVolume]:
    """Open every backing store, or none: on the first failure all opened ones are closed."""
    opened: dict[str, FileVolume] = {}
    try:
        for v in config.volumes:
            opened[v.name] = open_volume(v)
    except ConfigError:
        for vol in opened.values():
            vol.close()
        raise
    return opened
