"""Integration tests: run as root inside the VM (scripts/vm-run) against the real LIO/TCMU stack.

Outside the VM they fail rather than skip: a skipped integration test would hide a broken
kernel path.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from vscsi.control import ControlError, request

VSCSI = str(Path(sys.executable).with_name("vscsi"))
CONFIGFS = Path("/sys/kernel/config/target")


@pytest.fixture(autouse=True, scope="session")
def _inside_vm() -> None:
    if not os.environ.get("VSCSI_VM") or os.geteuid() != 0:
        pytest.fail("integration tests run only inside the VM as root: use 'make integration'")


@pytest.fixture(autouse=True, scope="session")
def _writable_dbroot(_inside_vm: None, tmp_path_factory: pytest.TempPathFactory) -> None:
    """LIO saves persistent reservations under its dbroot (/var/target by default), which the
    VM's read-only root does not have: every PR REGISTER would fail NOT READY. Point it at a
    scratch directory before the first target device exists (the kernel refuses it later)."""
    run("modprobe", "target_core_user")
    if not CONFIGFS.parent.is_dir() or not CONFIGFS.exists():
        run("mount", "-t", "configfs", "none", "/sys/kernel/config", check=False)
    dbroot = tmp_path_factory.mktemp("lio-dbroot")
    (CONFIGFS / "dbroot").write_text(str(dbroot))


def run(*cmd: str, check: bool = True, timeout: float = 120, **kw: object) -> str:
    """Run a command; on failure show its output in the assertion."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p.stdout + p.stderr


def run_rc(*cmd: str, timeout: float = 120) -> tuple[int, str]:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


class Daemon:
    """One `vscsi up` process serving a config written into a work directory."""

    running: set[Daemon] = set()  # whose logs a failed test's report shows

    def __init__(self, workdir: Path, config: str, name: str = "vscsi") -> None:
        self.name = name
        self.workdir = workdir
        self.socket = str(workdir / f"{name}.sock")
        self.config = workdir / f"{name}.toml"
        self.config.write_text(f'[daemon]\nsocket = "{self.socket}"\n\n{config}')
        self.log = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 240) -> dict[str, dict[str, object]]:
        self.spawn()
        return self.wait_serving(timeout)

    def spawn(self) -> None:
        """Start `vscsi up` without waiting for it (see `start_all`)."""
        with self.log.open("ab") as logf:
            self.proc = subprocess.Popen(
                [VSCSI, "up", "-c", str(self.config)], stdout=logf, stderr=subprocess.STDOUT
            )
        Daemon.running.add(self)

    def wait_serving(self, timeout: float = 240) -> dict[str, dict[str, object]]:
        """Every volume served (and its /dev/sdX there, if exported through tcm_loop)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"vscsi up exited {self.proc.returncode}:\n{self.output()}")
            vols = self.try_status()
            if vols and all(
                v["state"] == "serving" and (v["sd"] or "loop" not in str(v["export"]).split("+"))
                for v in vols.values()
            ):
                return vols
            time.sleep(0.2)
        raise AssertionError(f"volumes not served within {timeout}s:\n{self.output()}")

    def try_status(self) -> dict[str, dict[str, object]] | None:
        """What `vscsi status --json` shows, asked on the control socket directly: it is polled,
        and a CLI process per poll costs seconds in the emulated VM (test_serve runs the CLI)."""
        try:
            result = request(self.socket, "status", timeout=60)
        except ControlError:
            return None
        return {v["name"]: v for v in result["volumes"]}

    def status(self) -> dict[str, dict[str, object]]:
        vols = self.try_status()
        assert vols is not None, self.output()
        return vols

    def sd(self, name: str) -> str:
        return str(self.status()[name]["sd"])

    def sg(self, name: str) -> str:
        return str(self.status()[name]["sg"])

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout)
        self.proc = None
        Daemon.running.discard(self)
        return rc

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


LOG_TAIL = 60  # lines of each daemon's log, and of the kernel's, in a failed test's report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test's report ends with the last lines each running daemon logged, and the
    kernel's (a sense the target core made up, e.g. for a ring it found broken, shows only
    there): in CI they are all there is to tell each side's view of the failure."""
    report = yield
    if report.failed:
        for d in sorted(Daemon.running, key=lambda d: d.name):
            tail = "\n".join(d.output().splitlines()[-LOG_TAIL:])
            report.sections.append((f"daemon {d.name}: last {LOG_TAIL} log lines", tail))
        kernel = subprocess.run(["dmesg"], capture_output=True, text=True, check=False).stdout
        tail = "\n".join(kernel.splitlines()[-LOG_TAIL:])
        report.sections.append((f"kernel: last {LOG_TAIL} log lines", tail))
    return report


def start_all(*daemons: Daemon, timeout: float = 240) -> None:
    """Start daemons overlapped: each next one once the previous one answers on its control
    socket. A daemon answers there just before it creates its backstores, and rtslib picks a
    new backstore's HBA index from what it saw in configfs: two daemons creating their first
    ones at once could pick the same. The next one's start-up (an interpreter importing the
    daemon, seconds in the emulated VM) still overlaps the previous one's backstores and disks."""
    for d in daemons:
        d.spawn()
        deadline = time.monotonic() + timeout
        while d.try_status() is None and d.proc is not None and d.proc.poll() is None:
            assert time.monotonic() < deadline, f"no control socket within {timeout}s"
            time.sleep(0.1)
    for d in daemons:
        d.wait_serving(timeout)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vscsi")


@pytest.fixture(scope="module", params=["native", "libtcmu"])
def transport(request: pytest.FixtureRequest) -> str:
    """The `[daemon] transport` of a module's daemons: a module that asks for it runs whole on
    vscsi's own ring, then whole on Debian's libtcmu (pytest sets one up after the other)."""
    return str(request.param)


@pytest.fixture(scope="module")
def here(request: pytest.FixtureRequest, workdir: Path, transport: str) -> Path:
    """The module's own directory for one transport: its images, state and daemon socket, so
    the second transport's daemon starts from nothing the first one left."""
    path = workdir / f"{request.module.__name__.rpartition('.')[2]}-{transport}"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def loopdev(workdir: Path) -> Iterator[str]:
    """A real block device (loop over a tmpfs file) to serve as a backing store."""
    run("modprobe", "loop")
    img = workdir / "loop-backing.img"
    with img.open("wb") as f:
        f.truncate(64 << 20)
    dev = run("losetup", "--find", "--show", str(img)).strip()
    yield dev
    run("losetup", "-d", dev, check=False)


def our_configfs_objects() -> list[str]:
    """Backstores and loopback targets that vscsi created (named vscsi-*)."""
    found: list[str] = []
    core = CONFIGFS / "core"
    if core.exists():
        found += [str(p) for p in core.glob("user_*/*") if p.is_dir()]
    loop = CONFIGFS / "loopback"
    if loop.exists():
        found += [str(p) for p in loop.glob("naa.*")]
    return found


@pytest.fixture(scope="session")
def baddev(workdir: Path) -> Iterator[str]:
    """A block device with 64 unreadable, unwritable sectors at LBA 4096 (device-mapper
    `error` target between two linear pieces of a loop device)."""
    run("modprobe", "loop")
    run("modprobe", "dm_mod")
    img = workdir / "bad-backing.img"
    with img.open("wb") as f:
        f.truncate(16 << 20)
    loop = run("losetup", "--find", "--show", str(img)).strip()
    sectors = (16 << 20) // 512
    table = f"0 4096 linear {loop} 0\n4096 64 error\n4160 {sectors - 4160} linear {loop} 4160\n"
    run("dmsetup", "create", "vscsi-bad", input=table)
    yield "/dev/mapper/vscsi-bad"
    run("dmsetup", "remove", "vscsi-bad", check=False)
    run("losetup", "-d", loop, check=False)
