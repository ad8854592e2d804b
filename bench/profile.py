"""Where a vscsi daemon spends its time under fio: py-spy samples every daemon of one backend of
bench_io.py while one fio job runs, and writes a flame graph (SVG) and a text summary per
daemon. Runs inside the VM (`make profile`); the results land in $VSCSI_VM_OUT.

    VSCSI_PROFILE_BACKEND=vscsi-remote VSCSI_PROFILE_JOB="randwrite 4K QD16" make profile
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from bench import bench_io
from bench.bench_io import JOBS, fio, vscsi_backend, vscsi_pair_backend, vscsi_remote_backend
from vscsi.tcmu import configfs

BACKENDS = {"vscsi": vscsi_backend, "vscsi-pair": vscsi_pair_backend,
            "vscsi-remote": vscsi_remote_backend}  # fmt: skip
SECONDS = int(os.environ.get("VSCSI_PROFILE_SECONDS", "10"))
PY_SPY = str(Path(sys.executable).with_name("py-spy"))


def daemons() -> dict[str, int]:
    """The running `vscsi up` processes by the name of their config (a: the P side)."""
    out = subprocess.run(["pgrep", "-f", "vscsi up -c"], capture_output=True, text=True).stdout
    found = {}
    for pid in out.split():
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        found[Path(cmdline[-2].decode()).stem] = int(pid)
    return found


def record(pid: int, out: Path, fmt: str) -> subprocess.Popen[bytes]:
    """py-spy on `pid`; with VSCSI_PROFILE_IDLE=1 waiting threads are sampled too (to see
    where a request waits, not only where CPU goes)."""
    idle = ["--idle"] if os.environ.get("VSCSI_PROFILE_IDLE") == "1" else []
    return subprocess.Popen([PY_SPY, "record", "--pid", str(pid), "--duration", str(SECONDS),
                             "--rate", "200", "--threads", "--nonblocking", *idle, "--format",
                             fmt, "--output", str(out)], stdout=subprocess.DEVNULL)  # fmt: skip


def summary(raw: Path, top: int = 25) -> str:
    """Per thread its share of the samples, then the functions with the most samples of their
    own and including callees (py-spy leaves threads waiting in the kernel out)."""
    threads: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    within: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        frames = stack.split(";")
        total += n
        threads[frames[0]] += n
        own[frames[-1]] += n
        for f in set(frames[1:]):
            within[f] += n
    if not total:
        return "no samples\n"
    pct = lambda n: f"{100 * n / total:5.1f}%"  # noqa: E731
    lines = [f"{total} samples", "-- threads"]
    lines += [f"{pct(n)} {t}" for t, n in threads.most_common(12)]
    lines += ["-- own time"] + [f"{pct(n)} {f}" for f, n in own.most_common(top)]
    lines += ["-- including callees"] + [f"{pct(n)} {f}" for f, n in within.most_common(top)]
    return "\n".join(lines) + "\n"


def main() -> None:
    backend = BACKENDS[os.environ.get("VSCSI_PROFILE_BACKEND", "vscsi-remote")]
    job = os.environ.get("VSCSI_PROFILE_JOB", "randwrite 4K QD16")
    _, rw, bs, qd = next(j for j in JOBS if j[0] == job)
    out = Path(os.environ.get("VSCSI_VM_OUT", "."))
    bench_io.RUNTIME = SECONDS + 4  # fio outlasts the sampling
    configfs.prepare_kernel()
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1G", "tmpfs", tmp], check=True)
        try:
            with backend(Path(tmp)) as dev:  # type: ignore[operator]
                result: list[float] = []
                load = threading.Thread(target=lambda: result.append(fio(dev, rw, bs, qd)))
                load.start()
                pids = daemons()
                spies = {name: record(pid, out / f"profile-{name}.txt", "raw")
                         for name, pid in pids.items()}  # fmt: skip
                flames = [record(pid, out / f"profile-{name}.svg", "flamegraph")
                          for name, pid in pids.items()]  # fmt: skip
                for p in [*spies.values(), *flames]:
                    p.wait()
                load.join()
        finally:
            subprocess.run(["umount", tmp], check=False)
    print(f"{job}: {result[0]:,.0f} IOPS while sampled")
    for name, pid in pids.items():
        text = summary(out / f"profile-{name}.txt")
        (out / f"profile-{name}.summary").write_text(text)
        print(f"\n== daemon {name} (pid {pid}; flame graph profile-{name}.svg)\n{text}")


if __name__ == "__main__":
    main()
