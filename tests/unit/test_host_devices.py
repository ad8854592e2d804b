"""What the follower reads and runs: page 0xC0 through the fake SG_IO target of test_host_inq,
bounded reads of a hung device, mountinfo, and the tools' failures as one line."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from vscsi.cli import main
from vscsi.host import reader as reader_mod
from vscsi.host import sgio
from vscsi.host.follow import Reading
from vscsi.host.mounts import MountError, SystemMounter, mounted_at, run_tool
from vscsi.host.reader import SgReader, candidates, read_device
from vscsi.host.sgio import SgIoHdr
from vscsi.pair.states import Role, Status
from vscsi.pair.vpd import SlotInfo, build_page

from .test_host_inq import VSCSI_STD, Target, standard_inquiry, supported


@pytest.fixture
def target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Target:
    """Canned devices answering SG_IO (the fake of test_host_inq, which wants 5000 ms)."""
    t = Target(tmp_path)
    monkeypatch.setattr(sgio.fcntl, "ioctl", t.ioctl)
    return t


HORC_PVOL = SlotInfo(Role.PVOL, Status.PSUE, 100, 410012, 0x600, 7)


def tc_disk(target: Target, name: str, remote: SlotInfo, mus: dict[int, SlotInfo] | None = None,
            serial: int = 410011, ldev: int = 0x600) -> str:  # fmt: skip
    page = build_page(serial, ldev, "CL1-A", mus or {}, remote)
    return target.add(name, VSCSI_STD, {0x00: supported(0x00, 0xC0), 0xC0: page})


def test_read_device_decodes_the_horc_slot(target: Target) -> None:
    path = tc_disk(target, "sdb", HORC_PVOL)
    r = read_device(path, 5000)
    assert r == Reading(path, os.stat(path).st_rdev, (410011, 0x600), "P-VOL", "PSUE",
                        (410012, 0x600))  # fmt: skip


def test_a_shadowimage_svol_is_marked(target: Target) -> None:
    path = tc_disk(target, "sdb", SlotInfo(), {0: SlotInfo(Role.SVOL, Status.PAIR, 100, 410011, 5)})
    r = read_device(path, 5000)
    assert (r.role, r.partner, r.si_svol) == ("SMPL", None, True)


def test_devices_that_are_not_ours_have_no_identity(target: Target) -> None:
    plain = target.add("sdx", standard_inquiry("ATA", "DISK"), {})
    tape = target.add("st0", b"\x01" + VSCSI_STD[1:], {})
    assert read_device(plain, 5000) == Reading(plain, os.stat(plain).st_rdev)
    assert read_device(tape, 5000).ident is None


def test_a_failing_device_is_unreachable(target: Target, tmp_path: Path) -> None:
    dead = target.add("sdd", VSCSI_STD, {}, host_status=0x03)
    assert read_device(dead, 5000).error == "INQUIRY: host status 0x03 DID_TIME_OUT"
    assert read_device(str(tmp_path / "gone"), 5000).error == (
        "cannot stat: No such file or directory")  # fmt: skip


def test_the_short_timeout_reaches_sg_io(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []

    def ioctl(fd: int, request: int, hdr: bytearray, mutate: bool = True) -> int:
        seen.append(SgIoHdr.parse(bytes(hdr)).timeout)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(sgio.fcntl, "ioctl", ioctl)
    (tmp_path / "sdb").touch()
    r = SgReader(0.25).read([str(tmp_path / "sdb")])
    assert seen == [250] and r[0].error == "INQUIRY: SG_IO failed: Input/output error"


def test_a_hung_device_costs_one_deadline_and_is_not_asked_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    release, calls = threading.Event(), []

    def read(path: str, timeout_ms: int) -> Reading:
        calls.append(path)
        if path == "/dev/hung":
            release.wait(10)
        return Reading(path, 1, (410011, 1))

    monkeypatch.setattr(reader_mod, "read_device", read)
    monkeypatch.setattr(reader_mod, "GRACE", 0.05)
    r = SgReader(0.1)
    start = time.monotonic()
    first = r.read(["/dev/hung", "/dev/ok"])
    assert time.monotonic() - start < 1.0
    assert first[0].error == "no answer within 0.1 s" and first[1].ident == (410011, 1)
    second = r.read(["/dev/hung", "/dev/ok"])
    assert second[0].error == "an earlier INQUIRY has not returned (device hung)"
    assert calls.count("/dev/hung") == 1
    release.set()
    time.sleep(0.05)
    assert r.read(["/dev/hung"])[0].error is None


def test_candidates_are_block_devices_only(tmp_path: Path) -> None:
    (tmp_path / "sda").touch()
    assert candidates([str(tmp_path / "sd*"), str(tmp_path / "none*")]) == []
    if os.path.exists("/dev/loop0"):
        assert candidates(["/dev/loop0", "/dev/loop0"]) == ["/dev/loop0"]


def test_mounted_at_reads_the_topmost_mount(tmp_path: Path) -> None:
    (tmp_path / "mnt dir").mkdir()
    where = str(tmp_path / "mnt dir").replace(" ", "\\040")
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
        f"40 22 8:16 / {where} rw - ext4 /dev/sdb rw\n"
        f"41 40 8:32 / {where} rw - ext4 /dev/sdc rw\n"
    )
    assert mounted_at(str(tmp_path / "mnt dir"), str(info)) == os.makedev(8, 32)
    assert mounted_at(str(tmp_path), str(info)) is None


def test_tool_failures_are_one_line() -> None:
    with pytest.raises(MountError, match=r"^sh exited 32: mount: wrong fs type$"):
        run_tool(["sh", "-c", "echo detail >&2; echo 'mount: wrong fs type' >&2; exit 32"])
    with pytest.raises(MountError, match=r"^sleep did not finish within 0.2 s$"):
        run_tool(["sleep", "5"], timeout=0.2)
    with pytest.raises(MountError, match=r"^/nonexistent/tool: cannot run"):
        run_tool(["/nonexistent/tool"])
    assert run_tool(["sh", "-c", "exit 0"]) == 0


def test_fsck_corrected_errors_are_fine_worse_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsck = tmp_path / "fsck"
    fsck.write_text("#!/bin/sh\nexit $1\n")
    fsck.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert run_tool(["fsck", "1"]) == 1
    with pytest.raises(MountError, match=r"^fsck exited 4"):
        run_tool(["fsck", "4"])


def test_scan_without_devices_prints_nothing_and_changes_nothing(tmp_path: Path) -> None:
    cfg = tmp_path / "host.toml"
    cfg.write_text(f'[host]\ndevices = ["{tmp_path}/sd*"]\n[[filesystem]]\nname = "fs1"\n'
                   f'volume = "410011:0x0600"\nmountpoint = "{tmp_path}/mnt"\n')  # fmt: skip
    result = CliRunner().invoke(main, ["host", "scan", "-c", str(cfg)])
    assert result.exit_code == 0
    assert result.output == "fs1: unmounted: no device of fs1 (410011:0600) seen\n"


def test_the_kernel_looks_again_before_a_mount(tmp_path: Path) -> None:
    block = tmp_path / "class" / "block" / "sdc"
    (block / "device").mkdir(parents=True)
    (block / "device" / "rescan").write_text("")
    (block / "ro").write_text("0\n")
    m = SystemMounter(sysfs=str(tmp_path))
    m.revalidate("/dev/sdc")
    assert (block / "device" / "rescan").read_text() == "1"
    (block / "ro").write_text("1\n")  # still write protected: an S-VOL not taken over
    with pytest.raises(MountError, match=r"^/dev/sdc is write protected \(read-only to the"):
        m.revalidate("/dev/sdc")
    m.revalidate("/dev/sdc", read_only=True)
    with pytest.raises(MountError, match=r"^/dev/sdx: cannot rescan it \(No such file"):
        m.revalidate("/dev/sdx")
