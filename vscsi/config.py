"""The TOML configuration: one `[[volume]]` table per emulated volume, `[[remote]]` peer arrays.

Every problem is reported as one `ConfigError` naming the field (`volume[1].path`), and is found
before anything is created: `load()` validates the whole file, `open_volumes()` opens every
backing store and closes them all again if any fails.
"""

from __future__ import annotations

import grp
import os
import re
import ssl
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vscsi.link import netns
from vscsi.scsi.identity import Identity
from vscsi.store.claim import store_key
from vscsi.store.file import FileVolume, StoreConfigError

DEFAULT_SOCKET = "/run/vscsi/vscsi.sock"
DEFAULT_STATE_DIR = "/var/lib/vscsi"
DEFAULT_LINK_TIMEOUT = 10.0  # seconds without a frame from a peer before it counts as dead
EXPORTS = ("loop", "none")
READ_POLICIES = ("balanced", "master")
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
    export: str
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
    export: str
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
    socket_group: str | None = None  # may run read-only commands over the socket
    shadow_add_paths: list[str] = field(default_factory=list)  # where `shadow add` may look
    link: LinkConfig | None = None  # set when the config has [[remote]] tables or link_listen
    remotes: list[RemoteConfig] = field(default_factory=list)
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
    "socket", "state_dir", "copy_rate", "command_timeout", "socket_group", "shadow_add_paths",
    "link_listen", "link_cert", "link_key", "link_timeout", "link_netns",
}  # fmt: skip
_REMOTE_KEYS = {"name", "address", "serial", "peer_cert"}
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
        export=_choice(table, "export", EXPORTS, where),
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
        export=_choice(table, "export", EXPORTS, where),
        identity=_identity(table, where, volumes + index),
        index=index,
        follow_symlinks=bool(_get(table, "follow_symlinks", bool, where)),
    )


def parse(data: dict[str, Any], source: str = "", base: Path | None = None) -> Config:
    """Validate a decoded TOML document."""
    base = base or Path.cwd()
    for key in data:
        if key not in ("volume", "daemon", "shadow_set", "remote"):
            raise ConfigError(f"{key}: unknown table (known: daemon, volume, shadow_set, remote)")
    daemon = _table(data.get("daemon", {}), "daemon", _DAEMON_KEYS)
    socket = _get(daemon, "socket", str, "daemon") or DEFAULT_SOCKET
    state_dir = _get(daemon, "state_dir", str, "daemon") or DEFAULT_STATE_DIR
    rate = daemon.get("copy_rate")
    timeout = _get(daemon, "command_timeout", int, "daemon")
    if timeout is not None and not 0 <= timeout <= 3600:
        raise ConfigError(f"daemon.command_timeout: {timeout} must be 0 (never) to 3600 seconds")
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
    return Config(
        volumes=volumes,
        shadow_sets=shadow_sets,
        socket=socket,
        state_dir=str(base / state_dir),
        copy_rate=parse_size(rate, "daemon.copy_rate") if rate is not None else 0,
        command_timeout=timeout,
        socket_group=_socket_group(daemon),
        shadow_add_paths=_shadow_add_paths(daemon),
        link=link,
        remotes=remotes,
        source=source,
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
            raise ConfigError(
                f"daemon.shadow_add_paths[{i}]: {d!r} must be an absolute directory"
            )
        dirs.append(os.path.normpath(d).rstrip("/") + "/")
    return dirs


def _address(value: object, where: str) -> tuple[str, int]:
    """"host:port" or "[v6 address]:port"."""
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
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key)
    except (OSError, ssl.SSLError):
        raise ConfigError(f"daemon.link_key: {key} is not the key of {cert}") from None
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


def load(path: str | Path) -> Config:
    """Read and validate a config file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config ({e.strerror})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML ({e})") from None
    return parse(data, source=str(p), base=p.resolve().parent)


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
