"""LIO objects in configfs, made and removed with rtslib-fb.

Each served volume is a TCMU user backstore `vscsi-<volume>` with subtype `vscsi` and cfgstring
`<volume>`, exported through a tcm_loop target whose WWN is derived from the volume name, so a
restarted daemon finds (and re-attaches to) what an earlier one made.

The kernel answers persistent reservations itself (docs/reservations.md). So that they survive a
clean restart, each backstore has `force_pr_aptpl=1` (the kernel saves every registration in
`<dbroot>/pr/aptpl_<unit serial>`), rtslib loads that file into a new backstore before it is
exported, and the tcm_loop initiator port of each export has a stable name, the one the saved
registrations were made through.
"""

from __future__ import annotations

import contextlib
import logging
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
SYS_MODULE = Path("/sys/module")
DBROOT_DEFAULT = Path("/var/target")  # DB_ROOT_DEFAULT of target_core_mod
PREFIX = "vscsi-"
SUBTYPE = "vscsi"
# Pages per block of the ring's data area (the kernel's default is 1). A 1 MiB command then
# takes 16 blocks, not 256: fewer bitmap searches, page lookups and iovecs per command. In the
# VM, 1 MiB writes ran 9-12% faster on 10% less CPU per MiB, 4 KiB I/O as before; a 4 KiB
# command holds a 64 KiB block, which the default data area (1 GiB) has 16,384 of.
DATA_PAGES_PER_BLOCK = 16

log = logging.getLogger("vscsi")
_warned: set[str] = set()  # what this process has already warned about


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
    """Load the modules and mount configfs (target_core_user must be loaded first), and make
    the directory where the kernel saves persistent reservations."""
    for module in ("target_core_user", "tcm_loop"):
        if not (SYS_MODULE / module).exists():
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
    # read-only); keep whatever the kernel has, it is where its APTPL files are.
    root = dbroot()
    rtslib_fb.root.RTSRoot._preferred_dbroot = str(root)
    _make_pr_dir(root / "pr")


def dbroot() -> Path:
    """LIO's dbroot (`/var/target`, or `/etc/target` if that existed when the module loaded)."""
    try:
        return Path((CONFIGFS / "target/dbroot").read_text().strip())
    except OSError:
        return DBROOT_DEFAULT


def _make_pr_dir(pr: Path) -> None:
    """The kernel rewrites `<dbroot>/pr/aptpl_<serial>` at every REGISTER, APTPL or not, but
    never creates the directory: without it, every REGISTER is made in memory and still answered
    NOT READY (LU communication failure). Volumes are served anyway (a read-only root, as in
    the test VM), so that only the hosts that use reservations are hurt, and are told."""
    try:
        pr.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        log.warning(
            "cannot create %s: %s; every PERSISTENT RESERVE OUT REGISTER will fail (NOT READY) "
            "until it exists (create it, mode 0700, or before any backstore exists write a "
            "writable directory to %s)",
            pr,
            e.strerror,
            CONFIGFS / "target/dbroot",
        )


def aptpl_file(volume: str) -> Path:
    """Where the kernel saves the persistent reservations of `volume` (keyed by unit serial)."""
    return dbroot() / "pr" / f"aptpl_{unit_serial(volume)}"


def _root() -> rtslib_fb.RTSRoot:
    try:
        return rtslib_fb.RTSRoot()
    except RTSLibError as e:
        raise ConfigfsError(f"configfs: {e}") from None


def find_backstore(volume: str) -> Backstore | None:
    """The backstore an earlier daemon made for `volume`, if it is still there. Found by its
    own directory (core/user_N/NAME): building every storage object of the system, as
    RTSRoot.storage_objects does, made attaching N volumes cost N² configfs reads."""
    name = PREFIX + volume
    for path in sorted((CONFIGFS / "target" / "core").glob(f"user_*/{name}")):
        try:
            index = int(path.parent.name.rsplit("_", 1)[1])
            return Backstore(volume, rtslib_fb.UserBackedStorageObject(name, index=index))
        except (RTSLibError, ValueError):
            continue  # gone meanwhile, or not an HBA of ours to read
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


def opt_out_of_replies(bs: Backstore) -> bool:
    """Make the kernel wait for no netlink reply about a backstore an earlier daemon made (as
    `create_backstore` does from the start); False if this kernel cannot be told."""
    try:
        bs.so.set_attribute("nl_reply_supported", "-1")
    except (RTSLibError, OSError):
        return False
    return True


def create_backstore(
    volume: str, size: int, block_size: int, cmd_time_out: int | None = None
) -> Backstore:
    """A user backstore; `cmd_time_out` (seconds, 0 = never) is how long the kernel lets a
    command wait in the ring for the daemon before failing it. It, `force_pr_aptpl` and the
    saved registrations (rtslib loads `aptpl_file` while it creates the backstore) can only be
    given to the kernel before the backstore is exported."""
    _check_aptpl_file(volume)
    try:
        so = rtslib_fb.UserBackedStorageObject(
            PREFIX + volume,
            config=f"{SUBTYPE}/{volume}",
            size=size,
            wwn=unit_serial(volume),
            # the kernel waits for no netlink reply about this device: with tcmu-runner on the
            # host the first reply (its -ENOENT for a subtype it has no handler for) would win
            control=f"hw_block_size={block_size},nl_reply_supported=-1,"
            f"data_pages_per_blk={DATA_PAGES_PER_BLOCK}",
        )
        if cmd_time_out is not None:
            so.set_attribute("cmd_time_out", str(cmd_time_out))
    except (RTSLibError, OSError) as e:
        raise ConfigfsError(f"cannot create backstore {PREFIX}{volume}: {e}") from None
    _force_aptpl(so)
    return Backstore(volume, so)


def _check_aptpl_file(volume: str) -> None:
    """Refuse a saved-reservations file rtslib cannot load: it reads an unreadable one as no
    reservations, and fails on an empty one (the kernel truncates it before each rewrite)."""
    path = aptpl_file(volume)
    try:
        text = path.read_text(errors="replace")
    except (FileNotFoundError, NotADirectoryError):
        return  # nothing saved (or nowhere to save it: see _make_pr_dir)
    except OSError as e:
        raise ConfigfsError(
            f"cannot read {path}, the saved persistent reservations of {volume}: {e.strerror}"
        ) from None
    if not text.split():
        raise ConfigfsError(
            f"{path} is empty: the saved persistent reservations of {volume} are lost (delete "
            "the file to serve the volume without them)"
        )


def _force_aptpl(so: rtslib_fb.UserBackedStorageObject) -> None:
    """Make the kernel save every registration as if the initiator had set APTPL, so that a
    clean restart keeps them as an array's controller restart would. A kernel without the
    attribute still serves the volume; it is said once, not per volume."""
    try:
        so.set_attribute("force_pr_aptpl", "1")
    except RTSLibError as e:
        if "force_pr_aptpl" not in _warned:
            _warned.add("force_pr_aptpl")
            log.warning(
                "%s: %s: persistent reservations of vscsi volumes will not survive a clean "
                "restart of the daemon",
                so.name,
                e,
            )


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


def loop_nexus(volume: str) -> str:
    """The initiator port of the tcm_loop export of `volume`: the target port's WWN ending in
    1 rather than 0. The kernel gives back saved registrations only to the initiator port
    (and target port, TPG and LUN) they were made through, so it must not change."""
    return loop_wwn(volume)[:-1] + "1"


def find_export(bs: Backstore) -> LoopExport | None:
    """The tcm_loop export an earlier daemon made for the backstore, by its own directory."""
    wwn = loop_wwn(bs.volume)
    if not (CONFIGFS / "target" / "loopback" / wwn).is_dir():
        return None
    try:
        return LoopExport(wwn, rtslib_fb.Target(rtslib_fb.FabricModule("loopback"), wwn, "lookup"))
    except RTSLibError:
        return None  # removed meanwhile


def export_loop(bs: Backstore) -> LoopExport:
    wwn = loop_wwn(bs.volume)
    try:
        target = rtslib_fb.Target(rtslib_fb.FabricModule("loopback"), wwn)
        tpg = rtslib_fb.TPG(target, 1)
        _set_nexus(tpg, loop_nexus(bs.volume))
        rtslib_fb.LUN(tpg, 0, bs.so)
    except (RTSLibError, OSError) as e:
        raise ConfigfsError(f"cannot export {bs.so.name} through tcm_loop: {e}") from None
    return LoopExport(wwn, target)


def _set_nexus(tpg: rtslib_fb.TPG, name: str) -> None:
    """rtslib gives a new TPG a random initiator port; "NULL" drops it, which tcm_loop allows
    only while the TPG has no LUN, and the port can then be named."""
    if tpg.nexus != name:
        nexus = Path(tpg.path) / "nexus"
        nexus.write_text("NULL")
        nexus.write_text(name)


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
