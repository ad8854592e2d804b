"""LIO objects in configfs, made and removed with rtslib-fb.

Each served volume is a TCMU user backstore `vscsi-<volume>` with subtype `vscsi` and cfgstring
`<volume>`, exported through a tcm_loop target whose WWN is derived from the volume name, so a
restarted daemon finds (and re-attaches to) what an earlier one made.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import rtslib_fb
import rtslib_fb.root
from rtslib_fb.utils import RTSLibError

from vscsi.tcmu.uio import uio_for_device

CONFIGFS = Path("/sys/kernel/config")
PREFIX = "vscsi-"
SUBTYPE = "vscsi"


class ConfigfsError(Exception):
    """A configfs or kernel-module operation failed; the message says which and why."""


@dataclass
class Backstore:
    """A user backstore we serve, and the uio device that carries its ring."""

    volume: str
    so: rtslib_fb.UserBackedStorageObject

    @property
    def uio_name(self) -> str:
        return uio_for_device(Path(self.so.path).parent.name, self.so.name)


@dataclass
class LoopExport:
    """The tcm_loop target that makes a backstore a local SCSI disk."""

    wwn: str
    target: rtslib_fb.Target


def prepare_kernel() -> None:
    """Load the modules and mount configfs (target_core_user must be loaded first)."""
    for module in ("target_core_user", "tcm_loop"):
        if not Path(f"/sys/module/{module}").exists():
            p = subprocess.run(["modprobe", module], capture_output=True, text=True)
            if p.returncode != 0:
                raise ConfigfsError(f"modprobe {module} failed: {p.stderr.strip()}")
    if not (CONFIGFS / "target").exists():
        p = subprocess.run(
            ["mount", "-t", "configfs", "none", str(CONFIGFS)], capture_output=True, text=True
        )
        if p.returncode != 0 and not (CONFIGFS / "target").exists():
            raise ConfigfsError(f"cannot mount configfs on {CONFIGFS}: {p.stderr.strip()}")
    # rtslib insists on moving LIO's dbroot to /etc/target, which may not exist (or be
    # read-only); vscsi saves nothing there, so keep whatever the kernel has.
    with contextlib.suppress(OSError):
        current = (CONFIGFS / "target/dbroot").read_text().strip()
        rtslib_fb.root.RTSRoot._preferred_dbroot = current


def _root() -> rtslib_fb.RTSRoot:
    try:
        return rtslib_fb.RTSRoot()
    except RTSLibError as e:
        raise ConfigfsError(f"configfs: {e}") from None


def find_backstore(volume: str) -> Backstore | None:
    """The backstore an earlier daemon made for `volume`, if it is still there."""
    for so in _root().storage_objects:
        if so.plugin == "user" and so.name == PREFIX + volume:
            return Backstore(volume, so)
    return None


def check_backstore(bs: Backstore, size: int, block_size: int) -> None:
    """Refuse to re-attach to a backstore whose geometry no longer matches the config."""
    have_bs = int(bs.so.get_attribute("hw_block_size"))
    have_size = int(bs.so.size)
    if have_bs != block_size or have_size != size:
        raise ConfigfsError(
            f"{bs.so.name} exists with size {have_size} and block size {have_bs}, config says "
            f"{size} and {block_size} (stop whatever serves it, then remove it)"
        )


def create_backstore(
    volume: str, size: int, block_size: int, cmd_time_out: int | None = None
) -> Backstore:
    """A user backstore; `cmd_time_out` (seconds, 0 = never) is how long the kernel lets a
    command wait in the ring for the daemon before failing it. It can only be set before the
    backstore is exported."""
    try:
        so = rtslib_fb.UserBackedStorageObject(
            PREFIX + volume,
            config=f"{SUBTYPE}/{volume}",
            size=size,
            wwn=unit_serial(volume),
            control=f"hw_block_size={block_size}",
        )
        if cmd_time_out is not None:
            so.set_attribute("cmd_time_out", str(cmd_time_out))
    except (RTSLibError, OSError) as e:
        raise ConfigfsError(f"cannot create backstore {PREFIX}{volume}: {e}") from None
    return Backstore(volume, so)


def unit_serial(volume: str) -> str:
    """A T10 unit serial that stays the same for a volume across daemon restarts."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"vscsi:{volume}"))


def remove_backstore(bs: Backstore) -> None:
    try:
        bs.so.delete()
    except (RTSLibError, OSError) as e:
        raise ConfigfsError(f"cannot remove backstore {bs.so.name}: {e}") from None


def loop_wwn(volume: str) -> str:
    """A stable tcm_loop WWN per volume name (NAA 5, the LIO OUI 001405)."""
    return f"naa.5001405{zlib.crc32(volume.encode()):08x}0"


def find_export(bs: Backstore) -> LoopExport | None:
    wwn = loop_wwn(bs.volume)
    for target in _root().targets:
        if target.fabric_module.name == "loopback" and target.wwn == wwn:
            return LoopExport(wwn, target)
    return None


def export_loop(bs: Backstore) -> LoopExport:
    wwn = loop_wwn(bs.volume)
    try:
        target = rtslib_fb.Target(rtslib_fb.FabricModule("loopback"), wwn)
        tpg = rtslib_fb.TPG(target, 1)
        rtslib_fb.LUN(tpg, 0, bs.so)
    except (RTSLibError, OSError) as e:
        raise ConfigfsError(f"cannot export {bs.so.name} through tcm_loop: {e}") from None
    return LoopExport(wwn, target)


def remove_export(export: LoopExport) -> None:
    try:
        export.target.delete()
    except (RTSLibError, OSError) as e:
        raise ConfigfsError(f"cannot remove loopback target {export.wwn}: {e}") from None


def scsi_address(export: LoopExport) -> str:
    """`host:channel:target` of the tcm_loop TPG (the kernel prints it in `address`)."""
    path = CONFIGFS / "target/loopback" / export.wwn / "tpgt_1/address"
    return path.read_text().strip()


def find_disk(export: LoopExport, timeout: float = 60) -> tuple[str, str]:
    """The /dev/sdX and /dev/sgN of LUN 0 of the export, once the kernel has probed it."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, ValueError, IndexError):
            dev = Path("/sys/class/scsi_device") / f"{scsi_address(export)}:0" / "device"
            sd = next((dev / "block").iterdir()).name
            sg = next((dev / "scsi_generic").iterdir()).name
            if Path(f"/dev/{sd}").exists():
                return f"/dev/{sd}", f"/dev/{sg}"
        if time.monotonic() > deadline:
            raise ConfigfsError(f"no SCSI disk appeared for {export.wwn} within {timeout:.0f}s")
        time.sleep(0.1)


def remove_all_vscsi() -> list[str]:
    """Remove every tcm_loop target and user backstore vscsi made (leftovers of killed runs);
    returns what was removed. Targets go first: a backstore with a LUN cannot be deleted."""
    root = _root()
    ours = {
        so.name for so in root.storage_objects if so.plugin == "user" and so.name.startswith(PREFIX)
    }
    removed = []
    try:
        for target in list(root.targets):
            if target.fabric_module.name != "loopback":
                continue
            luns = [lun for tpg in target.tpgs for lun in tpg.luns]
            if luns and all(lun.storage_object.name in ours for lun in luns):
                target.delete()
                removed.append(f"loopback/{target.wwn}")
        for so in list(root.storage_objects):
            if so.name in ours:
                so.delete()
                removed.append(f"user/{so.name}")
    except (RTSLibError, OSError) as e:
        raise ConfigfsError(f"cannot remove leftovers: {e}") from None
    return removed
