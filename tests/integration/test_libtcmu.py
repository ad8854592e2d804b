"""The libtcmu transport (`[daemon] transport = "libtcmu"`): the same volumes served through
Debian's libtcmu.so.2 instead of vscsi's own ring, seen from the host through tcm_loop.

One daemon serves a 512-byte-block and a 4096-byte-block volume for the whole module."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import rtslib_fb

from tests.integration.conftest import VSCSI, Daemon, our_configfs_objects, run, run_rc
from tests.integration.hostio import Writer, fio, fio_ok
from tests.integration.test_coexist import roundtrip
from vscsi.tcmu import configfs

MIB = 1 << 20


@pytest.fixture(scope="module")
def daemon(workdir: Path) -> Iterator[Daemon]:
    d = Daemon(
        workdir,
        f"""transport = "libtcmu"
command_timeout = 0

[[volume]]
name = "lt512"
path = "{workdir}/lt512.img"
size = "64MiB"
create = true
[volume.identity]
vendor = "VSCSI"
product = "OPEN-V"
serial = 410005
volume_id = 0x500

[[volume]]
name = "lt4k"
path = "{workdir}/lt4k.img"
size = "32MiB"
create = true
block_size = 4096
[volume.identity]
serial = 410005
volume_id = 0x501
""",
        name="libtcmu",
    )
    d.start()
    for name in ("lt512", "lt4k"):
        # commands queued while the daemon is down must wait for its restart, not time out
        Path(f"/sys/block/{Path(d.sd(name)).name}/device/timeout").write_text("300")
    yield d
    if d.proc is not None:
        assert d.stop() == 0, d.output()
        assert our_configfs_objects() == [], "configfs objects left behind after SIGTERM"


def test_served_through_libtcmu(daemon: Daemon) -> None:
    vols = daemon.status()
    assert {n: v["state"] for n, v in vols.items()} == {"lt512": "serving", "lt4k": "serving"}
    assert all(str(v["uio"]).startswith("uio") for v in vols.values()), vols
    assert daemon.proc is not None
    maps = Path(f"/proc/{daemon.proc.pid}/maps").read_text()
    assert "libtcmu.so.2" in maps, "the daemon did not load libtcmu"


def test_inquiry_and_vendor_page(daemon: Daemon) -> None:
    sd = daemon.sd("lt512")
    out = run("sg_inq", sd)
    assert "VSCSI" in out and "OPEN-V" in out, out
    (info,) = json.loads(run(VSCSI, "inq", "--json", sd))  # reads vendor page 0xC0
    assert info["vscsi"] and info["serial"] == 410005, info
    assert info["remote"]["role"] == "SMPL" and [m["role"] for m in info["mu"]] == ["SMPL"] * 3
    line = run(VSCSI, "inq", daemon.sd("lt4k"))
    assert "Ser = 410005" in line and "HORC = SMPL" in line, line
    assert "Logical block length=4096 bytes" in run("sg_readcap", "-l", daemon.sd("lt4k"))


@pytest.mark.parametrize("name", ["lt512", "lt4k"])
def test_dd_round_trip(daemon: Daemon, workdir: Path, name: str) -> None:
    sd = daemon.sd(name)
    src = workdir / f"lt-{name}.bin"
    src.write_bytes(os.urandom(8 * MIB))
    run("dd", f"if={src}", f"of={sd}", "bs=1M", "seek=3", "oflag=direct", "conv=fsync")
    back = workdir / f"lt-{name}.out"
    run("dd", f"if={sd}", f"of={back}", "bs=1M", "skip=3", "count=8", "iflag=direct")
    run("cmp", str(src), str(back))
    run("cmp", "-n", str(8 * MIB), str(src), str(workdir / f"{name}.img"), "0", str(3 * MIB))


def test_fio_verify(daemon: Daemon) -> None:
    fio_ok(fio(daemon.sd("lt512"), size="8M"), daemon)


def test_errors_get_sense(daemon: Daemon) -> None:
    sg = daemon.sg("lt512")
    lba = (64 * MIB // 512).to_bytes(4, "big").hex(" ").split()
    rc, out = run_rc("sg_raw", "-R", "-r", "512", sg, "28", "00", *lba, "00", "00", "01", "00")
    assert rc != 0 and "Logical block address out of range" in out, out
    # libtcmu 1.5.4 hands out no vendor-specific CDB; the transport answers it from the ring
    rc, out = run_rc("sg_raw", "-R", sg, "c5", "00", "00", "00", "00", "00")
    assert rc != 0 and "Invalid command operation code" in out, out
    run("sg_turs", sg)  # and the ring is still in step


def test_tcmu_runner_devices_come_up_beside_the_libtcmu_daemon(
    daemon: Daemon, workdir: Path
) -> None:
    """The daemon's libtcmu left the netlink group: a device tcmu-runner makes afterwards is
    answered by tcmu-runner alone (a listening libtcmu would say -ENOENT, and could be first)."""
    work = workdir / "libtcmu-runner"
    work.mkdir(exist_ok=True)
    img = work / "runner.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=full", str(img),
        str(16 * MIB))  # fmt: skip
    log = (work / "tcmu-runner.log").open("wb")
    proc = subprocess.Popen(["tcmu-runner"], stdout=log, stderr=subprocess.STDOUT)
    so = target = None
    try:
        time.sleep(3)  # it subscribes to the netlink group and registers its handlers
        assert proc.poll() is None, (work / "tcmu-runner.log").read_text()
        so = rtslib_fb.UserBackedStorageObject("libtcmu_qcow", config=f"qcow/{img}",
                                               size=16 * MIB)  # fmt: skip
        target = rtslib_fb.Target(rtslib_fb.FabricModule("loopback"))
        rtslib_fb.LUN(rtslib_fb.TPG(target, 1), 0, so)
        dev, _ = configfs.find_disk(configfs.LoopExport(target.wwn, target), timeout=60)
        roundtrip(dev, 1)
        roundtrip(daemon.sd("lt512"), 20)  # ours is untouched
    finally:
        if target is not None:
            target.delete()
        if so is not None:
            so.delete()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    roundtrip(daemon.sd("lt512"), 21)


def test_sigkill_under_writes_restart_reattaches(daemon: Daemon) -> None:
    sd_before = daemon.sd("lt512")
    naa_before = run("sg_vpd", "-p", "di", sd_before)
    writer = Writer(sd_before, 4 * MIB)
    try:
        writer.start()
        writer.wait_for(50)
        daemon.kill()
        vols = daemon.start()  # libtcmu resets the ring: queued commands are BUSY, retried
        assert vols["lt512"]["reattached"], vols["lt512"]
        writer.wait_for(50)
    finally:
        writer.stop_and_verify()
    sd = daemon.sd("lt512")
    assert run("sg_vpd", "-p", "di", sd) == naa_before.replace(sd_before, sd)
