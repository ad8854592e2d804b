"""vscsi next to tcmu-runner on one host: tcmu-runner listens to the kernel's TCM-USER netlink
for every device and answers the ones it has no handler for with an error; the kernel takes the
first answer. vscsi's volumes must come up (and go away, and come back) with tcmu-runner
running, and tcmu-runner's own volume must keep working. On each transport (conftest's
`transport`), beside one tcmu-runner."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import rtslib_fb

from tests.integration.conftest import Daemon, run
from vscsi.tcmu import configfs

SIZE = 16 << 20


@pytest.fixture(scope="module")
def runner(workdir: Path) -> Iterator[str]:
    """tcmu-runner with one qcow2 volume of its own, exported over tcm_loop: its disk."""
    configfs.prepare_kernel()  # tcm_loop, before the loopback fabric is touched
    work = workdir / "coexist"
    work.mkdir()
    img = work / "runner.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=full", str(img),
        str(SIZE))  # fmt: skip
    log = (work / "tcmu-runner.log").open("wb")
    proc = subprocess.Popen(["tcmu-runner"], stdout=log, stderr=subprocess.STDOUT)
    time.sleep(3)  # it subscribes to the netlink group and registers its handlers
    assert proc.poll() is None, (work / "tcmu-runner.log").read_text()
    so = rtslib_fb.UserBackedStorageObject("coexist_qcow", config=f"qcow/{img}", size=SIZE)
    target = rtslib_fb.Target(rtslib_fb.FabricModule("loopback"))
    rtslib_fb.LUN(rtslib_fb.TPG(target, 1), 0, so)
    try:
        dev, _ = configfs.find_disk(configfs.LoopExport(target.wwn, target), timeout=60)
        yield dev
    finally:
        target.delete()
        so.delete()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def roundtrip(dev: str, seed: int) -> None:
    """Write 1 MiB of random data at an offset and read it back (direct I/O both ways)."""
    data = os.urandom(1 << 20)
    fd = os.open(dev, os.O_RDWR)
    try:
        os.pwrite(fd, data, seed << 20)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(fd, len(data), seed << 20) == data
    finally:
        os.close(fd)


def test_vscsi_volumes_serve_while_tcmu_runner_runs(
    runner: str, here: Path, transport: str
) -> None:
    roundtrip(runner, 1)
    d = Daemon(here, f'transport = "{transport}"\nstate_dir = "{here}/state"\n\n'
               '[[volume]]\nname = "beside"\npath = "beside.img"\nsize = "16MiB"\n'
               'create = true\n', name="coexist")  # fmt: skip
    try:
        d.start()
        roundtrip(d.sd("beside"), 2)
        roundtrip(runner, 3)  # tcmu-runner's volume is untouched by ours
        assert d.stop() == 0  # a clean stop removes our backstore with tcmu-runner listening
        d.start()  # and a new one comes up again
        roundtrip(d.sd("beside"), 4)
        roundtrip(runner, 5)
    finally:
        if d.proc is not None:
            d.stop()
