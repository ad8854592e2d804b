"""The host groups in LIO's iSCSI configfs, through the real rtslib-fb, against a configfs tree
in a directory that makes what the kernel makes (Debian's 6.1: iscsi_target_configfs.c,
target_core_fabric_configfs.c) and refuses what it refuses: removing a TPG, ACL or LUN that
still holds portals, ACLs, mapped LUNs or links."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import rtslib_fb.tcm

from tests.unit.test_reservations_configfs import FakeLio, install
from vscsi.config import Chap, HostGroupConfig, PortConfig, Secret
from vscsi.hostgroup import lio
from vscsi.hostgroup import plan as p
from vscsi.tcmu import configfs

IQN = "iqn.2026-01.com.example:cl1-a"
H1, H2 = "iqn.2026-01.com.example:host1", "iqn.2026-01.com.example:host2"
PORT = PortConfig("CL1-A", IQN, (("192.0.2.10", 3260), ("2001:db8::1", 3260)))
CHAP = Chap("db", Secret("twelve-chars-secret"), "array", Secret("mutual-secret-16"))
TPG_ATTRS = {"authentication": "0", "generate_node_acls": "0", "demo_mode_write_protect": "1",
             "cache_dynamic_acls": "0"}  # fmt: skip
OWNER = "0123abcd"
TPG_DIRS = ("attrib", "param", "auth", "np", "acls", "lun")
ACL_DIRS = ("auth", "attrib", "param")


class IscsiKernel:
    """The iSCSI half of the fake kernel, hooked into a FakeLio."""

    def __init__(self, fake: FakeLio) -> None:
        self.fake = fake
        self.made, self.unmake, self.write, self.linked = (
            fake.made, fake.unmake, fake.write, fake.linked)  # fmt: skip
        fake.made, fake.unmake, fake.write, fake.linked = (  # type: ignore[method-assign]
            self.on_made, self.on_unmake, self.on_write, self.on_linked)  # fmt: skip

    @staticmethod
    def iscsi(parts: tuple[str, ...] | None) -> bool:
        return parts is not None and parts[:1] == ("iscsi",)

    def on_made(self, path: Path) -> None:
        parts = self.fake.rel(path)
        if not self.iscsi(parts):
            return self.made(path)
        assert parts is not None
        if len(parts) == 3:  # iscsi/<iqn>/tpgt_N
            for d in TPG_DIRS:
                (path / d).mkdir()
            for name, value in TPG_ATTRS.items():
                (path / "attrib" / name).write_bytes(value.encode())
            (path / "param/TargetAlias").write_bytes(b"LIO Target\n")
            (path / "enable").write_bytes(b"0\n")
        elif len(parts) == 5 and parts[3] == "acls":
            for d in ACL_DIRS:
                (path / d).mkdir()
            for name in ("userid", "password", "userid_mutual", "password_mutual"):
                (path / "auth" / name).write_bytes(b"\n")
            (path / "tag").write_bytes(b"\n")
            (path / "info").write_bytes(f"No active iSCSI Session for Initiator Endpoint: "
                                        f"{parts[4]}\n".encode())  # fmt: skip
        elif len(parts) == 6 and parts[3] == "acls":
            (path / "write_protect").write_bytes(b"0\n")
        return None

    def on_unmake(self, path: Path) -> None:
        parts = self.fake.rel(path)
        if not self.iscsi(parts) or not path.is_dir():
            return self.unmake(path)
        assert parts is not None
        users = {3: ("np", "acls", "lun"), 5: ()}.get(len(parts), ())
        busy = [c for d in users for c in (path / d).iterdir()]
        busy += [
            c for c in path.iterdir() if c.is_symlink() or c.name.startswith(("lun_", "tpgt_"))
        ]
        if len(parts) == 5 and parts[3] == "lun":  # a TPG LUN some ACL still maps
            busy += [
                m
                for m in self.fake.lio.glob(f"iscsi/{parts[1]}/{parts[2]}/acls/*/lun_*/*")
                if m.is_symlink() and os.path.realpath(m) == os.path.realpath(path)
            ]
        if busy:
            raise OSError(errno.EBUSY, f"in use: {busy[0].name}", str(path))
        for child in path.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        return None

    def on_write(self, path: Path, value: str) -> bool:
        parts = self.fake.rel(path)
        if not self.iscsi(parts):
            return self.write(path, value)
        assert parts is not None
        self.fake.writes.append(("/".join(parts), value))
        if parts[-2] == "auth" and value == "NULL":
            value = ""
        path.write_bytes(value.encode() + b"\n")
        return True

    def on_linked(self, link: Path) -> None:
        if not self.iscsi(self.fake.rel(link)):
            self.linked(link)

    def login(self, initiator: str) -> None:
        """An initiator logs in (what `info` of its ACL then says)."""
        acl = next(self.fake.lio.glob(f"iscsi/*/tpgt_1/acls/{initiator}"))
        (acl / "info").write_text(
            f"InitiatorName: {initiator}\nInitiatorAlias: host\n"
            "LIO Session ID: 3   ISID: 0x00023d000001  TSIH: 1  SessionType: Normal\n"
            "Session State: TARG_SESS_STATE_LOGGED_IN\n"
            "---------------------[iSCSI Session Values]-----------------------\n"
            "-----------------------------[iSCSI Connections]---------------------\n"
            "CID: 0  Connection State: TARG_CONN_STATE_LOGGED_IN\n"
            "   Address 192.0.2.50 TCP  StatSN: 0x1\n"
        )


@pytest.fixture
def kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[IscsiKernel]:
    fake = install(tmp_path, monkeypatch)
    kernel = IscsiKernel(fake)
    for volume in ("ldev0", "ldev1", "ldev2"):
        configfs.create_backstore(volume, 1 << 20, 512)
    yield kernel
    rtslib_fb.tcm.bs_cache.clear()


def group(name: str, initiators: tuple[str, ...], luns: dict[int, str], chap: Chap | None = None
          ) -> HostGroupConfig:  # fmt: skip
    return HostGroupConfig("CL1-A", name, initiators, luns, chap)


def sync(groups: list[HostGroupConfig], ports: tuple[PortConfig, ...] = (PORT,)) -> None:
    """What the daemon does: observe, plan, apply; then nothing is left to do."""
    want = p.wanted(ports, groups)
    lio.apply(p.plan(want, lio.observe(OWNER)), OWNER)
    assert p.plan(want, lio.observe(OWNER)) == []


def tpg(kernel: IscsiKernel) -> Path:
    return kernel.fake.lio / "iscsi" / IQN / "tpgt_1"


def test_a_port_with_host_groups_in_configfs(kernel: IscsiKernel) -> None:
    sync([group("db", (H1,), {0: "ldev0", 4: "ldev1"}, CHAP), group("web", (H2,), {0: "ldev1"},
                                                                     CHAP)])  # fmt: skip
    t = tpg(kernel)
    assert (t / "param/TargetAlias").read_text().strip() == f"vscsi:CL1-A:{OWNER}"
    assert {a: (t / "attrib" / a).read_text().strip() for a in TPG_ATTRS} == {
        "authentication": "1", "generate_node_acls": "0", "demo_mode_write_protect": "1",
        "cache_dynamic_acls": "0"}  # fmt: skip
    assert (t / "enable").read_text().strip() == "1"
    assert sorted(n.name for n in (t / "np").iterdir()) == ["192.0.2.10:3260",
                                                            "[2001:db8::1]:3260"]  # fmt: skip
    acl = t / "acls" / H1
    assert (acl / "tag").read_text().strip() == "db"
    assert (acl / "auth/userid").read_text().strip() == "db"
    assert (acl / "auth/password").read_text().strip() == "twelve-chars-secret"
    assert (acl / "auth/userid_mutual").read_text().strip() == "array"
    assert (acl / "auth/password_mutual").read_text().strip() == "mutual-secret-16"
    seen = lio.observe(OWNER)[IQN]
    assert seen.acls[H1].mapped == {0: 0, 4: 1} and seen.acls[H2].mapped == {0: 1}
    assert seen.luns == {0: "ldev0", 1: "ldev1"}


def test_mapping_a_lun_for_one_group_writes_nothing_under_another_acl(
    kernel: IscsiKernel,
) -> None:
    sync([group("db", (H1,), {0: "ldev0"}), group("web", (H2,), {0: "ldev1"})])
    kernel.fake.writes.clear()
    sync([group("db", (H1,), {0: "ldev0", 1: "ldev2"}), group("web", (H2,), {0: "ldev1"})])
    assert kernel.fake.writes and not [w for w, _ in kernel.fake.writes if H2 in w]
    (link,) = [m for m in (tpg(kernel) / "acls" / H1 / "lun_1").iterdir() if m.is_symlink()]
    assert os.path.realpath(link) == str(tpg(kernel) / "lun/lun_2")
    sync([group("db", (H1,), {0: "ldev0"}), group("web", (H2,), {0: "ldev1"})])
    assert not (tpg(kernel) / "acls" / H1 / "lun_1").exists()
    assert not (tpg(kernel) / "lun/lun_2").exists()


def test_removing_chap_clears_the_credentials(kernel: IscsiKernel) -> None:
    sync([group("db", (H1,), {0: "ldev0"}, CHAP)])
    sync([group("db", (H1,), {0: "ldev0"})])
    acl = tpg(kernel) / "acls" / H1
    assert (acl / "auth/password").read_text().strip() == ""
    assert (tpg(kernel) / "attrib/authentication").read_text().strip() == "0"


def foreign(kernel: IscsiKernel, iqn: str, alias: str | None = None) -> Path:
    """A target someone else made: targetcli (no alias of ours) or another daemon."""
    tpg = kernel.fake.lio / "iscsi" / iqn / "tpgt_1"
    for d in (tpg.parent.parent, tpg.parent, tpg):
        d.mkdir(exist_ok=True)
    if alias is not None:
        (tpg / "param/TargetAlias").write_text(alias)
    return tpg


def test_a_port_no_longer_configured_is_removed_but_foreign_targets_kept(
    kernel: IscsiKernel,
) -> None:
    other = foreign(kernel, "iqn.2003-01.org.linux-iscsi:other")
    daemon2 = foreign(kernel, "iqn.2026-01.com.example:site2", "vscsi:CL1-A:ffffffff")
    sync([group("db", (H1,), {0: "ldev0"})])
    sync([], ports=())
    assert not (kernel.fake.lio / "iscsi" / IQN).exists()
    assert other.exists() and daemon2.exists()
    assert lio.remove_ours(OWNER) == []
    assert daemon2.exists()


def test_a_port_iqn_another_daemon_uses_is_refused(kernel: IscsiKernel) -> None:
    foreign(kernel, IQN, "vscsi:CL1-A:ffffffff")
    with pytest.raises(p.PlanError, match="not made by this daemon"):
        sync([])


def test_the_owner_mark_is_the_state_directory(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").symlink_to(tmp_path / "a")
    assert lio.owner_of(str(tmp_path / "a")) == lio.owner_of(str(tmp_path / "b"))
    assert lio.owner_of(str(tmp_path / "a")) != lio.owner_of(str(tmp_path))


def test_remove_ours_and_sessions(kernel: IscsiKernel) -> None:
    sync([group("db", (H1, H2), {0: "ldev0"})])
    kernel.login(H1)
    assert lio.sessions(OWNER) == [{"port": "CL1-A", "host_group": "db", "initiator": H1,
                               "state": "LOGGED_IN", "addresses": ["192.0.2.50"]}]  # fmt: skip
    assert lio.remove_ours(OWNER) == [f"iscsi/{IQN}"]
    assert not (kernel.fake.lio / "iscsi" / IQN).exists()
    configfs.remove_all_vscsi()  # the backstores can go now
    assert not list(kernel.fake.lio.glob("core/user_*/vscsi-*"))


def test_a_failed_step_names_the_target_and_never_a_secret(kernel: IscsiKernel) -> None:
    want = p.wanted([PORT], [group("db", (H1,), {0: "ldev9"}, CHAP)])
    with pytest.raises(configfs.ConfigfsError) as e:
        lio.apply(p.plan(want, lio.observe(OWNER)), OWNER)
    assert str(e.value).startswith(f"iSCSI target {IQN}: AddLun index=0 volume=ldev9:")
    assert "twelve" not in str(e.value)
