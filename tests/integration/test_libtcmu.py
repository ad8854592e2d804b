"""The libtcmu transport (`[daemon] transport = "libtcmu"`): what is its own. The SCSI
behaviour through it (every command, dd, a file system, fio, device errors, a restart) is
test_serve.py's, pairs and shadow sets test_pairs.py's and test_shadow.py's, tcmu-runner
already running test_coexist.py's: every suite of one site runs on both transports (conftest's
`transport`); site B of the remote tests serves through it. Here: tcmu-runner starting after
it, and a local pair SIGKILLed under mirrored writes.

One daemon serves a 512-byte-block and a 4096-byte-block volume, and an S-VOL for the first,
for the whole module."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import rtslib_fb

from tests.integration.conftest import VSCSI, Daemon, our_configfs_objects, run
from tests.integration.hostio import Writer
from tests.integration.test_coexist import roundtrip
from vscsi.control import request
from vscsi.tcmu import configfs

MIB = 1 << 20


@pytest.fixture(scope="module")
def daemon(workdir: Path) -> Iterator[Daemon]:
    d = Daemon(
        workdir,
        f"""transport = "libtcmu"
command_timeout = 0
state_dir = "{workdir}/libtcmu-state"

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
name = "lt512s"
path = "{workdir}/lt512s.img"
size = "64MiB"
create = true
[volume.identity]
serial = 410005
volume_id = 0x502

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


def test_tcmu_runner_devices_come_up_beside_the_libtcmu_daemon(
    daemon: Daemon, workdir: Path
) -> None:
    """The daemon's libtcmu left the netlink group: a device tcmu-runner makes afterwards is
    answered by tcmu-runner alone (a listening libtcmu would say -ENOENT, and could be first)."""
    configfs.prepare_kernel()  # rtslib's dbroot and tcm_loop, before rtslib is used here
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


def test_a_pair_mirrors_through_libtcmu_and_survives_sigkill_under_writes(
    daemon: Daemon, workdir: Path
) -> None:
    """A local pair on this transport copies and mirrors the host's writes; SIGKILLed under
    them, the daemon re-attaches (libtcmu answers what was queued BUSY, the host retries it),
    the pair resends what its write-intent log holds, and ends PAIR with both copies alike."""
    request(daemon.socket, "pair_create", name="lp", pvol="lt512", svol="lt512s", mu=0)
    paired(daemon)
    writer = Writer(daemon.sd("lt512"), 4 * MIB)
    try:
        writer.start()
        writer.wait_for(50)
        daemon.kill()
        daemon.start()
        writer.wait_for(50)
    finally:
        writer.stop_and_verify()
    paired(daemon)
    run("cmp", str(workdir / "lt512.img"), str(workdir / "lt512s.img"))
    request(daemon.socket, "pair_delete", name="lp")


def paired(daemon: Daemon, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while (p := request(daemon.socket, "pair_display", name="lp")["pairs"][0])["status"] != "PAIR":
        assert p["status"] == "COPY" and time.monotonic() < deadline, p
        time.sleep(0.2)
