"""Planning the iSCSI configfs changes: from what is there to what the host groups want, only
what differs is touched, and nothing vscsi did not make."""

from __future__ import annotations

import pytest

from vscsi.config import Chap, HostGroupConfig, PortConfig, Secret
from vscsi.hostgroup import plan as p

IQN = "iqn.2026-01.com.example:cl1-a"
H1, H2, H3 = (f"iqn.2026-01.com.example:host{i}" for i in (1, 2, 3))
PORT = PortConfig("CL1-A", IQN, (("192.0.2.10", 3260),))
CHAP = Chap("db", Secret("twelve-chars-secret"), "array", Secret("mutual-secret-16"))


def group(name: str, initiators: tuple[str, ...], luns: dict[int, str], chap: Chap | None = None
          ) -> HostGroupConfig:  # fmt: skip
    return HostGroupConfig("CL1-A", name, initiators, luns, chap)


def seen_after(steps: list[p.Step], seen: dict[str, p.SeenTarget]) -> dict[str, p.SeenTarget]:
    """What configfs holds once the steps ran (a model of lio.apply)."""
    for step in steps:
        s = seen.get(step.iqn)
        match step:
            case p.MakeTarget(iqn, port):
                seen[iqn] = p.SeenTarget(iqn, port)
            case p.SetAuthentication(_, on):
                s.authentication = on
            case p.AddPortal(_, a):
                s.portals.add(a)
            case p.RemovePortal(_, a):
                s.portals.remove(a)
            case p.AddLun(_, i, v):
                assert i not in s.luns
                s.luns[i] = v
            case p.RemoveLun(_, i):
                assert all(i not in a.mapped.values() for a in s.acls.values()), "LUN in use"
                del s.luns[i]
            case p.AddAcl(_, i):
                s.acls[i] = p.SeenAcl(None, {})
            case p.SetAcl(_, i, g, auth):
                s.acls[i].group, s.acls[i].auth = g, auth
            case p.RemoveAcl(_, i):
                del s.acls[i]
            case p.Map(_, i, h, x):
                assert h not in s.acls[i].mapped and x in s.luns
                s.acls[i].mapped[h] = x
            case p.Unmap(_, i, h):
                del s.acls[i].mapped[h]
            case p.RemoveTarget(iqn):
                del seen[iqn]
    return seen


def converge(groups: list[HostGroupConfig], seen: dict[str, p.SeenTarget]) -> list[p.Step]:
    """Plan, apply, and check that a second plan has nothing left to do."""
    want = p.wanted([PORT], groups)
    steps = p.plan(want, seen)
    seen_after(steps, seen)
    assert p.plan(want, seen) == []
    return steps


def test_a_new_port_gets_target_portal_luns_acls_and_maps() -> None:
    seen: dict[str, p.SeenTarget] = {}
    steps = converge([group("db", (H1, H2), {0: "ldev0", 1: "ldev1"}, CHAP)], seen)
    assert steps[:3] == [p.MakeTarget(IQN, "CL1-A"), p.SetAuthentication(IQN, True),
                         p.AddPortal(IQN, ("192.0.2.10", 3260))]  # fmt: skip
    t = seen[IQN]
    assert t.luns == {0: "ldev0", 1: "ldev1"} and t.authentication
    assert t.acls[H1].mapped == {0: 0, 1: 1} and t.acls[H1].group == "db"
    assert t.acls[H2].auth == ("db", "twelve-chars-secret", "array", "mutual-secret-16")


def test_no_host_group_no_acl_and_no_lun() -> None:
    seen: dict[str, p.SeenTarget] = {}
    converge([], seen)
    assert seen[IQN].acls == {} and seen[IQN].luns == {} and not seen[IQN].authentication


def test_mapping_one_lun_touches_only_that_host_groups_acls() -> None:
    seen: dict[str, p.SeenTarget] = {}
    db, web = group("db", (H1,), {0: "ldev0"}), group("web", (H2,), {0: "ldev1"})
    converge([db, web], seen)
    steps = converge([group("db", (H1,), {0: "ldev0", 3: "ldev2"}), web], seen)
    assert steps == [p.AddLun(IQN, 2, "ldev2"), p.Map(IQN, H1, 3, 2)]
    steps = converge([db, web], seen)
    assert steps == [p.Unmap(IQN, H1, 3), p.RemoveLun(IQN, 2)]


def test_a_volume_shared_by_two_groups_has_one_tpg_lun_kept_while_either_maps_it() -> None:
    seen: dict[str, p.SeenTarget] = {}
    converge([group("a", (H1,), {0: "ldev0"}), group("b", (H2,), {5: "ldev0"})], seen)
    assert seen[IQN].luns == {0: "ldev0"} and seen[IQN].acls[H2].mapped == {5: 0}
    steps = converge([group("a", (H1,), {}), group("b", (H2,), {5: "ldev0"})], seen)
    assert steps == [p.Unmap(IQN, H1, 0)]


def test_a_host_lun_moved_to_another_volume_is_unmapped_then_mapped() -> None:
    seen: dict[str, p.SeenTarget] = {}
    converge([group("a", (H1,), {0: "ldev0"})], seen)
    steps = converge([group("a", (H1,), {0: "ldev1"})], seen)
    assert steps == [p.AddLun(IQN, 1, "ldev1"), p.Unmap(IQN, H1, 0), p.Map(IQN, H1, 0, 1),
                     p.RemoveLun(IQN, 0)]  # fmt: skip


def test_removing_a_group_removes_its_acls_only() -> None:
    seen: dict[str, p.SeenTarget] = {}
    web = group("web", (H3,), {0: "ldev1"})
    converge([group("db", (H1, H2), {0: "ldev0"}), web], seen)
    steps = converge([web], seen)
    assert steps == [p.RemoveAcl(IQN, H1), p.RemoveAcl(IQN, H2), p.RemoveLun(IQN, 0)]


def test_moving_an_initiator_to_another_group_retags_it_and_changes_its_luns() -> None:
    seen: dict[str, p.SeenTarget] = {}
    converge([group("a", (H1,), {0: "ldev0"}), group("b", (), {0: "ldev1"})], seen)
    steps = converge([group("a", (), {0: "ldev0"}), group("b", (H1,), {0: "ldev1"})], seen)
    assert p.SetAcl(IQN, H1, "b", p.NO_AUTH) in steps
    ldev1 = next(i for i, v in seen[IQN].luns.items() if v == "ldev1")
    assert seen[IQN].acls[H1].mapped == {0: ldev1}


def test_chap_change_rewrites_credentials_and_authentication() -> None:
    seen: dict[str, p.SeenTarget] = {}
    converge([group("a", (H1,), {0: "ldev0"})], seen)
    steps = converge([group("a", (H1,), {0: "ldev0"}, CHAP)], seen)
    assert steps == [p.SetAuthentication(IQN, True), p.SetAcl(IQN, H1, "a", p.auth_of(CHAP))]
    assert "twelve" not in repr(steps)


def test_leftovers_are_adopted_and_old_ports_removed_but_foreign_targets_kept() -> None:
    seen = {
        IQN: p.SeenTarget(IQN, "CL1-A", {("192.0.2.99", 3260)}, {7: "ldev0", 8: None},
                          {H1: p.SeenAcl("db", {0: 7}), H3: p.SeenAcl("old", {1: 8})}),
        "iqn.2026-01.com.example:gone": p.SeenTarget("iqn.2026-01.com.example:gone", "CL9-Z"),
        "iqn.2003-01.org.linux-iscsi:other": p.SeenTarget("iqn.2003-01.org.linux-iscsi:other",
                                                          None),
    }  # fmt: skip
    steps = converge([group("db", (H1,), {0: "ldev0"})], seen)
    assert p.Map(IQN, H1, 0, 7) not in steps  # already mapped: untouched
    assert seen[IQN].luns == {7: "ldev0"} and seen[IQN].portals == {("192.0.2.10", 3260)}
    assert set(seen) == {IQN, "iqn.2003-01.org.linux-iscsi:other"}


def test_a_wanted_iqn_taken_by_a_foreign_target_is_refused() -> None:
    with pytest.raises(p.PlanError, match=r"^port CL1-A: iSCSI target .* not made by this daemon"):
        p.plan(p.wanted([PORT], []), {IQN: p.SeenTarget(IQN, None)})
