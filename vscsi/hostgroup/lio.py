"""LIO's iSCSI fabric through rtslib-fb: read what is there (`observe`), carry out a plan
(`apply`), list the logged-in sessions. Every iSCSI target a daemon makes carries the TPG
parameter TargetAlias `vscsi:<port>:<owner>`, `owner` naming the daemon's state directory
(`owner_of`); a target without this daemon's mark (another daemon's, targetcli's) is only read.

Every TPG has `generate_node_acls=0` (no demo mode: an initiator in no host group sees
nothing), `demo_mode_write_protect=1` and `cache_dynamic_acls=0`, and `authentication=1` when
the port's host groups use CHAP.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from typing import Any

import rtslib_fb
from rtslib_fb.utils import RTSLibError

from vscsi.hostgroup import plan as p
from vscsi.tcmu import configfs

FABRIC = "iscsi"
MODULE = "iscsi_target_mod"
TPG_ATTRIBUTES = {"generate_node_acls": "0", "demo_mode_write_protect": "1",
                  "cache_dynamic_acls": "0"}  # fmt: skip


def prepare() -> None:
    """Load LIO's iSCSI fabric (it makes configfs's `target/iscsi`)."""
    if not (configfs.SYS_MODULE / MODULE).exists():
        run = subprocess.run(["modprobe", MODULE], capture_output=True, text=True)
        if run.returncode != 0:
            raise configfs.ConfigfsError(f"modprobe {MODULE} failed: {run.stderr.strip()}")


def _fabric() -> rtslib_fb.FabricModule:
    return rtslib_fb.FabricModule(FABRIC)


def _host(address: str) -> str:
    return address[1:-1] if address.startswith("[") else address


def _portal_host(host: str) -> str:
    """rtslib (and configfs) write an IPv6 portal in brackets."""
    return f"[{host}]" if ":" in host else host


def _volume_of(lun: rtslib_fb.LUN) -> str | None:
    """The volume a TPG LUN exports, if its backstore is one of vscsi's."""
    try:
        so = lun.storage_object
    except RTSLibError:
        return None
    if so.plugin == "user" and so.name.startswith(configfs.PREFIX):
        return so.name.removeprefix(configfs.PREFIX)
    return None


def owner_of(state_dir: str) -> str:
    """The mark of one daemon (one state directory: two daemons never share one) on its targets,
    so that daemons on one host leave each other's ports alone."""
    return hashlib.sha256(os.path.realpath(state_dir).encode()).hexdigest()[:8]


def alias(port: str, owner: str) -> str:
    return f"vscsi:{port}:{owner}"


def port_of(tpg: rtslib_fb.TPG, owner: str) -> str | None:
    """The port a TPG stands for, when this daemon made it."""
    with contextlib.suppress(RTSLibError, OSError):
        kind, _, rest = tpg.get_parameter("TargetAlias").partition(":")
        port, _, mark = rest.rpartition(":")
        if kind == "vscsi" and port and mark == owner:
            return port
    return None


def observe(owner: str) -> dict[str, p.SeenTarget]:
    """Every iSCSI target in configfs, by IQN; the owner's in detail, others by name only."""
    fabric = _fabric()
    if not fabric.exists:
        return {}
    seen: dict[str, p.SeenTarget] = {}
    try:
        for target in fabric.targets:
            tpg = next((t for t in target.tpgs if t.tag == 1), None)
            port = port_of(tpg, owner) if tpg is not None else None
            seen[target.wwn] = s = p.SeenTarget(target.wwn, port)
            if tpg is not None and port is not None:
                _observe_tpg(tpg, s)
    except (RTSLibError, OSError) as e:
        raise configfs.ConfigfsError(f"cannot read the iSCSI targets in configfs: {e}") from None
    return seen


def _observe_tpg(tpg: rtslib_fb.TPG, s: p.SeenTarget) -> None:
    s.authentication = tpg.get_attribute("authentication") == "1"
    s.portals = {(_host(n.ip_address), n.port) for n in tpg.network_portals}
    s.luns = {lun.lun: _volume_of(lun) for lun in tpg.luns}
    for acl in tpg.node_acls:
        auth = (acl.chap_userid, acl.chap_password, acl.chap_mutual_userid,
                acl.chap_mutual_password)  # fmt: skip
        mapped = {m.mapped_lun: m.tpg_lun.lun for m in acl.mapped_luns}
        s.acls[acl.node_wwn] = p.SeenAcl(acl.tag, mapped, auth)


def apply(steps: list[p.Step], owner: str) -> None:
    """Carry out the steps in order (new targets marked as the owner's); the first failure
    stops and names its object."""
    tpgs: dict[str, rtslib_fb.TPG] = {}
    for step in steps:
        try:
            _apply(step, tpgs, owner)
        except (RTSLibError, OSError) as e:
            where = f"iSCSI target {step.iqn}: {_describe(step)}"
            raise configfs.ConfigfsError(f"{where}: {e}") from None


def _describe(step: p.Step) -> str:
    """The step in words, without its CHAP secrets."""
    fields = {k: v for k, v in vars(step).items() if k not in ("iqn", "auth")}
    return f"{type(step).__name__} " + " ".join(f"{k}={v}" for k, v in fields.items())


def _tpg(iqn: str, tpgs: dict[str, rtslib_fb.TPG]) -> rtslib_fb.TPG:
    if iqn not in tpgs:
        target = rtslib_fb.Target(_fabric(), iqn, mode="lookup")
        tpgs[iqn] = rtslib_fb.TPG(target, 1, mode="lookup")
    return tpgs[iqn]


def _apply(step: p.Step, tpgs: dict[str, rtslib_fb.TPG], owner: str) -> None:
    match step:
        case p.MakeTarget(iqn, port):
            tpg = rtslib_fb.TPG(rtslib_fb.Target(_fabric(), iqn, mode="create"), 1, mode="create")
            tpg.set_parameter("TargetAlias", alias(port, owner))  # first: marks it ours
            for name, value in TPG_ATTRIBUTES.items():
                tpg.set_attribute(name, value)
            tpg.enable = True
            tpgs[iqn] = tpg
        case p.SetAuthentication(iqn, on):
            _tpg(iqn, tpgs).set_attribute("authentication", "1" if on else "0")
        case p.AddPortal(iqn, (host, port)):
            rtslib_fb.NetworkPortal(_tpg(iqn, tpgs), _portal_host(host), port, mode="create")
        case p.RemovePortal(iqn, (host, port)):
            rtslib_fb.NetworkPortal(_tpg(iqn, tpgs), _portal_host(host), port, "lookup").delete()
        case p.AddLun(iqn, index, volume):
            backstore = configfs.find_backstore(volume)
            if backstore is None:
                raise RTSLibError(f"volume {volume} has no backstore")
            rtslib_fb.LUN(_tpg(iqn, tpgs), index, backstore.so)
        case p.RemoveLun(iqn, index):
            rtslib_fb.LUN(_tpg(iqn, tpgs), index).delete()
        case p.AddAcl(iqn, initiator):
            rtslib_fb.NodeACL(_tpg(iqn, tpgs), initiator, mode="create")
        case p.SetAcl(iqn, initiator, group, auth):
            _set_acl(rtslib_fb.NodeACL(_tpg(iqn, tpgs), initiator, "lookup"), group, auth)
        case p.RemoveAcl(iqn, initiator):
            rtslib_fb.NodeACL(_tpg(iqn, tpgs), initiator, mode="lookup").delete()
        case p.Map(iqn, initiator, hlun, index):
            acl = rtslib_fb.NodeACL(_tpg(iqn, tpgs), initiator, mode="lookup")
            rtslib_fb.MappedLUN(acl, hlun, index, write_protect=False)
        case p.Unmap(iqn, initiator, hlun):
            acl = rtslib_fb.NodeACL(_tpg(iqn, tpgs), initiator, mode="lookup")
            rtslib_fb.MappedLUN(acl, hlun).delete()
        case p.RemoveTarget(iqn):
            rtslib_fb.Target(_fabric(), iqn, mode="lookup").delete()
            tpgs.pop(iqn, None)


def _set_acl(acl: rtslib_fb.NodeACL, group: str, auth: p.Auth) -> None:
    """Tag and CHAP credentials (rtslib writes an empty one as LIO's "NULL", which clears it)."""
    acl.tag = group
    user, password, mutual_user, mutual_password = auth
    acl.chap_userid, acl.chap_password = user, password
    acl.chap_mutual_userid, acl.chap_mutual_password = mutual_user, mutual_password


def remove_ours(owner: str) -> list[str]:
    """Remove every iSCSI target the owner made; what was removed."""
    removed = []
    for s in observe(owner).values():
        if s.port is not None:
            apply([p.RemoveTarget(s.iqn)], owner)
            removed.append(f"iscsi/{s.iqn}")
    return removed


def sessions(owner: str) -> list[dict[str, Any]]:
    """Who is logged in through the owner's targets: port, host group, initiator, addresses."""
    fabric = _fabric()
    out: list[dict[str, Any]] = []
    if not fabric.exists:
        return out
    try:
        for target in fabric.targets:
            for tpg in target.tpgs:
                port = port_of(tpg, owner)
                if port is None:
                    continue
                for acl in tpg.node_acls:
                    session = acl.session
                    if session is None:
                        continue
                    conns = session.get("connections", [])
                    out.append({
                        "port": port, "host_group": acl.tag, "initiator": acl.node_wwn,
                        "state": session.get("state", "?"),
                        "addresses": [c.get("address", "?") for c in conns],
                    })  # fmt: skip
    except (RTSLibError, OSError) as e:
        raise configfs.ConfigfsError(f"cannot read the iSCSI sessions: {e}") from None
    return out
