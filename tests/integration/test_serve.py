"""A served LUN seen from the host: sg3_utils, dd, a file system and fio through tcm_loop.

One daemon serves several volumes: a 512-byte-block file, a 4096-byte-block file without
write cache, a loop block device and a failing one. Every test that uses it runs on both
transports, vscsi's own ring and Debian's libtcmu (`[daemon] transport`), one daemon each.
"""

from __future__ import annotations

import json
import mmap
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import VSCSI, Daemon, our_configfs_objects, run, run_rc

MIB = 1 << 20


@pytest.fixture(scope="module")
def daemon(transport: str, workdir: Path, loopdev: str, baddev: str) -> Iterator[Daemon]:
    d = Daemon(
        workdir,
        f"""transport = "{transport}"

[[volume]]
name = "v512"
path = "{workdir}/v512.img"
size = "64MiB"
create = true
[volume.identity]
vendor = "VSCSI"
product = "OPEN-V"
serial = 410001
volume_id = 0x100

[[volume]]
name = "v4k"
path = "{workdir}/v4k.img"
size = "32MiB"
create = true
block_size = 4096
write_cache = false
[volume.identity]
serial = 410001
volume_id = 0x101

[[volume]]
name = "vblk"
path = "{loopdev}"
[volume.identity]
serial = 410001
volume_id = 0x102

[[volume]]
name = "vbad"
path = "{baddev}"
[volume.identity]
serial = 410001
volume_id = 0x103
""",
    )
    d.start()
    if transport == "libtcmu":
        assert d.proc is not None
        maps = Path(f"/proc/{d.proc.pid}/maps").read_text()
        assert "libtcmu.so.2" in maps, "the daemon did not load libtcmu"
    yield d
    if d.proc is not None:
        assert d.stop() == 0, d.output()
        assert our_configfs_objects() == [], "configfs objects left behind after SIGTERM"


def test_status_lists_devices(daemon: Daemon) -> None:
    vols = daemon.status()
    assert set(vols) == {"v512", "v4k", "vblk", "vbad"}
    for v in vols.values():
        assert str(v["sd"]).startswith("/dev/sd") and str(v["sg"]).startswith("/dev/sg")
    out = run("lsscsi", "-g")
    for v in vols.values():
        assert str(v["sd"]) in out
    # the CLI a user runs shows the same (the fixtures ask the control socket directly)
    as_json = json.loads(run(VSCSI, "status", "--json", "--socket", daemon.socket))
    assert {v["name"]: v["sd"] for v in as_json["volumes"]} == {n: v["sd"] for n, v in vols.items()}
    table = run(VSCSI, "status", "--socket", daemon.socket)
    for v in vols.values():
        assert re.search(rf"^{v['name']}\s+serving\s.*\s{v['sd']}\s", table, re.M), table


def test_status_counts_commands_and_those_the_compiled_path_answered(
    daemon: Daemon, transport: str
) -> None:
    """What a user checks when a LUN is slower than expected: how many commands it served, and
    how many of them the compiled READ/WRITE path answered (libtcmu hands all to Python)."""
    before = daemon.status()["v4k"]
    run("dd", f"if={daemon.sd('v4k')}", "of=/dev/null", "bs=4096", "count=64", "iflag=direct")
    after = daemon.status()["v4k"]
    served = int(after["commands"]) - int(before["commands"])  # type: ignore[call-overload]
    compiled = int(after["compiled"]) - int(before["compiled"])  # type: ignore[call-overload]
    assert served >= 64, (before, after)
    if transport == "native":
        assert compiled >= 60, (before, after)  # 64 plain READ(10)s (one may meet a UA)
    else:
        assert compiled == 0, (before, after)


def test_inquiry(daemon: Daemon) -> None:
    out = run("sg_inq", daemon.sd("v512"))
    assert "VSCSI" in out and "OPEN-V" in out
    assert re.search(r"version=0x06\s+\[SPC-4\]", out), out


def test_vpd_pages(daemon: Daemon) -> None:
    sd = daemon.sd("v512")
    supported = run("sg_vpd", "-p", "sv", sd)
    for page in ("[sn]", "[di]", "[bl]", "[bdc]", "[lbpv]"):
        assert page in supported, supported
    sn = run("sg_vpd", "-p", "sn", sd)
    assert "Unit serial number: 410001" in sn, sn
    di = run("sg_vpd", "-p", "di", sd)
    assert "designator type: NAA" in di and re.search(r"0x6[0-9a-f]{31}", di), di
    other = run("sg_vpd", "-p", "di", daemon.sd("v4k"))
    naa = re.findall(r"0x[0-9a-f]{32}", di)
    assert naa and naa[0] not in other, (di, other)
    bl = run("sg_vpd", "-p", "bl", sd)
    m = re.search(r"Maximum unmap LBA count: (\d+)", bl)
    assert m and int(m.group(1)) > 0, bl
    assert "Non-rotating medium" in run("sg_vpd", "-p", "bdc", sd)
    lbpv = run("sg_vpd", "-p", "lbpv", sd)
    assert re.search(r"Unmap command supported \(LBPU\): 1", lbpv), lbpv


def test_read_capacity(daemon: Daemon) -> None:
    out = run("sg_readcap", "-l", daemon.sd("v512"))
    assert "Logical block length=512 bytes" in out and "lbpme=1, lbprz=1" in out, out
    assert f"Number of logical blocks={64 * MIB // 512}" in out, out
    out = run("sg_readcap", "-l", daemon.sd("v4k"))
    assert "Logical block length=4096 bytes" in out, out
    blk = run("blockdev", "--getsize64", daemon.sd("vblk")).strip()
    assert int(blk) == 64 * MIB


def test_mode_pages_reflect_write_cache(daemon: Daemon) -> None:
    # sg_modes dumps the page: byte 2 of the caching page holds WCE (0x04)
    assert "08 12 04" in run("sg_modes", "-p", "8", daemon.sd("v512"))
    assert "08 12 00" in run("sg_modes", "-p", "8", daemon.sd("v4k"))
    everything = run("sg_modes", "-a", daemon.sd("v512"))
    assert "Control" in everything and "Caching" in everything, everything


def test_opcodes_and_tur(daemon: Daemon) -> None:
    out = run("sg_opcodes", daemon.sd("v512"))
    for name in ("Read(16)", "Write(16)", "Unmap", "Compare and write", "Write same(16)"):
        assert name in out, out
    run("sg_turs", "-n", "5", daemon.sd("v512"))
    run("sg_sync", daemon.sd("v512"))


def test_invalid_commands_get_sense(daemon: Daemon) -> None:
    sg = daemon.sg("v512")
    rc, out = run_rc("sg_raw", "-R", sg, "c5", "00", "00", "00", "00", "00")
    assert rc != 0 and "Invalid command operation code" in out, out
    nblocks = 64 * MIB // 512
    lba = nblocks.to_bytes(4, "big").hex(" ").split()
    rc, out = run_rc("sg_raw", "-R", "-r", "512", sg, "28", "00", *lba, "00", "00", "01", "00")
    assert rc != 0 and "Logical block address out of range" in out, out


def test_unmap_and_lba_status(daemon: Daemon, workdir: Path) -> None:
    sd = daemon.sd("v512")
    run("dd", "if=/dev/urandom", f"of={sd}", "bs=1M", "count=4", "oflag=direct")
    run("sg_unmap", "--force", "--lba=2048", "--num=2048", sd)  # no 15 s "Press control-C"
    status = run("sg_get_lba_status", "--lba=2048", sd)
    assert re.search(r"deallocated", status, re.I), status
    assert run_bytes(sd, 2048, 2048) == bytes(2048 * 512), "unmapped blocks must read as zeroes"
    fd = os.open(workdir / "v512.img", os.O_RDONLY)
    try:
        assert os.lseek(fd, 2048 * 512, os.SEEK_HOLE) == 2048 * 512, "no hole was punched"
    finally:
        os.close(fd)


def test_write_same_and_compare_and_write(daemon: Daemon, workdir: Path) -> None:
    sd = daemon.sd("v512")
    pattern = workdir / "pattern.bin"
    pattern.write_bytes(b"\x5a" * 512)
    run("sg_write_same", "--lba=100", "--num=50", f"--in={pattern}", sd)
    got = run_bytes(sd, 100, 50)
    assert got == b"\x5a" * 512 * 50
    run("sg_write_same", "--16", "--unmap", "--lba=100", "--num=50", sd)
    assert run_bytes(sd, 100, 50) == bytes(512 * 50)

    both = workdir / "caw.bin"
    both.write_bytes(bytes(512) + b"\xc3" * 512)
    run("sg_compare_and_write", f"--in={both}", "--lba=100", "--num=1", sd)
    assert run_bytes(sd, 100, 1) == b"\xc3" * 512
    rc, out = run_rc("sg_compare_and_write", f"--in={both}", "--lba=100", "--num=1", sd)
    assert rc == 14 and "iscompare" in out, (rc, out)  # sg3_utils' exit status for MISCOMPARE


def test_verify(daemon: Daemon, workdir: Path) -> None:
    sd = daemon.sd("v512")
    run("sg_verify", "--lba=0", "--count=128", sd)
    run("dd", "if=/dev/zero", f"of={sd}", "bs=512", "seek=300", "count=1", "oflag=direct")
    zeros = workdir / "zeros.bin"
    zeros.write_bytes(bytes(512))
    run("sg_verify", "--lba=300", "--count=1", "--ndo=512", f"--in={zeros}", sd)
    ones = workdir / "ones.bin"
    ones.write_bytes(b"\x01" * 512)
    rc, out = run_rc("sg_verify", "--lba=300", "--count=1", "--ndo=512", f"--in={ones}", sd)
    assert rc == 14, (rc, out)


def run_bytes(dev: str, lba: int, count: int, bs: int = 512) -> bytes:
    """Read blocks with O_DIRECT (an mmap is page aligned), bypassing the host's page cache."""
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    try:
        with mmap.mmap(-1, count * bs) as m:
            os.preadv(fd, [m], lba * bs)
            return bytes(m)
    finally:
        os.close(fd)


@pytest.mark.parametrize("name", ["v512", "v4k", "vblk"])
def test_dd_round_trip(daemon: Daemon, workdir: Path, loopdev: str, name: str) -> None:
    sd = daemon.sd(name)
    src = workdir / f"rt-{name}.bin"
    src.write_bytes(os.urandom(8 * MIB))
    run("dd", f"if={src}", f"of={sd}", "bs=1M", "seek=3", "oflag=direct", "conv=fsync")
    back = workdir / f"rt-{name}.out"
    run("dd", f"if={sd}", f"of={back}", "bs=1M", "skip=3", "count=8", "iflag=direct")
    run("cmp", str(src), str(back))
    backing = loopdev if name == "vblk" else str(workdir / f"{name}.img")
    run("cmp", "-n", str(8 * MIB), str(src), backing, "0", str(3 * MIB))


def test_filesystem(daemon: Daemon, workdir: Path) -> None:
    sd = daemon.sd("v4k")
    mnt = workdir / "mnt"
    mnt.mkdir(exist_ok=True)
    run("mkfs.ext4", "-q", "-F", sd)
    run("mount", sd, str(mnt))
    try:
        payload = os.urandom(3 * MIB)
        for i in range(5):
            (mnt / f"f{i}").write_bytes(payload)
        run("sync")
    finally:
        run("umount", str(mnt))
    run("fsck.ext4", "-n", "-f", sd)
    run("mount", "-o", "ro", sd, str(mnt))
    try:
        assert all((mnt / f"f{i}").read_bytes() == payload for i in range(5))
    finally:
        run("umount", str(mnt))


def test_fio_verify(daemon: Daemon) -> None:
    sd = daemon.sd("vblk")
    # fio exits non-zero on any I/O error or verify mismatch; run() turns that into a failure
    run(
        "fio",
        "--name=verify",
        f"--filename={sd}",
        "--ioengine=libaio",
        "--direct=1",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--size=16M",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--do_verify=1",
        "--verify_state_save=0",
        timeout=300,
    )


def test_sigkill_restart_keeps_data(daemon: Daemon, workdir: Path) -> None:
    sd_before = daemon.sd("v512")
    naa_before = run("sg_vpd", "-p", "di", sd_before)
    src = workdir / "kill.bin"
    src.write_bytes(os.urandom(4 * MIB))
    run("dd", f"if={src}", f"of={sd_before}", "bs=1M", "seek=10", "oflag=direct")
    daemon.kill()
    vols = daemon.start()
    sd = str(vols["v512"]["sd"])
    back = workdir / "kill.out"
    run("dd", f"if={sd}", f"of={back}", "bs=1M", "skip=10", "count=4", "iflag=direct")
    run("cmp", str(src), str(back))
    run("cmp", "-n", str(4 * MIB), str(src), str(workdir / "v512.img"), "0", str(10 * MIB))
    assert run("sg_vpd", "-p", "di", sd) == naa_before.replace(sd_before, sd)


def test_config_errors_create_nothing(workdir: Path) -> None:
    bad = Daemon(workdir, f'[[volume]]\nname = "x"\npath = "{workdir}/absent.img"\n', name="bad")
    before = our_configfs_objects()
    rc, out = run_rc(VSCSI, "up", "-c", str(bad.config))
    assert rc == 2 and out.strip().count("\n") == 0 and "volume[0].path" in out, out
    assert our_configfs_objects() == before


def test_device_errors_become_medium_errors(daemon: Daemon) -> None:
    """dm-error under the volume: the command fails with sense, the daemon keeps serving."""
    sg, sd = daemon.sg("vbad"), daemon.sd("vbad")
    lba = (4100).to_bytes(4, "big").hex(" ").split()
    rc, out = run_rc("sg_raw", "-R", "-r", "512", sg, "28", "00", *lba, "00", "00", "01", "00")
    assert rc != 0 and "Medium Error" in out and "Unrecovered read error" in out, out
    rc, out = run_rc(
        "sg_raw", "-R", "-s", "512", "-i", "/dev/zero", sg, "2a", "00", *lba, "00", "00", "01", "00"
    )
    assert rc != 0 and "Medium Error" in out and "Write error" in out, out
    rc, out = run_rc(
        "dd", f"if={sd}", "of=/dev/null", "bs=4k", "skip=512", "count=4", "iflag=direct"
    )
    assert rc != 0 and "No data available" in out, out  # the block layer's BLK_STS_MEDIUM
    run("sg_turs", sg)  # still served
    run("dd", f"if={sd}", "of=/dev/null", "bs=4k", "count=16", "iflag=direct")
    assert daemon.status()["vbad"]["state"] == "serving"
