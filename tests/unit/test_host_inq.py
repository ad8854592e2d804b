"""`vscsi inq`: the sg_io_hdr declaration, sense decoding, and what users and udev read.

A fake SG_IO ioctl plays the target: it reads the request header our code built, answers
from canned INQUIRY data into the buffers the header points at, and writes status back —
so everything above `fcntl.ioctl` runs as it does against a real disk.
"""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from vscsi.host import sgio
from vscsi.host.inq import inq, probe, render_export, render_line
from vscsi.host.sgio import Sense, SgIoHdr, decode_sense
from vscsi.pair.states import Role, Status
from vscsi.pair.vpd import SlotInfo, build_page
from vscsi.scsi import sense as sn

KERNEL_OFFSETS = {
    "interface_id": 0,
    "dxfer_direction": 4,
    "cmd_len": 8,
    "mx_sb_len": 9,
    "iovec_count": 10,
    "dxfer_len": 12,
    "dxferp": 16,
    "cmdp": 24,
    "sbp": 32,
    "timeout": 40,
    "flags": 44,
    "pack_id": 48,
    "usr_ptr": 56,
    "status": 64,
    "masked_status": 65,
    "msg_status": 66,
    "sb_len_wr": 67,
    "host_status": 68,
    "driver_status": 70,
    "resid": 72,
    "duration": 76,
    "info": 80,
}


def standard_inquiry(vendor: str, product: str, revision: str = "0100") -> bytes:
    data = bytearray(36)
    data[4] = 31
    data[8:36] = f"{vendor:<8}{product:<16}{revision:<4}".encode()
    return bytes(data)


def supported(*pages: int) -> bytes:
    return bytes([0, 0, 0, len(pages), *pages])


class Target:
    """Canned devices by path: INQUIRY answers, or a fixed failure for every command."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.devices: dict[str, dict[str, Any]] = {}

    def add(self, name: str, std: bytes, pages: dict[int, bytes], **fail: int) -> str:
        path = self.tmp_path / name
        path.touch()
        self.devices[str(path)] = {"std": std, "pages": pages, "fail": fail}
        return str(path)

    def ioctl(self, fd: int, request: int, hdr: bytearray, mutate: bool = True) -> int:
        assert request == sgio.SG_IO and mutate
        req = SgIoHdr.parse(bytes(hdr))
        assert (req.interface_id, req.dxfer_direction, req.timeout) == (ord("S"), -3, 5000)
        dev = self.devices[os.readlink(f"/proc/self/fd/{fd}")]
        cdb = ctypes.string_at(req.cmdp, req.cmd_len)
        assert cdb[0] == 0x12 and int.from_bytes(cdb[3:5], "big") == req.dxfer_len
        out = {"status": 0, "host_status": 0, "driver_status": 0, "resid": 0, "info": 0}
        data, sense = self.answer(dev, cdb)
        if dev["fail"]:
            out.update(dev["fail"], info=1)
        elif sense:
            ctypes.memmove(req.sbp, sense, len(sense))
            out.update(status=2, driver_status=0x08, sb_len_wr=len(sense), info=1)
        else:
            data = data[: req.dxfer_len]
            ctypes.memmove(req.dxferp, data, len(data))
            out["resid"] = req.dxfer_len - len(data)
        hdr[:] = SgIoHdr.build({**req, **out})
        return 0

    @staticmethod
    def answer(dev: dict[str, Any], cdb: bytes) -> tuple[bytes, bytes]:
        if not cdb[1] & 1:
            return dev["std"], b""
        if cdb[2] in dev["pages"]:
            return dev["pages"][cdb[2]], b""
        return b"", sn.build_sense(sn.ILLEGAL_REQUEST, sn.INVALID_FIELD_IN_CDB)


@pytest.fixture
def target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Target:
    t = Target(tmp_path)
    monkeypatch.setattr(sgio.fcntl, "ioctl", t.ioctl)
    return t


PVOL = SlotInfo(Role.PVOL, Status.PAIR, 100, 410001, 2, 3)
VSCSI_STD = standard_inquiry("VSCSI", "VOLUME")


def vscsi_disk(target: Target, name: str, mus: dict[int, SlotInfo], volume_id: int = 1) -> str:
    page = build_page(410001, volume_id, "CL1-A", mus)
    return target.add(name, VSCSI_STD, {0x00: supported(0x00, 0x80, 0x83, 0xC0), 0xC0: page})


def test_sg_io_hdr_matches_the_kernel_layout() -> None:
    assert SgIoHdr.sizeof() == 88
    offsets, at = {}, 0
    for sub in SgIoHdr.subcons:
        if sub.name:
            offsets[sub.name] = at
        at += sub.sizeof()
    assert offsets == KERNEL_OFFSETS


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (sn.build_sense(sn.ILLEGAL_REQUEST, sn.INVALID_FIELD_IN_CDB), Sense(0x5, 0x24, 0x00)),
        (sn.build_sense(sn.NOT_READY, (0x04, 0x03), descriptor=True), Sense(0x2, 0x04, 0x03)),
        (bytes([0xF1, 0, 0x03, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x11, 0x00]), Sense(0x3, 0x11, 0)),
        (bytes([0x73, 0x07, 0x27, 0x00, 0, 0, 0, 0]), Sense(0x7, 0x27, 0x00)),
        (bytes([0x70, 0, 0x06]), Sense(0x6, 0, 0)),
        (b"", None),
        (bytes([0x7F, 0, 0, 0]), None),
    ],
)
def test_decode_sense(data: bytes, expected: Sense | None) -> None:
    assert decode_sense(data) == expected


def test_sense_text() -> None:
    assert str(Sense(0x5, 0x24, 0x00)) == "ILLEGAL REQUEST 24/00 INVALID FIELD IN CDB"
    assert str(Sense(0x9, 0x80, 0x01)) == "SENSE KEY 0x9 80/01"


def test_line_pvol(target: Target) -> None:
    dev = vscsi_disk(target, "sdb", {0: PVOL})
    assert render_line(probe(dev)) == (
        f"{dev} -> [vscsi] CL1-A Ser = 410001 LDEV = 0x0001 [VSCSI   ] [VOLUME          ] "
        "HORC = SMPL HOMRCF[MU#0 = P-VOL MU#1 = SMPL MU#2 = SMPL] STATUS[MU#0 = PAIR]"
    )


def test_line_simplex_has_no_status(target: Target) -> None:
    dev = vscsi_disk(target, "sdb", {}, volume_id=0x1AB)
    assert render_line(probe(dev)) == (
        f"{dev} -> [vscsi] CL1-A Ser = 410001 LDEV = 0x01AB [VSCSI   ] [VOLUME          ] "
        "HORC = SMPL HOMRCF[MU#0 = SMPL MU#1 = SMPL MU#2 = SMPL]"
    )


def test_line_copy_shows_progress(target: Target) -> None:
    copying = SlotInfo(Role.PVOL, Status.COPY, 45, 410001, 3, 1)
    split = SlotInfo(Role.PVOL, Status.PSUS, 97, 410001, 4, 5, split_read_only=True)
    dev = vscsi_disk(target, "sdb", {0: copying, 2: split})
    assert render_line(probe(dev)).endswith(
        "HOMRCF[MU#0 = P-VOL MU#1 = SMPL MU#2 = P-VOL] STATUS[MU#0 = COPY 45% MU#2 = PSUS]"
    )


def test_json_decodes_every_field(target: Target) -> None:
    svol = SlotInfo(Role.SVOL, Status.PSUS, 100, 410001, 1, 9, split_read_only=True)
    dev = vscsi_disk(target, "sdc", {1: svol}, volume_id=2)
    result = CliRunner().invoke(inq, ["--json", dev])
    assert result.exit_code == 0
    [info] = json.loads(result.output)
    assert info["device"] == dev and info["vscsi"] is True
    assert (info["vendor"], info["product"], info["revision"]) == ("VSCSI", "VOLUME", "0100")
    assert info["peripheral_type"] == 0 and info["vpd_pages"] == [0x00, 0x80, 0x83, 0xC0]
    assert (info["version"], info["serial"], info["volume_id"], info["ldev"], info["port"]) == (
        1, 410001, 2, "0002", "CL1-A",
    )  # fmt: skip
    assert info["remote"] == {
        "kind": "remote", "mu": 0, "role": "SMPL", "status": "SMPL", "progress": 0, "flags": 0,
        "split_read_only": False, "fenced": False, "partner_serial": 0, "partner_volume_id": 0,
        "generation": 0,
    }  # fmt: skip
    assert info["mu"][1] == {
        "kind": "local", "mu": 1, "role": "S-VOL", "status": "PSUS", "progress": 100, "flags": 1,
        "split_read_only": True, "fenced": False, "partner_serial": 410001,
        "partner_volume_id": 1, "generation": 9,
    }  # fmt: skip
    assert [s["role"] for s in info["mu"]] == ["SMPL", "S-VOL", "SMPL"]


def test_export(target: Target) -> None:
    dev = vscsi_disk(target, "sdb", {0: PVOL, 2: SlotInfo(Role.PVOL, Status.COPY, 10, 1, 5, 7)})
    result = CliRunner().invoke(inq, ["--export", dev])
    assert result.exit_code == 0
    assert result.output.splitlines() == [
        "VSCSI_SERIAL=410001",
        "VSCSI_VOLUME_ID=1",
        "VSCSI_LDEV=0001",
        "VSCSI_PORT=CL1-A",
        "VSCSI_ROLE=P-VOL",
        "VSCSI_HORC=SMPL",
        "VSCSI_MU0_ROLE=P-VOL",
        "VSCSI_MU0_STATUS=PAIR",
        "VSCSI_MU1_ROLE=SMPL",
        "VSCSI_MU1_STATUS=SMPL",
        "VSCSI_MU2_ROLE=P-VOL",
        "VSCSI_MU2_STATUS=COPY",
        "VSCSI_GENERATION=7",
    ]


def test_export_role_and_unsafe_values(target: Target) -> None:
    page = build_page(7, 0x10, "CL 1/A", {1: SlotInfo(Role.SVOL, Status.PAIR)})
    dev = target.add("sdd", VSCSI_STD, {0x00: supported(0xC0), 0xC0: page})
    lines = render_export(probe(dev))
    assert "VSCSI_PORT=CL_1_A" in lines and "VSCSI_ROLE=S-VOL" in lines
    assert "VSCSI_LDEV=0010" in lines and "VSCSI_VOLUME_ID=16" in lines


def test_not_a_vscsi_volume(target: Target) -> None:
    ata = target.add("sda", standard_inquiry("ATA", "QEMU HARDDISK", "2.5+"), {0: supported(0)})
    info = probe(ata)
    assert info["vscsi"] is False and "serial" not in info and "error" not in info
    assert render_line(info) == f"{ata} -> not a vscsi volume [ATA     ] [QEMU HARDDISK   ]"
    result = CliRunner().invoke(inq, ["--export", ata])
    assert (result.exit_code, result.output) == (0, "")


def test_foreign_or_future_c0_page_is_not_ours(target: Target) -> None:
    future = bytearray(build_page(1, 1, "CL1-A", {}))
    future[4] = 2
    foreign = bytes([0, 0xC0, 0, 4, 1, 2, 3, 4])
    for name, page in (("future", bytes(future)), ("foreign", foreign)):
        dev = target.add(name, VSCSI_STD, {0: supported(0, 0xC0), 0xC0: page})
        assert probe(dev)["vscsi"] is False


def test_device_without_vpd_is_not_an_error(target: Target) -> None:
    old = target.add("old", standard_inquiry("OLD", "DISK"), {})
    info = probe(old)
    assert (info["vscsi"], info["vpd_pages"]) == (False, [])


def test_errors_are_one_line(target: Target, tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    timeout = target.add("slow", VSCSI_STD, {}, host_status=0x03)
    busy = target.add("busy", VSCSI_STD, {}, status=0x08)
    assert render_line(probe(missing)) == (
        f"{missing} -> error: cannot open: No such file or directory"
    )
    assert probe(timeout)["error"] == "INQUIRY: host status 0x03 DID_TIME_OUT"
    assert probe(busy)["error"] == "INQUIRY: SCSI status 0x08 BUSY"


def test_check_condition_on_listed_page(target: Target) -> None:
    dev = target.add("liar", VSCSI_STD, {0: supported(0, 0xC0)})
    assert probe(dev)["error"] == (
        "INQUIRY VPD 0xC0: CHECK CONDITION, ILLEGAL REQUEST 24/00 INVALID FIELD IN CDB"
    )


def test_resid_returns_only_transferred_bytes(target: Target) -> None:
    dev = target.add("short", VSCSI_STD, {0x80: b"\0\x80\0\x03abc"})
    with sgio.device(dev) as fd:
        assert sgio.inquiry(fd, 0x80) == b"\0\x80\0\x03abc"
        assert sgio.inquiry(fd, 0x80, alloc=5) == b"\0\x80\0\x03a"


def test_dev_null_is_not_a_scsi_device() -> None:
    result = CliRunner().invoke(inq, ["/dev/null"])
    assert result.exit_code == 1
    assert result.output == "/dev/null -> error: not a SCSI device (SG_IO not supported)\n"


def test_regular_file_is_not_a_scsi_device(tmp_path: Path) -> None:
    f = tmp_path / "disk.img"
    f.write_bytes(bytes(512))
    assert probe(str(f))["error"] == "not a SCSI device (SG_IO not supported)"


def test_one_error_does_not_stop_the_others(target: Target, tmp_path: Path) -> None:
    dev = vscsi_disk(target, "sdb", {})
    missing = str(tmp_path / "nope")
    result = CliRunner().invoke(inq, [missing, dev])
    assert result.exit_code == 1
    first, second = result.output.splitlines()
    assert first == f"{missing} -> error: cannot open: No such file or directory"
    assert second.startswith(f"{dev} -> [vscsi] CL1-A Ser = 410001")


def test_export_error_goes_to_stderr(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    result = CliRunner().invoke(inq, ["--export", missing])
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == f"vscsi: {missing}: cannot open: No such file or directory\n"


def test_export_takes_one_device() -> None:
    result = CliRunner().invoke(inq, ["--export", "/dev/sda", "/dev/sdb"])
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == "vscsi: --export takes exactly one device, got 2\n"


def test_json_and_export_exclude_each_other() -> None:
    result = CliRunner().invoke(inq, ["--json", "--export", "/dev/sda"])
    assert result.exit_code == 2
    assert result.stderr == "vscsi: --json and --export exclude each other\n"
