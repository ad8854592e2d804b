"""Host groups through a daemon's control socket and the CLI, on a fake configfs (see
test_hostgroup_lio): start from the config, `vscsi lun map/unmap` and `vscsi hostgroup
add/remove` applied without touching other initiators' ACLs, remembered across a restart like
pair state, and shown by `vscsi status`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.unit.test_hostgroup_lio import IscsiKernel
from tests.unit.test_reservations_configfs import install
from vscsi.cli import main
from vscsi.config import parse
from vscsi.control import ControlServer
from vscsi.daemon import Daemon, DaemonError
from vscsi.durable.committer import Committer
from vscsi.tcmu import configfs

IQN = "iqn.2026-01.com.example:cl1-a"
H1, H2, H3 = (f"iqn.2026-01.com.example:host{i}" for i in (1, 2, 3))
SECRET = "twelve-chars-secret"


def config(tmp_path: Path, **group: Any) -> dict[str, Any]:
    volumes = [
        {
            "name": f"ldev{i}",
            "path": f"v{i}.img",
            "size": "1MiB",
            "create": True,
            "export": export,
            "identity": {"volume_id": i},
        }
        for i, export in enumerate(["iscsi", ["loop", "iscsi"], "iscsi", "loop"])
    ]
    groups = [{"port": "CL1-A", "name": "db", "initiators": [H1], "luns": {"0": "ldev0"}},
              {"port": "CL1-A", "name": "web", "initiators": [H2], "luns": {"0": "ldev1"},
               **group}]  # fmt: skip
    return {
        "daemon": {"socket": str(tmp_path / "ctl.sock"), "state_dir": "state"},
        "volume": volumes,
        "port": [{"name": "CL1-A", "iqn": IQN, "portals": ["192.0.2.10:3260"]}],
        "host_group": groups,
    }  # fmt: skip


class Running:
    """A daemon started on the fake kernel: backstores as _serve makes them, then the ports."""

    def __init__(self, tmp_path: Path, cfg: dict[str, Any]) -> None:
        self.daemon = Daemon(parse(cfg, base=tmp_path))
        self.daemon.open()
        for name in self.daemon.served:
            if configfs.find_backstore(name) is None:
                configfs.create_backstore(name, 1 << 20, 512)
        self.daemon._start_iscsi()
        self.server = ControlServer(self.daemon.config.socket, self.daemon.handlers())
        self.server.start()

    def cli(self, *args: str) -> tuple[int, str]:
        r = CliRunner().invoke(main, [*args, "--socket", self.daemon.config.socket])
        return r.exit_code, r.output

    def close(self, keep: bool = True) -> None:
        """Stop; `keep` leaves configfs as a SIGKILL would (the restart adopts it)."""
        self.server.close()
        self.daemon._keep_kernel_objects = keep
        self.daemon.stop()


@pytest.fixture
def kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> IscsiKernel:
    k = IscsiKernel(install(tmp_path, monkeypatch))
    (tmp_path / "sys/module/iscsi_target_mod").mkdir()
    monkeypatch.setattr(Committer, "_instances", {})  # each daemon start reads the state anew
    return k


@pytest.fixture
def running(tmp_path: Path, kernel: IscsiKernel) -> Iterator[Running]:
    r = Running(tmp_path, config(tmp_path))
    yield r
    r.close(keep=False)


def acl(kernel: IscsiKernel, initiator: str) -> Path:
    return kernel.fake.lio / "iscsi" / IQN / "tpgt_1/acls" / initiator


def mapped(kernel: IscsiKernel, initiator: str) -> list[str]:
    return sorted(p.name for p in acl(kernel, initiator).glob("lun_*"))


def test_start_maps_the_config_and_show_prints_it(running: Running, kernel: IscsiKernel) -> None:
    assert mapped(kernel, H1) == ["lun_0"] and mapped(kernel, H2) == ["lun_0"]
    rc, out = running.cli("hostgroup", "show", "CL1-A", "db")
    assert rc == 0
    assert out.splitlines() == ["CL1-A db (no CHAP)", f"  initiator {H1}", "  LUN  VOLUME",
                                "  0    ldev0"]  # fmt: skip


def test_map_and_unmap_touch_only_that_groups_acl_and_survive_a_restart(
    running: Running, kernel: IscsiKernel, tmp_path: Path
) -> None:
    kernel.fake.writes.clear()
    rc, out = running.cli("lun", "map", "CL1-A", "db", "3", "ldev2")
    assert (rc, out) == (0, "CL1-A db: LUN 3 -> ldev2\n")
    assert mapped(kernel, H1) == ["lun_0", "lun_3"]
    assert not [w for w, _ in kernel.fake.writes if H2 in w]
    running.close()
    again = Running(tmp_path, config(tmp_path))
    try:
        assert again.daemon.hostgroups is not None
        assert again.daemon.hostgroups.groups["CL1-A", "db"].luns == {0: "ldev0", 3: "ldev2"}
        assert mapped(kernel, H1) == ["lun_0", "lun_3"]
        assert again.cli("lun", "unmap", "CL1-A", "db", "3")[0] == 0
        assert mapped(kernel, H1) == ["lun_0"]
    finally:
        again.close(keep=False)


def test_an_edit_of_the_config_after_a_run_time_change_wins(
    running: Running, kernel: IscsiKernel, tmp_path: Path
) -> None:
    running.cli("lun", "map", "CL1-A", "web", "1", "ldev2")
    running.close()
    edited = config(tmp_path, luns={"0": "ldev1", "2": "ldev0"})
    again = Running(tmp_path, edited)
    try:
        assert mapped(kernel, H2) == ["lun_0", "lun_2"]
    finally:
        again.close(keep=False)


def test_hostgroup_add_with_chap_and_remove(
    running: Running, kernel: IscsiKernel, tmp_path: Path
) -> None:
    # CHAP on a port whose host groups have none is refused: LIO enforces it per port.
    secret = tmp_path / "chap"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)
    rc, out = running.cli("hostgroup", "add", "CL1-A", "app", "--initiator", H3,
                          "--chap-user", "app", "--chap-secret-file", str(secret))  # fmt: skip
    assert rc == 1 and "every host group on a port needs CHAP" in out and SECRET not in out
    rc, out = running.cli("hostgroup", "add", "CL1-A", "app", "--initiator", H3)
    assert (rc, out) == (0, "host group app on CL1-A: added (1 initiator(s))\n")
    assert (acl(kernel, H3) / "tag").read_text().strip() == "app" and mapped(kernel, H3) == []
    rc, out = running.cli("hostgroup", "add", "CL1-A", "app2", "--initiator", H1)
    assert rc == 1 and f"{H1} is already in host group db on CL1-A" in out
    assert running.cli("hostgroup", "remove", "CL1-A", "db")[0] == 0
    assert not acl(kernel, H1).exists() and acl(kernel, H2).exists()
    running.close()
    again = Running(tmp_path, config(tmp_path))
    try:
        assert not acl(kernel, H1).exists() and acl(kernel, H3).exists()
        names = [g["name"] for g in json.loads(again.cli("hostgroup", "show", "--json")[1])]
        assert names == ["app", "web"]
    finally:
        again.close(keep=False)


def test_chap_secrets_are_applied_but_never_shown(kernel: IscsiKernel, tmp_path: Path) -> None:
    secret = tmp_path / "chap"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)
    cfg = config(tmp_path, chap_user="web", chap_secret_file="chap")
    cfg["host_group"][0] |= {"chap_user": "db", "chap_secret_file": "chap"}
    r = Running(tmp_path, cfg)
    try:
        assert (acl(kernel, H2) / "auth/password").read_text().strip() == SECRET
        rc, out = r.cli("hostgroup", "show", "--json")
        assert rc == 0 and SECRET not in out
        assert json.loads(out)[1]["chap_secret_file"] == str(secret)
        assert SECRET not in r.cli("status", "--json")[1]
        assert r.cli("lun", "map", "CL1-A", "web", "7", "ldev2")[0] == 0
        (record,) = (tmp_path / "state/hostgroups").glob("*.json")
        assert record.name == "CL1-A@web.json" and SECRET not in record.read_text()
    finally:
        r.close(keep=False)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("lun", "map", "CL1-A", "db", "0", "ldev2"), "host LUN 0 of db on CL1-A is already ldev0"),
        (("lun", "map", "CL1-A", "db", "1", "ldev3"), "volume 'ldev3' is not exported over iSCSI"),
        (("lun", "map", "CL1-A", "db", "1", "nope"), "'nope' is not a configured volume"),
        (("lun", "map", "CL1-A", "nope", "1", "ldev2"), "no host group 'nope' on port 'CL1-A'"),
        (("lun", "unmap", "CL1-A", "db", "9"), "host LUN 9 of db on CL1-A is not mapped"),
        (("hostgroup", "add", "CL9-Z", "x"), "'CL9-Z' is not a configured port"),
        (("hostgroup", "add", "CL1-A", "db"), "host group db already exists on CL1-A"),
        (("hostgroup", "add", "CL1-A", "x", "--initiator", "HOST"), "must be an iSCSI name"),
        (("hostgroup", "remove", "CL1-A", "nope"), "no host group 'nope' on port 'CL1-A'"),
    ],
)
def test_refusals_are_one_line(running: Running, args: tuple[str, ...], message: str) -> None:
    rc, out = running.cli(*args)
    assert rc == 1 and message in out and out.count("\n") == 1, out


def test_a_change_that_cannot_be_made_durable_is_taken_back_from_configfs(
    running: Running, kernel: IscsiKernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_args: object, **_kwargs: object) -> bool:
        raise OSError(28, "No space left on device")

    assert running.daemon.hostgroups is not None
    monkeypatch.setattr(running.daemon.hostgroups.committer, "save", broken)
    with pytest.raises(OSError):
        running.daemon.hostgroups.map("CL1-A", "db", 5, "ldev2")
    assert mapped(kernel, H1) == ["lun_0"]
    assert running.daemon.hostgroups.groups["CL1-A", "db"].luns == {0: "ldev0"}


def test_a_change_configfs_refuses_half_way_is_taken_back(
    running: Running, kernel: IscsiKernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rtslib_fb

    def refused(*_args: object, **_kwargs: object) -> None:
        raise rtslib_fb.RTSLibError("Cannot create MappedLUN")

    monkeypatch.setattr(rtslib_fb, "MappedLUN", refused)
    rc, out = running.cli("lun", "map", "CL1-A", "db", "5", "ldev2")
    assert rc == 1 and "Map initiator=" in out and "Cannot create MappedLUN" in out
    monkeypatch.undo()
    assert not (kernel.fake.lio / "iscsi" / IQN / "tpgt_1/lun/lun_2").exists()  # AddLun undone
    assert running.daemon.hostgroups is not None
    assert running.daemon.hostgroups.groups["CL1-A", "db"].luns == {0: "ldev0"}


def test_status_shows_ports_host_groups_and_sessions(running: Running, kernel: IscsiKernel) -> None:
    kernel.login(H2)
    rc, out = running.cli("status")
    assert rc == 0
    lines = out.splitlines()
    i = lines.index(f"port CL1-A {IQN} on 192.0.2.10:3260")
    assert lines[i + 1 :] == [
        "  host group db: 1 initiator(s), 1 LUN(s), 0 logged in",
        "  host group web: 1 initiator(s), 1 LUN(s), 1 logged in",
        f"    {H2} from 192.0.2.50 (LOGGED_IN)",
    ]
    status = json.loads(running.cli("status", "--json")[1])
    (port,) = status["ports"]
    assert port["sessions"][0]["host_group"] == "web"


def test_a_clean_stop_removes_the_target_before_the_backstores(
    running: Running, kernel: IscsiKernel
) -> None:
    running.close(keep=False)
    assert not (kernel.fake.lio / "iscsi" / IQN).exists()
    configfs.remove_all_vscsi()  # possible only with no iSCSI LUN left on them


def test_a_foreign_target_with_a_ports_iqn_stops_the_start(
    kernel: IscsiKernel, tmp_path: Path
) -> None:
    for d in ("iscsi", f"iscsi/{IQN}", f"iscsi/{IQN}/tpgt_1"):
        (kernel.fake.lio / d).mkdir(exist_ok=True)
    daemon = Daemon(parse(config(tmp_path), base=tmp_path))
    daemon.open()
    try:
        for name in daemon.served:
            configfs.create_backstore(name, 1 << 20, 512)
        with pytest.raises(DaemonError, match=r"^iSCSI: port CL1-A: iSCSI target .* not made by"):
            daemon._start_iscsi()
    finally:
        daemon.stop()
    assert (kernel.fake.lio / "iscsi" / IQN / "tpgt_1").exists()
