"""sg3_utils as an independent decoder of our responses (--inhex=FILE --raw)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.unit.scsi_harness import BS, cdb, good, make_lun
from vscsi.scsi.lun import Lun

pytestmark = pytest.mark.skipif(shutil.which("sg_vpd") is None, reason="sg3_utils missing")


@pytest.fixture
def lun() -> Lun:
    return make_lun()


def decode(tmp_path: Path, tool: str, data: bytes, *args: str) -> str:
    f = tmp_path / "resp.bin"
    f.write_bytes(data)
    p = subprocess.run([tool, f"--inhex={f}", "--raw", *args], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return p.stdout


def vpd(lun: Lun, page: int) -> bytes:
    return good(lun, cdb("INQUIRY", b1={"evpd": True}, page_code=page, alloc_len=255), size=255)


def test_standard_inquiry(lun: Lun, tmp_path: Path) -> None:
    data = good(lun, cdb("INQUIRY", alloc_len=96), size=96)
    out = decode(tmp_path, "sg_inq", data, "--descriptors")
    assert "SPC-4" in out and "PQual=0" in out and "PDT=0" in out and "RMB=0" in out
    assert "HiSUP=1" in out and "Resp_data_format=2" in out and "CmdQue=1" in out
    assert "Vendor identification: VSCSI" in out and "Product identification: OPEN-V" in out
    assert "Product revision level: 0100" in out
    assert "SAM-5" in out and "SBC-3" in out


def test_supported_pages(lun: Lun, tmp_path: Path) -> None:
    out = decode(tmp_path, "sg_vpd", vpd(lun, 0x00), "--page=sv")
    for name in (
        "Unit serial number",
        "Device identification",
        "Block limits",
        "Block device characteristics",
        "Logical block provisioning",
    ):
        assert name in out, out


def test_unit_serial(lun: Lun, tmp_path: Path) -> None:
    out = decode(tmp_path, "sg_vpd", vpd(lun, 0x80), "--page=sn")
    assert "Unit serial number: 41000100100" in out


def test_device_identification(lun: Lun, tmp_path: Path) -> None:
    out = decode(tmp_path, "sg_vpd", vpd(lun, 0x83), "--page=di")
    assert "Addressed logical unit" in out and "designator type: NAA,  code set: Binary" in out
    assert "0x60014050000641915653435300000100" in out  # 6 · OUI · serial · "VSCS" · volume
    assert "designator type: T10 vendor identification,  code set: ASCII" in out
    assert "vendor id: VSCSI" in out and "OPEN-V-41000100100" in out, out


def test_block_limits(lun: Lun, tmp_path: Path) -> None:
    out = decode(tmp_path, "sg_vpd", vpd(lun, 0xB0), "--page=bl")
    assert "Maximum compare and write length: 128 blocks" in out, out
    assert f"Maximum transfer length: {(8 << 20) // BS} blocks" in out
    assert f"Optimal transfer length: {(1 << 20) // BS} blocks" in out
    assert f"Maximum unmap LBA count: {(64 << 20) // BS}" in out
    assert "Maximum unmap block descriptor count: 256" in out
    assert "Optimal unmap granularity: 8 blocks" in out
    assert f"Maximum write same length: 0x{(64 << 20) // BS:x} blocks" in out


def test_block_device_characteristics(lun: Lun, tmp_path: Path) -> None:
    out = decode(tmp_path, "sg_vpd", vpd(lun, 0xB1), "--page=bdc")
    assert "Non-rotating medium" in out, out


def test_logical_block_provisioning(lun: Lun, tmp_path: Path) -> None:
    out = decode(tmp_path, "sg_vpd", vpd(lun, 0xB2), "--page=lbpv")
    assert "Unmap command supported (LBPU): 1" in out, out
    assert "Write same (16) with unmap bit supported (LBPWS): 1" in out
    assert "Write same (10) with unmap bit supported (LBPWS10): 1" in out
    assert "thin provisioned" in out
    out = decode(tmp_path, "sg_vpd", vpd(make_lun(unmap=False), 0xB2), "--page=lbpv")
    assert "Unmap command supported (LBPU): 0" in out and "fully provisioned" in out, out


def test_get_lba_status(lun: Lun, tmp_path: Path) -> None:
    good(lun, cdb("WRITE(10)", lba=0, length=8), data=b"\x01" * 8 * BS)
    data = good(lun, cdb("GET LBA STATUS", lba=0, alloc_len=64), size=64)
    out = decode(tmp_path, "sg_get_lba_status", data, "--maxlen=64", "--brief")
    lines = out.splitlines()[-2:]
    assert lines == ["0x0000000000000000  0x8  0  0", "0x0000000000000008  0x3ff8  1  0"], out
