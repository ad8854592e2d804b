"""Host groups at run time: the config's, changed by `vscsi hostgroup add/remove` and `vscsi lun
map/unmap`, applied to configfs and remembered in the state directory like pair records.

Each host group is one durable record (`hostgroups/<port>@<name>.json`) holding the host group
as a `[[host_group]]` table (secret *file names*, never secrets) and `base`, a digest of the
config table it was changed from (None for a group made at run time). On start a record wins
over the config only while the config still says what it said when the record was made: an
operator who edits the config's host group afterwards means the edit, and the record is dropped
(with a warning). A removed host group is a record with `removed: true`.

Every change is applied to configfs first, then made durable; if either fails, configfs is put
back, so what survives a restart is what the host saw acknowledged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vscsi.config import (
    MAX_HLUN,
    Config,
    ConfigError,
    HostGroupConfig,
    check_host_groups,
    check_mappable,
    host_group,
)
from vscsi.control import Command, ControlError
from vscsi.durable.committer import Committer

KIND = "hostgroups"
log = logging.getLogger("vscsi")

Apply = Callable[[list[HostGroupConfig]], None]


class HostGroupError(Exception):
    """A host group change the daemon refused; one line naming the host group."""


def table_of(g: HostGroupConfig) -> dict[str, Any]:
    """A host group as its `[[host_group]]` table (no secrets), which `host_group()` reads."""
    table: dict[str, Any] = {"port": g.port, "name": g.name, "initiators": list(g.initiators),
                             "luns": {str(h): v for h, v in sorted(g.luns.items())}}  # fmt: skip
    if g.chap is not None:
        table |= {"chap_user": g.chap.user, "chap_secret_file": g.chap.secret_file}
        if g.chap.mutual_user is not None:
            table |= {"mutual_user": g.chap.mutual_user,
                      "mutual_secret_file": g.chap.mutual_secret_file}  # fmt: skip
    return table


def digest(g: HostGroupConfig) -> str:
    return hashlib.sha256(json.dumps(table_of(g), sort_keys=True).encode()).hexdigest()


def _key(port: str, name: str) -> str:
    return f"{port}@{name}"


class HostGroups:
    """The host groups the daemon serves; every change goes through `apply` (configfs)."""

    def __init__(self, config: Config, committer: Committer, apply: Apply) -> None:
        self.config = config
        self.committer = committer
        self.apply = apply
        self._lock = threading.Lock()
        self._base = {(g.port, g.name): digest(g) for g in config.host_groups}
        self.groups = self._load()

    # -- start ----------------------------------------------------------------------------------

    def _load(self) -> dict[tuple[str, str], HostGroupConfig]:
        groups = {(g.port, g.name): g for g in self.config.host_groups}
        for key, record in self.committer.items(KIND).items():
            port, name = record["table"]["port"], record["table"]["name"]
            if port not in {p.name for p in self.config.ports}:
                log.warning("host group %s: port %s is no longer configured; forgotten", name, port)
                self.committer.delete(KIND, key)
            elif record["base"] != self._base.get((port, name)):
                log.warning(
                    "host group %s of %s: the config changed since `vscsi hostgroup` or "
                    "`vscsi lun` changed it; the config's version is served",
                    name,
                    port,
                )
                self.committer.delete(KIND, key)
            elif record["removed"]:
                groups.pop((port, name), None)
            else:
                groups[port, name] = self._parse(record["table"], f"state {KIND}/{key}")
        try:
            check_host_groups(list(groups.values()))
        except ConfigError as e:
            raise HostGroupError(f"host groups in the state directory: {e}") from None
        return groups

    def _parse(self, table: dict[str, Any], where: str) -> HostGroupConfig:
        try:
            return host_group(table, where, Path("/"), self.config.ports, self._units())
        except ConfigError as e:
            raise HostGroupError(str(e)) from None

    def _units(self) -> list[Any]:
        return [*self.config.volumes, *self.config.shadow_sets]

    def start(self) -> None:
        """Make configfs what the host groups say (adopting what an earlier daemon made)."""
        with self._lock:
            self.apply(list(self.groups.values()))

    # -- changes --------------------------------------------------------------------------------

    def add(self, table: dict[str, Any]) -> HostGroupConfig:
        """A new host group; `table` is a `[[host_group]]` table (secret files absolute)."""
        with self._lock:
            g = self._parse(table, "hostgroup add")
            if (g.port, g.name) in self.groups:
                raise HostGroupError(f"host group {g.name} already exists on {g.port}")
            self._change(g.port, g.name, g)
            return g

    def remove(self, port: str, name: str) -> None:
        with self._lock:
            self._get(port, name)
            self._change(port, name, None)

    def map(self, port: str, name: str, hlun: int, volume: str) -> None:
        """Host LUN `hlun` of the host group is `volume`; the kernel tells the group's
        initiators REPORTED LUNS DATA HAS CHANGED (docs/host-groups.md)."""
        with self._lock:
            g = self._get(port, name)
            if not 0 <= hlun <= MAX_HLUN:
                raise HostGroupError(f"host LUN {hlun} must be 0 to {MAX_HLUN}")
            if hlun in g.luns:
                raise HostGroupError(f"host LUN {hlun} of {name} on {port} is already "
                                     f"{g.luns[hlun]} (unmap it first)")  # fmt: skip
            try:
                check_mappable(volume, self._units(), f"lun map {volume}")
            except ConfigError as e:
                raise HostGroupError(str(e)) from None
            self._change(port, name, self._with_luns(g, {**g.luns, hlun: volume}))

    def unmap(self, port: str, name: str, hlun: int) -> None:
        with self._lock:
            g = self._get(port, name)
            if hlun not in g.luns:
                raise HostGroupError(f"host LUN {hlun} of {name} on {port} is not mapped")
            luns = {h: v for h, v in g.luns.items() if h != hlun}
            self._change(port, name, self._with_luns(g, luns))

    @staticmethod
    def _with_luns(g: HostGroupConfig, luns: dict[int, str]) -> HostGroupConfig:
        return HostGroupConfig(g.port, g.name, g.initiators, luns, g.chap, g.where)

    def _get(self, port: str, name: str) -> HostGroupConfig:
        try:
            return self.groups[port, name]
        except KeyError:
            known = ", ".join(n for p, n in self.groups if p == port) or "none"
            raise HostGroupError(
                f"no host group {name!r} on port {port!r} (known: {known})"
            ) from None

    def _change(self, port: str, name: str, g: HostGroupConfig | None) -> None:
        """Apply to configfs, then make durable; configfs is put back if that fails."""
        old = dict(self.groups)
        new = dict(old)
        if g is None:
            del new[port, name]
        else:
            new[port, name] = g
        try:
            check_host_groups(list(new.values()))
        except ConfigError as e:
            raise HostGroupError(str(e)) from None
        record = {"base": self._base.get((port, name)), "removed": g is None,
                  "table": table_of(g if g is not None else old[port, name])}  # fmt: skip
        try:
            self.apply(list(new.values()))
            self.committer.save(KIND, _key(port, name), record, create=True)
        except BaseException:
            self._restore(list(old.values()))
            raise
        self.groups = new

    def _restore(self, groups: list[HostGroupConfig]) -> None:
        """Put configfs back after a change failed half-way; the change's error is the one
        reported, this one only logged."""
        try:
            self.apply(groups)
        except Exception as e:  # the caller re-raises the first failure
            log.error("host groups: configfs could not be put back: %s", e)

    # -- reading --------------------------------------------------------------------------------

    def show(self, port: str | None = None, name: str | None = None) -> list[dict[str, Any]]:
        """The host groups as tables (CHAP users and secret files, never secrets)."""
        out = []
        for (p, n), g in sorted(self.groups.items()):
            if (port is None or p == port) and (name is None or n == name):
                out.append(table_of(g))
        if name is not None and not out:
            self._get(port or "", name)
        return out

    def status(self, sessions: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Each port, its host groups, and who is logged in through it (`sessions` as
        lio.sessions reports them)."""
        ports = []
        for p in self.config.ports:
            mine = [g for (port, _), g in sorted(self.groups.items()) if port == p.name]
            groups = [{"name": g.name, "initiators": list(g.initiators), "luns": len(g.luns),
                       "chap": g.chap is not None} for g in mine]  # fmt: skip
            ports.append({
                "name": p.name, "iqn": p.iqn,
                "portals": [f"[{h}]:{n}" if ":" in h else f"{h}:{n}" for h, n in p.portals],
                "host_groups": groups,
                "sessions": [s for s in sessions if s["port"] == p.name],
            })  # fmt: skip
        return ports


def commands(groups: HostGroups, errors: tuple[type[Exception], ...]) -> dict[str, Command]:
    """The control commands of host groups and LUN paths; `errors` are refusals to report."""

    def handler(op: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], Any]:
        def handle(req: dict[str, Any]) -> Any:
            try:
                return op(req)
            except (HostGroupError, *errors) as e:
                raise ControlError(str(e)) from None

        return handle

    def add(r: dict[str, Any]) -> dict[str, Any]:
        initiators = [i for i in r.get("initiators", "").split(",") if i]
        table = {k: v for k, v in r.items() if k != "initiators"} | {"initiators": initiators}
        return table_of(groups.add(table))

    group = {"port": str, "name": str}
    chap = {k: str for k in ("chap_user", "chap_secret_file", "mutual_user",
                             "mutual_secret_file")}  # fmt: skip
    return {
        "hostgroup_show": Command(handler(lambda r: groups.show(r.get("port"), r.get("name"))),
                                  optional=group, read_only=True),
        "hostgroup_add": Command(handler(add), group, {"initiators": str, **chap}),
        "hostgroup_remove": Command(handler(lambda r: groups.remove(r["port"], r["name"])),
                                    group),
        "lun_map": Command(handler(lambda r: groups.map(r["port"], r["name"], r["lun"],
                                                        r["volume"])),
                           {**group, "lun": int, "volume": str}),
        "lun_unmap": Command(handler(lambda r: groups.unmap(r["port"], r["name"], r["lun"])),
                             {**group, "lun": int}),
    }  # fmt: skip
