"""`make bench`, inside the VM: one vscsi daemon serving many LUNs, as an array presents dozens.

One `vscsi up` serves LUNS volumes (files of VOLUME_SIZE on a tmpfs of their own), each exported
through tcm_loop. Measured: how long `vscsi up` takes until every LUN serves and has its
/dev/sdX (it prints its "serving" line only then), and how long SIGTERM takes to remove them;
the daemon's CPU time (utime+stime of all its threads) while every LUN is idle, which should be
about nothing (no ring may poll or spin while the host sends nothing); and fio 4 KiB random
I/O at QD16 on one busy LUN against BUSY LUNs at once (one fio, a job per disk, summed), with
the VM's CPU per I/O (bench/cpu.py), while the other LUNs stay idle.
Absolute numbers mean nothing across machines.

With VSCSI_SCALE_PROFILE=1, py-spy also samples the daemon during the attach (waiting threads
too: where the time goes), while idle and under the busy jobs; the summaries are printed and
written to $VSCSI_VM_OUT/scale-*.summary.

    python -m bench.bench_scale     (as root, in the VM; VSCSI_SCALE_LUNS=16 for a smaller run)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.bench_io import RUNTIME, VSCSI
from bench.cpu import CpuUse, measured, process_us
from bench.profile import PY_SPY, summary
from vscsi.control import request
from vscsi.tcmu import configfs

LUNS = int(os.environ.get("VSCSI_SCALE_LUNS", "64"))
BUSY = 8
VOLUME_SIZE = 64 << 20
IDLE_SECONDS = 10
SETTLE_SECONDS = 2  # after the attach, before the idle window: udev's own probes finish
JOBS = [("randread 4K QD16", "randread"), ("randwrite 4K QD16", "randwrite")]
TARGET = 1.5  # BUSY LUNs together against one
PROFILE = os.environ.get("VSCSI_SCALE_PROFILE") == "1"
OUT = Path(os.environ.get("VSCSI_VM_OUT", "."))


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    socket: Path
    disks: list[str]
    startup_s: float  # until the control socket exists: interpreter, imports, config, stores
    attach_s: float  # until every LUN serves with its disk
    stop_s: float = float("nan")


def write_config(work: Path) -> Path:
    """LUNS volumes; the BUSY ones that fio uses are allocated in full (fallocate), so reads
    find data rather than holes; the idle ones stay sparse (the VM's memory is small)."""
    lines = [f'[daemon]\nsocket = "{work}/scale.sock"\nstate_dir = "{work}/state"\n']
    for i in range(LUNS):
        img = work / f"lun{i:02}.img"
        with open(img, "wb") as f:
            if i < BUSY:
                os.posix_fallocate(f.fileno(), 0, VOLUME_SIZE)
            else:
                f.truncate(VOLUME_SIZE)
        lines.append(f'[[volume]]\nname = "lun{i:02}"\npath = "{img}"\n')
    cfg = work / "scale.toml"
    cfg.write_text("\n".join(lines))
    return cfg


@contextmanager
def daemon(work: Path) -> Iterator[Daemon]:
    """`vscsi up` over every LUN, timed until it prints that it serves them all (each LUN's
    disk exists by then); stopped with SIGTERM, which removes every export and backstore."""
    cfg = write_config(work)
    log = work / "scale.log"
    with log.open("wb") as out:
        start = time.monotonic()
        proc = subprocess.Popen([VSCSI, "up", "-c", str(cfg)], stdout=out)
    d: Daemon | None = None
    try:
        if PROFILE:
            time.sleep(1)  # py-spy needs the interpreter up
        sock = work / "scale.sock"
        with spying(proc.pid, "attach", idle=True):
            startup_s, attach_s = wait_serving(proc, sock, log, start)
        d = Daemon(proc, sock, served_disks(sock), startup_s, attach_s)
        yield d
    finally:
        stop = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(600)
        if d is not None:
            d.stop_s = time.monotonic() - stop


def wait_serving(
    proc: subprocess.Popen[bytes], sock: Path, log: Path, start: float
) -> tuple[float, float]:
    """Seconds from the start of `vscsi up` until its control socket exists (it starts
    listening before it touches configfs), and until its "serving N volume(s)" line."""
    deadline = start + 60 + 5 * LUNS
    socket_s: float | None = None
    while time.monotonic() < deadline:
        if socket_s is None and sock.exists():
            socket_s = time.monotonic() - start
        if socket_s is not None and b"vscsi: serving" in log.read_bytes():
            return socket_s, time.monotonic() - start
        if proc.poll() is not None:
            raise SystemExit(f"vscsi up exited {proc.returncode}: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    raise SystemExit(f"vscsi up did not serve {LUNS} volumes within {deadline - start:.0f} s")


def served_disks(sock: Path) -> list[str]:
    """Every volume's /dev/sdX, in volume order; each must serve and exist."""
    vols = request(str(sock), "status")["volumes"]
    disks = [str(v.get("sd") or "") for v in vols]
    bad = [v["name"] for v, d in zip(vols, disks, strict=True)
           if v["state"] != "serving" or not d or not Path(d).exists()]  # fmt: skip
    if len(vols) != LUNS or bad:
        raise SystemExit(f"{len(vols)} volumes, not serving or without a disk: {bad}")
    return disks


@contextmanager
def spying(pid: int, name: str, idle: bool = False) -> Iterator[None]:
    """With PROFILE, py-spy samples `pid` over the body (`idle`: waiting threads too) and its
    summary (bench.profile) is printed and saved as scale-NAME.summary."""
    if not PROFILE:
        yield
        return
    raw = OUT / f"scale-{name}.txt"
    spy = subprocess.Popen([PY_SPY, "record", "--pid", str(pid), "--rate", "100", "--threads",
                            "--nonblocking", *(["--idle"] if idle else []), "--format", "raw",
                            "--output", str(raw)], stdout=subprocess.DEVNULL)  # fmt: skip
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes what it has and exits
        spy.wait(120)
        text = summary(raw) if raw.exists() else "py-spy wrote nothing\n"
        (OUT / f"scale-{name}.summary").write_text(text)
        print(f"== py-spy, {name}\n{text}", file=sys.stderr, flush=True)


def thread_us(pid: int) -> dict[str, float]:
    """utime+stime of each live thread of `pid`, µs."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found[task.name] = process_us(pid, int(task.name))
    return found


def idle_cpu(pid: int) -> tuple[float, CpuUse, str]:
    """The daemon's CPU µs per second over IDLE_SECONDS with no I/O, the VM's use, and which
    of its threads ran."""
    time.sleep(SETTLE_SECONDS)
    threads = thread_us(pid)
    before = process_us(pid)
    with measured() as vm:
        time.sleep(IDLE_SECONDS)
    used = (process_us(pid) - before) / IDLE_SECONDS
    ran = sorted(((us - threads.get(tid, 0.0)) / IDLE_SECONDS, tid)
                 for tid, us in thread_us(pid).items() if us > threads.get(tid, 0.0))  # fmt: skip
    top = ", ".join(f"{tid} {us / 1000:.1f}" for us, tid in ran[::-1][:3])
    return used, vm, f"{len(ran)} of {len(threads)} threads ran (busiest, ms/s: {top or '-'})"


def fio(disks: list[str], rw: str, spy_pid: int | None = None) -> tuple[float, CpuUse]:
    """Summed IOPS of one 4 KiB QD16 job per disk (one fio, group reporting), and the VM's
    CPU use over the run (with PROFILE, py-spy samples `spy_pid` during it)."""
    cmd = ["fio", "--ioengine=libaio", "--direct=1", f"--rw={rw}", "--bs=4k", "--iodepth=16",
           f"--runtime={RUNTIME}", "--time_based", "--randrepeat=0", "--group_reporting",
           "--output-format=json"]  # fmt: skip
    for i, disk in enumerate(disks):
        cmd += [f"--name=j{i}", f"--filename={disk}"]
    with measured() as use:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if spy_pid is not None:
            time.sleep(1)  # past fio's start-up
            with spying(spy_pid, f"busy{len(disks)}-{rw}"):
                time.sleep(RUNTIME - 2)
        stdout, stderr = p.communicate()
    if p.returncode != 0:
        print(f"fio {rw} on {len(disks)} LUN(s) failed: {stderr.strip()[:300]}",
              file=sys.stderr)  # fmt: skip
        return float("nan"), use
    side = json.loads(stdout)["jobs"][0]["read" if "read" in rw else "write"]
    return float(side["iops"]), use


def scale_table(d: Daemon, idle: tuple[float, CpuUse, str],
                runs: dict[str, dict[int, tuple[float, CpuUse]]]) -> str:  # fmt: skip
    idle_us, idle_vm, ran = idle
    head = [
        f"one vscsi daemon, {LUNS} LUNs of {VOLUME_SIZE >> 20} MiB through tcm_loop",
        f"- `vscsi up` until all {LUNS} serve with their /dev/sdX: {d.attach_s:.1f} s; of "
        f"which {d.startup_s:.1f} s until its control socket exists (interpreter, imports, "
        f"config, stores) and {d.attach_s - d.startup_s:.1f} s attaching "
        f"({1000 * (d.attach_s - d.startup_s) / LUNS:.0f} ms per LUN)",
        f"- SIGTERM until it has removed all {LUNS} and exited: {d.stop_s:.1f} s",
        f"- all {LUNS} idle for {IDLE_SECONDS} s: daemon CPU {idle_us / 1000:.1f} ms/s "
        f"({idle_us / 1e4:.2f}% of one vCPU; {ran}); whole VM {idle_vm.share:.1%} of both "
        "vCPUs (/proc/stat samples at each tick and misses short wake-ups)",
        "",
        f"| fio 4 KiB, QD16 per LUN, {RUNTIME}s | 1 busy LUN | {BUSY} busy LUNs | "
        f"{BUSY}/1 (target ≥ {TARGET}x) | VM CPU µs/IO, 1 | VM CPU µs/IO, {BUSY} |",
        "|---|---|---|---|---|---|",
    ]
    for job, _ in JOBS:
        (one, one_cpu), (many, many_cpu) = runs[job][1], runs[job][BUSY]
        head.append(
            f"| {job} | {one:,.0f} | {many:,.0f} | {many / one:.2f}x | "
            f"{one_cpu.per_io(one * RUNTIME):,.0f} ({one_cpu.share:.0%}) | "
            f"{many_cpu.per_io(many * RUNTIME):,.0f} ({many_cpu.share:.0%}) |"
        )
    head.append("(in brackets: the share of both vCPUs busy during the run)")
    return "\n".join(head)


def main() -> None:
    configfs.prepare_kernel()
    runs: dict[str, dict[int, tuple[float, CpuUse]]] = {}
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        # a tmpfs of its own: the VM's /tmp sits on a small /run
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1G", "tmpfs", tmp], check=True)
        try:
            with daemon(Path(tmp)) as d:
                print(f"== scale: {LUNS} LUNs attached in {d.attach_s:.1f} s", file=sys.stderr)
                idle = idle_cpu(d.proc.pid)
                if PROFILE:
                    with spying(d.proc.pid, "idle"):
                        time.sleep(IDLE_SECONDS)
                spy = d.proc.pid if PROFILE else None
                for job, rw in JOBS:
                    runs[job] = {n: fio(d.disks[:n], rw, spy) for n in (1, BUSY)}
                    print(f"{job}: " + json.dumps({n: r[0] for n, r in runs[job].items()}),
                          file=sys.stderr, flush=True)  # fmt: skip
        finally:
            subprocess.run(["umount", tmp], check=False)
    text = scale_table(d, idle, runs)
    print("\n" + text)
    out = os.environ.get("VSCSI_VM_OUT")
    if out:
        Path(out, "bench-scale.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
