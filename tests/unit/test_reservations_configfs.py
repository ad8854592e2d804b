"""Persistent reservations across restarts, at the configfs level: what vscsi writes to LIO and
in which order, against `FakeLio`, a configfs tree in a directory that keeps the kernel rules
vscsi depends on (Debian's 6.1: target_core_configfs.c, tcm_loop.c, target_core_pr.c), driven
through the real rtslib-fb."""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import rtslib_fb.node
import rtslib_fb.root
import rtslib_fb.tcm

from vscsi.tcmu import configfs

KERNEL_DIRS = ("attrib", "pr", "wwn", "alua", "lun")  # made by the kernel with their parent
TCMU_ATTRS = {"hw_block_size": "512", "cmd_time_out": "30", "emulate_pr": "1", "pgr_support": "1"}


class NotReady(Exception):
    """CHECK CONDITION, NOT READY, LOGICAL UNIT COMMUNICATION FAILURE."""


class FakeLio:
    """LIO's configfs in `root` (standing for /sys/kernel/config). A mkdir of a backstore or a
    TPG makes the files the kernel would; the writes vscsi's reservations depend on follow the
    kernel: `force_pr_aptpl` and `pr/res_aptpl_metadata` are refused once the backstore is
    exported, a tcm_loop `nexus` must be dropped ("NULL") before it is named again and cannot
    be dropped while the TPG has a LUN, and linking a LUN gives back the saved registrations
    whose initiator port, target port, TPG and LUN match (as core_enable_device_list_for_node
    does). `register` plays a host's PERSISTENT RESERVE OUT REGISTER + RESERVE."""

    def __init__(self, root: Path, force_pr_aptpl: bool = True) -> None:
        self.root = Path(os.path.realpath(root))
        self.lio = self.root / "target"
        self.force_pr_aptpl = force_pr_aptpl
        self.saved: dict[str, list[dict[str, str]]] = {}  # backstore -> loaded APTPL entries
        self.live: dict[str, list[dict[str, str]]] = {}  # backstore -> registrations in force
        self.writes: list[tuple[str, str]] = []  # (path relative to target/, value), in order

    def rel(self, path: Path) -> tuple[str, ...] | None:
        try:
            return Path(os.path.abspath(path)).relative_to(self.lio).parts
        except ValueError:
            return None

    # -- what the kernel makes ----------------------------------------------------------------

    def made(self, path: Path) -> None:
        parts = self.rel(path)
        if parts is None:
            return
        if len(parts) == 3 and parts[0] == "core" and parts[1].startswith("user_"):
            for d in ("attrib", "pr", "wwn", "alua"):
                (path / d).mkdir()
            attrs = dict(TCMU_ATTRS, **({"force_pr_aptpl": "0"} if self.force_pr_aptpl else {}))
            for name, value in attrs.items():
                (path / "attrib" / name).write_bytes(value.encode())
            for name in ("res_aptpl_active", "res_aptpl_metadata"):
                (path / "pr" / name).write_bytes(b"")
            (path / "wwn/vpd_unit_serial").write_bytes(b"T10 VPD Unit Serial Number: \n")
            (path / "enable").write_bytes(b"0\n")
            (path / "info").write_bytes(b"Status: DEACTIVATED Size: 0\n")
        elif len(parts) == 3 and parts[0] == "loopback" and parts[2].startswith("tpgt_"):
            (path / "lun").mkdir()
            (path / "nexus").write_bytes(b"")
            (path / "address").write_bytes(b"7:0:1\n")

    def unmake(self, path: Path) -> None:
        """rmdir: refused while a backstore is exported; what the kernel made goes with it."""
        parts = self.rel(path)
        if parts is None or not path.is_dir():
            return
        if len(parts) == 3 and parts[0] == "core" and self.exported(path):
            raise OSError(errno.EBUSY, "backstore is exported", str(path))
        for child in path.iterdir():
            if child.is_symlink() or (child.name == "lun" and any(child.iterdir())):
                continue  # the user's (a LUN, its link): the real rmdir refuses
            if child.name in KERNEL_DIRS:
                shutil.rmtree(child)
            elif child.is_file():
                child.unlink()
        self.saved.pop(os.path.realpath(path), None)
        self.live.pop(os.path.realpath(path), None)

    # -- writes -------------------------------------------------------------------------------

    def write(self, path: Path, value: str) -> bool:
        """Apply a write to configfs; False if `path` is not in it."""
        parts = self.rel(path)
        if parts is None:
            return False
        self.writes.append(("/".join(parts), value))
        name = parts[-1]
        if name == "force_pr_aptpl":
            self.refuse_if_exported(path.parent.parent)
        elif name == "res_aptpl_metadata":
            self.refuse_if_exported(path.parent.parent)
            self.load_aptpl(path.parent.parent, value)
            return True
        elif name == "nexus":
            self.set_nexus(path, value)
            return True
        elif name == "control":
            self.control(path.parent, value)
        elif name == "enable" and len(parts) == 4:
            info = path.parent / "info"
            info.write_bytes(info.read_bytes().replace(b"DEACTIVATED", b"ACTIVATED"))
        elif name == "vpd_unit_serial":
            value = f"T10 VPD Unit Serial Number: {value.strip()}\n"
        path.write_bytes(value.encode())
        return True

    def refuse_if_exported(self, so: Path) -> None:
        if self.exported(so):
            raise OSError(errno.EINVAL, "backstore is exported", str(so))

    def control(self, so: Path, value: str) -> None:
        for item in value.split(","):
            key, _, v = item.partition("=")
            if key == "dev_size":
                (so / "info").write_bytes(f"Status: DEACTIVATED Size: {v}\n".encode())
            elif key == "hw_block_size":
                (so / "attrib/hw_block_size").write_bytes(v.encode())

    def set_nexus(self, path: Path, value: str) -> None:
        tpg = path.parent
        if value.startswith("NULL"):
            if any((tpg / "lun").iterdir()):
                raise OSError(errno.EPERM, "TPG has a LUN", str(path))
            path.write_bytes(b"")
            return
        if path.read_bytes():
            raise OSError(errno.EEXIST, "nexus exists", str(path))
        path.write_bytes(value.strip().encode() + b"\n")
        for lun in (tpg / "lun").iterdir():
            self.match(lun)

    def load_aptpl(self, so: Path, value: str) -> None:
        """target_pr_res_aptpl_metadata_store: one registration, tokens split on ',' and '\\n',
        unknown ones ignored."""
        entry = dict(t.split("=", 1) for t in re.split(r"[,\n]", value.split("\0")[0]) if "=" in t)
        if not entry.get("initiator_node") or not entry.get("target_node"):
            raise OSError(errno.EINVAL, "illegal APTPL registration", str(so))
        if int(entry.get("sa_res_key", "0")) == 0:
            raise OSError(errno.EINVAL, "illegal APTPL registration", str(so))
        self.saved.setdefault(os.path.realpath(so), []).append(entry)

    # -- LUN links ------------------------------------------------------------------------------

    def linked(self, link: Path) -> None:
        parts = self.rel(link)
        if parts is not None and len(parts) == 6 and parts[3] == "lun":
            self.writes.append(("/".join(parts[:-1]) + "/link", os.readlink(link)))
            self.match(link.parent)

    def match(self, lun: Path) -> None:
        """__core_scsi3_check_aptpl_registration for the TPG's nexus and this LUN."""
        tpg = lun.parent.parent
        nexus = (tpg / "nexus").read_text().strip()
        links = [p for p in lun.iterdir() if p.is_symlink()]
        if not nexus or not links:
            return
        so = os.path.realpath(links[0])
        n = lun.name.split("_")[1]
        key = {"initiator_node": nexus, "target_node": tpg.parent.name, "tpgt": tpg.name[5:]}
        key |= {"mapped_lun": n, "target_lun": n}
        for entry in list(self.saved.get(so, [])):
            if all(entry.get(k) == v for k, v in key.items()):
                self.saved[so].remove(entry)
                self.live.setdefault(so, []).append(entry)

    def exported(self, so: Path) -> bool:
        real = os.path.realpath(so)
        links = self.lio.glob("loopback/*/tpgt_*/lun/lun_*/*")
        return any(p.is_symlink() and os.path.realpath(p) == real for p in links)

    # -- a host ---------------------------------------------------------------------------------

    def backstore(self, volume: str) -> Path:
        return next(self.lio.glob(f"core/user_*/{configfs.PREFIX}{volume}"))

    def register(self, volume: str, key: int, reserve_type: int = 1) -> None:
        """REGISTER then RESERVE from the tcm_loop initiator of `volume`. The kernel rewrites
        `<dbroot>/pr/aptpl_<unit serial>`: as core_scsi3_update_aptpl_buf formats it with APTPL
        (forced), "No Registrations or Reservations" without; without `<dbroot>/pr` the
        REGISTER fails either way."""
        so = self.backstore(volume)
        tpg = next(self.lio.glob(f"loopback/{configfs.loop_wwn(volume)}/tpgt_1"))
        entry = {
            "initiator_fabric": "loopback",
            "initiator_node": (tpg / "nexus").read_text().strip(),
            "sa_res_key": str(key),
            "res_holder": "1",
            "res_type": f"{reserve_type:02x}",
            "res_scope": "00",
            "res_all_tg_pt": "0",
            "mapped_lun": "0",
            "target_fabric": "loopback",
            "target_node": tpg.parent.name,
            "tpgt": "1",
            "port_rtpi": "1",
            "target_lun": "0",
        }
        self.live.setdefault(str(so), []).append(entry)
        text = "No Registrations or Reservations\n"  # APTPL=0: lives as long as the backstore
        if (so / "attrib/force_pr_aptpl").read_text().strip() == "1":
            text = aptpl_text(self.live[str(so)])
        serial = (so / "wwn/vpd_unit_serial").read_text().partition(":")[2].strip()
        dbroot = Path((self.lio / "dbroot").read_text().strip())
        try:
            (dbroot / "pr" / f"aptpl_{serial}").write_bytes(text.encode() + b"\0")
        except (FileNotFoundError, NotADirectoryError):
            raise NotReady(f"REGISTER {key:#x} on {volume}: APTPL file not written") from None

    def keys(self, volume: str) -> list[int]:
        """READ KEYS."""
        return [int(e["sa_res_key"]) for e in self.live.get(str(self.backstore(volume)), [])]

    def holder(self, volume: str) -> tuple[int, int] | None:
        """READ RESERVATION: (key, type) of the holder."""
        for e in self.live.get(str(self.backstore(volume)), []):
            if e["res_holder"] == "1":
                return int(e["sa_res_key"]), int(e["res_type"])
        return None


def aptpl_text(entries: list[dict[str, str]]) -> str:
    """The saved file as core_scsi3_update_aptpl_buf writes it (the kernel adds a NUL)."""
    lines: list[str] = []
    for i, e in enumerate(entries):
        lines += [f"PR_REG_START: {i}", *(f"{k}={v}" for k, v in e.items()), f"PR_REG_END: {i}"]
    return "\n".join(lines) + "\n"


def install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **kernel: bool) -> FakeLio:
    """A FakeLio in tmp_path/config, dbroot tmp_path/var/target (not made yet), seen by rtslib
    and vscsi's configfs module in place of /sys/kernel/config."""
    fake = FakeLio(tmp_path / "config", **kernel)
    (fake.lio / "core").mkdir(parents=True)
    (fake.lio / "dbroot").write_text(f"{tmp_path}/var/target\n")
    for module in ("target_core_user", "tcm_loop"):
        (tmp_path / "sys/module" / module).mkdir(parents=True)
    monkeypatch.setattr(configfs, "CONFIGFS", fake.root)
    monkeypatch.setattr(configfs, "SYS_MODULE", tmp_path / "sys/module")
    monkeypatch.setattr(configfs, "_warned", set())
    monkeypatch.setattr(rtslib_fb.node.CFSNode, "configfs_dir", str(fake.lio))
    monkeypatch.setattr(rtslib_fb.root, "mount_configfs", lambda: None)
    monkeypatch.setattr(rtslib_fb.root.RTSRoot, "_preferred_dbroot", "/etc/target")
    monkeypatch.setattr(rtslib_fb.tcm, "lock_file", str(tmp_path / "rtslib.lock"))
    rtslib_fb.tcm.bs_cache.clear()
    mkdir, rmdir, write_text, symlink = Path.mkdir, Path.rmdir, Path.write_text, os.symlink

    def fake_mkdir(self: Path, *args: Any, **kwargs: Any) -> None:
        existed = self.is_dir()
        mkdir(self, *args, **kwargs)
        if not existed:
            fake.made(self)

    def fake_rmdir(self: Path) -> None:
        fake.unmake(self)
        rmdir(self)

    def fake_write_text(self: Path, data: str, *args: Any, **kwargs: Any) -> int:
        if fake.write(self, data):
            return len(data)
        return write_text(self, data, *args, **kwargs)

    def fake_symlink(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        symlink(src, dst, *args, **kwargs)
        fake.linked(Path(dst))

    monkeypatch.setattr(Path, "mkdir", fake_mkdir)
    monkeypatch.setattr(Path, "rmdir", fake_rmdir)
    monkeypatch.setattr(Path, "write_text", fake_write_text)
    monkeypatch.setattr(os, "symlink", fake_symlink)
    return fake


@pytest.fixture
def lio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeLio]:
    yield install(tmp_path, monkeypatch)
    rtslib_fb.tcm.bs_cache.clear()  # rtslib's index cache would name backstores of tmp_path


def serve(volume: str) -> tuple[configfs.Backstore, configfs.LoopExport]:
    """What the daemon does for a new volume exported through tcm_loop."""
    bs = configfs.create_backstore(volume, 1 << 20, 512)
    return bs, configfs.export_loop(bs)


def unserve(bs: configfs.Backstore, export: configfs.LoopExport) -> None:
    """What a cleanly stopping daemon does."""
    configfs.remove_export(export)
    configfs.remove_backstore(bs)


def attr(lio: FakeLio, volume: str, name: str) -> str:
    return (lio.backstore(volume) / "attrib" / name).read_text().strip()


def nexus(lio: FakeLio, volume: str) -> str:
    return (lio.lio / "loopback" / configfs.loop_wwn(volume) / "tpgt_1/nexus").read_text().strip()


# -- the PR directory -----------------------------------------------------------------------------


def test_start_up_makes_the_pr_directory_under_the_kernels_dbroot(
    lio: FakeLio, tmp_path: Path
) -> None:
    configfs.prepare_kernel()
    pr = tmp_path / "var/target/pr"
    assert pr.is_dir() and pr.stat().st_mode & 0o777 == 0o700
    assert rtslib_fb.root.RTSRoot._preferred_dbroot == str(tmp_path / "var/target")
    configfs.prepare_kernel()  # again: it exists
    assert pr.is_dir()


def test_without_a_dbroot_attribute_the_pr_directory_is_the_kernel_default(
    lio: FakeLio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (lio.lio / "dbroot").unlink()
    monkeypatch.setattr(configfs, "DBROOT_DEFAULT", tmp_path / "default")
    configfs.prepare_kernel()
    assert (tmp_path / "default/pr").is_dir()


def test_a_pr_directory_that_cannot_be_made_is_one_warning_and_volumes_are_still_served(
    lio: FakeLio, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As on the test VM's read-only root: the volumes work, a REGISTER fails (NOT READY)."""
    (tmp_path / "var").write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="vscsi"):
        configfs.prepare_kernel()
    assert [r.getMessage() for r in caplog.records] == [
        f"cannot create {tmp_path}/var/target/pr: Not a directory; every PERSISTENT RESERVE "
        "OUT REGISTER will fail (NOT READY) until it exists (create it, mode 0700, or before "
        f"any backstore exists write a writable directory to {lio.lio}/dbroot)"
    ]
    serve("v0")
    assert lio.exported(lio.backstore("v0"))
    with pytest.raises(NotReady):
        lio.register("v0", 0x1234)


# -- force_pr_aptpl -------------------------------------------------------------------------------


def test_a_new_backstore_forces_aptpl_before_it_is_exported(lio: FakeLio) -> None:
    configfs.prepare_kernel()
    serve("v0")
    assert attr(lio, "v0", "force_pr_aptpl") == "1"
    events = [path.rsplit("/", 2)[-2:] for path, _ in lio.writes]
    assert events.index(["attrib", "force_pr_aptpl"]) < events.index(["lun_0", "link"])


def test_the_kernel_keeps_answering_reservations(lio: FakeLio) -> None:
    """emulate_pr and pgr_support stay 1: pass-through would hand vscsi commands it cannot
    attribute to an initiator and switch off the kernel's conflict checks."""
    configfs.prepare_kernel()
    serve("v0")
    assert (attr(lio, "v0", "emulate_pr"), attr(lio, "v0", "pgr_support")) == ("1", "1")
    assert not [p for p, _ in lio.writes if p.endswith(("/emulate_pr", "/pgr_support"))]


def test_a_kernel_without_force_pr_aptpl_still_serves_and_says_so_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    lio = install(tmp_path, monkeypatch, force_pr_aptpl=False)
    configfs.prepare_kernel()
    with caplog.at_level(logging.WARNING, logger="vscsi"):
        serve("v0")
        serve("v1")
    rtslib_fb.tcm.bs_cache.clear()
    assert lio.exported(lio.backstore("v0")) and lio.exported(lio.backstore("v1"))
    assert [r.getMessage() for r in caplog.records] == [
        f"{configfs.PREFIX}v0: Cannot find attribute: force_pr_aptpl: persistent reservations "
        "of vscsi volumes will not survive a clean restart of the daemon"
    ]


# -- the tcm_loop initiator port ------------------------------------------------------------------


def test_each_export_has_its_own_initiator_port_named_before_the_lun(lio: FakeLio) -> None:
    configfs.prepare_kernel()
    serve("v0")
    serve("v1")
    assert nexus(lio, "v0") == configfs.loop_nexus("v0")
    assert re.fullmatch(r"naa\.5001405[0-9a-f]{8}1", nexus(lio, "v0"))  # SAS, LIO's OUI
    assert nexus(lio, "v1") == configfs.loop_nexus("v1") != nexus(lio, "v0")
    assert nexus(lio, "v0") != configfs.loop_wwn("v0")
    writes = [(p, v) for p, v in lio.writes if configfs.loop_wwn("v0") in p]
    nexus_writes = [v for p, v in writes if p.endswith("/nexus")]
    assert nexus_writes[1:] == ["NULL", configfs.loop_nexus("v0")]  # rtslib's random one first
    assert writes[-1][0].endswith("lun_0/link")


def test_the_initiator_port_is_the_same_after_a_clean_restart(lio: FakeLio) -> None:
    configfs.prepare_kernel()
    unserve(*serve("v0"))
    assert not list(lio.lio.glob("loopback/*"))
    serve("v0")
    assert nexus(lio, "v0") == configfs.loop_nexus("v0")


# -- saved registrations --------------------------------------------------------------------------


def test_registrations_and_the_reservation_come_back_after_a_clean_restart(
    lio: FakeLio, tmp_path: Path
) -> None:
    configfs.prepare_kernel()
    bs, export = serve("v0")
    lio.register("v0", 0x1234, reserve_type=1)
    saved = configfs.aptpl_file("v0")
    assert saved == tmp_path / f"var/target/pr/aptpl_{configfs.unit_serial('v0')}"
    assert f"initiator_node={configfs.loop_nexus('v0')}\n" in saved.read_text()
    unserve(bs, export)
    assert lio.live == {}  # the kernel freed the device: only the file is left
    serve("v0")
    assert lio.keys("v0") == [0x1234]
    assert lio.holder("v0") == (0x1234, 1)
    metadata = [p for p, _ in lio.writes if p.endswith("/pr/res_aptpl_metadata")]
    assert len(metadata) == 1  # rtslib loaded it once, while creating the backstore


def test_registrations_of_another_volume_stay_with_it(lio: FakeLio) -> None:
    configfs.prepare_kernel()
    a, b = serve("v0"), serve("v1")
    lio.register("v0", 0x1)
    unserve(*a)
    unserve(*b)
    serve("v0")
    serve("v1")
    assert (lio.keys("v0"), lio.keys("v1")) == ([0x1], [])


def test_re_attaching_after_a_kill_keeps_the_kernels_state_and_writes_nothing(
    lio: FakeLio,
) -> None:
    """A SIGKILLed daemon leaves backstore and export; the next one finds them as they are."""
    configfs.prepare_kernel()
    serve("v0")
    lio.register("v0", 0x1234)
    before = len(lio.writes)
    rtslib_fb.tcm.bs_cache.clear()  # a new process
    bs = configfs.find_backstore("v0")
    assert bs is not None
    export = configfs.find_export(bs)
    assert export is not None and export.wwn == configfs.loop_wwn("v0")
    assert lio.writes[before:] == []
    assert lio.keys("v0") == [0x1234] and nexus(lio, "v0") == configfs.loop_nexus("v0")


def test_an_empty_saved_file_is_refused_with_one_line(lio: FakeLio) -> None:
    """The kernel truncates the file before each rewrite; rtslib cannot load an empty one."""
    configfs.prepare_kernel()
    saved = configfs.aptpl_file("v0")
    saved.write_bytes(b"")
    with pytest.raises(configfs.ConfigfsError) as e:
        configfs.create_backstore("v0", 1 << 20, 512)
    assert str(e.value) == (
        f"{saved} is empty: the saved persistent reservations of v0 are lost (delete the file "
        "to serve the volume without them)"
    )
    assert configfs.find_backstore("v0") is None
    saved.unlink()
    serve("v0")
    assert lio.keys("v0") == []


def test_a_file_saying_no_registrations_restores_none(lio: FakeLio) -> None:
    configfs.prepare_kernel()
    configfs.aptpl_file("v0").write_bytes(b"No Registrations or Reservations\n\0")
    serve("v0")
    assert lio.keys("v0") == []
