"""What must change in LIO's iSCSI configfs to match the host groups: a pure function from what
is wanted and what is there to an ordered list of steps, so it can be tested without a kernel.

One LIO iSCSI target per `[[port]]`, TPG 1 (the port's only portal group), a TPG LUN per volume
mapped on that port, and per initiator of a host group a NodeACL whose MappedLUNs are the host
group's host LUNs; the ACL's `tag` names its host group. Only what differs is changed: an ACL
that is already right is not written to, so the sessions of other initiators never notice.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from vscsi.config import Chap, HostGroupConfig, PortConfig

NO_AUTH = ("", "", "", "")

Auth = tuple[str, str, str, str]  # userid, password, mutual userid, mutual password


class PlanError(Exception):
    """The wanted configuration cannot be applied; the message says which object and why."""


def auth_of(chap: Chap | None) -> Auth:
    if chap is None:
        return NO_AUTH
    return (chap.user, str(chap.secret), chap.mutual_user or "", str(chap.mutual_secret or ""))


@dataclass(frozen=True)
class WantAcl:
    group: str
    luns: dict[int, str]  # host LUN -> volume
    auth: Auth = field(repr=False)


@dataclass(frozen=True)
class WantTarget:
    port: str
    iqn: str
    portals: frozenset[tuple[str, int]]
    authentication: bool
    acls: dict[str, WantAcl]  # by initiator name


@dataclass
class SeenAcl:
    group: str | None
    mapped: dict[int, int]  # host LUN -> TPG LUN index
    auth: Auth = field(repr=False, default=NO_AUTH)


@dataclass
class SeenTarget:
    """An iSCSI target as configfs has it. `port` is None for one this daemon did not make."""

    iqn: str
    port: str | None
    portals: set[tuple[str, int]] = field(default_factory=set)
    luns: dict[int, str | None] = field(default_factory=dict)  # TPG LUN -> volume (None: foreign)
    acls: dict[str, SeenAcl] = field(default_factory=dict)
    authentication: bool = False


# -- steps ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MakeTarget:
    iqn: str
    port: str


@dataclass(frozen=True)
class SetAuthentication:
    iqn: str
    on: bool


@dataclass(frozen=True)
class AddPortal:
    iqn: str
    address: tuple[str, int]


@dataclass(frozen=True)
class RemovePortal:
    iqn: str
    address: tuple[str, int]


@dataclass(frozen=True)
class AddLun:
    iqn: str
    index: int
    volume: str


@dataclass(frozen=True)
class RemoveLun:
    iqn: str
    index: int


@dataclass(frozen=True)
class AddAcl:
    iqn: str
    initiator: str


@dataclass(frozen=True)
class SetAcl:
    """The ACL's host group tag and CHAP credentials (written only when they differ)."""

    iqn: str
    initiator: str
    group: str
    auth: Auth = field(repr=False)


@dataclass(frozen=True)
class RemoveAcl:
    iqn: str
    initiator: str


@dataclass(frozen=True)
class Map:
    iqn: str
    initiator: str
    hlun: int
    index: int


@dataclass(frozen=True)
class Unmap:
    iqn: str
    initiator: str
    hlun: int


@dataclass(frozen=True)
class RemoveTarget:
    iqn: str


Step = (
    MakeTarget | SetAuthentication | AddPortal | RemovePortal | AddLun | RemoveLun | AddAcl
    | SetAcl | RemoveAcl | Map | Unmap | RemoveTarget
)  # fmt: skip


# -- planning -------------------------------------------------------------------------------------


def wanted(ports: Iterable[PortConfig], groups: Iterable[HostGroupConfig]) -> list[WantTarget]:
    """The iSCSI targets the ports and host groups call for."""
    acls: dict[str, dict[str, WantAcl]] = {}
    auth: dict[str, bool] = {}
    for g in groups:
        auth[g.port] = auth.get(g.port, False) or g.chap is not None
        for initiator in g.initiators:
            acls.setdefault(g.port, {})[initiator] = WantAcl(g.name, dict(g.luns), auth_of(g.chap))
    return [
        WantTarget(p.name, p.iqn, frozenset(p.portals), auth.get(p.name, False),
                   acls.get(p.name, {}))
        for p in ports
    ]  # fmt: skip


def plan(want: list[WantTarget], seen: dict[str, SeenTarget]) -> list[Step]:
    """The steps from `seen` (every iSCSI target in configfs, by IQN) to `want`: additions
    first, so that a host LUN moved to another volume is unmapped and mapped in one pass, then
    removals; this daemon's targets no longer wanted go last. A target it did not make is never
    touched, and one with a wanted IQN is an error."""
    steps: list[Step] = []
    for w in want:
        s = seen.get(w.iqn)
        if s is not None and s.port is None:
            raise PlanError(
                f"port {w.port}: iSCSI target {w.iqn} exists and was not made by this daemon "
                "(remove it, or give the port another iqn)"
            )
        steps += _target(w, s or SeenTarget(w.iqn, w.port), new=s is None)
    names = {w.iqn for w in want}
    steps += [RemoveTarget(s.iqn) for s in seen.values() if s.port and s.iqn not in names]
    return steps


def _target(w: WantTarget, s: SeenTarget, new: bool) -> list[Step]:
    steps: list[Step] = [MakeTarget(w.iqn, w.port)] if new else []
    if new or s.authentication != w.authentication:
        steps.append(SetAuthentication(w.iqn, w.authentication))
    steps += [AddPortal(w.iqn, a) for a in sorted(w.portals - s.portals)]
    index = _lun_indexes(w, s)
    steps += [AddLun(w.iqn, i, v) for v, i in sorted(index.items()) if s.luns.get(i) != v]
    removals: list[Step] = []
    for initiator, acl in sorted(w.acls.items()):
        have = s.acls.get(initiator)
        if have is None:
            steps.append(AddAcl(w.iqn, initiator))
        if have is None or have.group != acl.group or have.auth != acl.auth:
            steps.append(SetAcl(w.iqn, initiator, acl.group, acl.auth))
        mapped = have.mapped if have is not None else {}
        for hlun, volume in sorted(acl.luns.items()):
            if mapped.get(hlun) != index[volume]:
                if hlun in mapped:
                    steps.append(Unmap(w.iqn, initiator, hlun))
                steps.append(Map(w.iqn, initiator, hlun, index[volume]))
        removals += [Unmap(w.iqn, initiator, h) for h in sorted(set(mapped) - set(acl.luns))]
    removals += [RemoveAcl(w.iqn, i) for i in sorted(set(s.acls) - set(w.acls))]
    used = set(index.values())
    removals += [RemoveLun(w.iqn, i) for i in sorted(s.luns) if i not in used]
    removals += [RemovePortal(w.iqn, a) for a in sorted(s.portals - w.portals)]
    return steps + removals


def _lun_indexes(w: WantTarget, s: SeenTarget) -> dict[str, int]:
    """The TPG LUN of each volume mapped on the port: the one it already has, else the lowest
    free index (a foreign LUN's index is never reused)."""
    volumes = sorted({v for acl in w.acls.values() for v in acl.luns.values()})
    index = {v: i for i, v in sorted(s.luns.items()) if v in volumes}
    taken = set(s.luns)
    free = (i for i in range(1 << 16) if i not in taken)
    for v in volumes:
        if v not in index:
            index[v] = next(free)
    return index
