"""`make bench`, inside one VM boot: fio against LIO fileio, tcmu-runner (qcow) and vscsi.

Every backend sits behind tcm_loop on the same kind of backing store (a file on the VM's tmpfs)
and runs the same fio jobs; the table gives each result as a ratio to LIO's in-kernel fileio
(no userspace hop: the ceiling). A second table runs the write jobs on a vscsi P-VOL in PAIR
(every write mirrored to a local S-VOL before it is acknowledged) next to simplex vscsi.
Absolute numbers mean nothing across machines.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import rtslib_fb

from vscsi.tcmu import configfs

SIZE = 256 << 20
RUNTIME = int(os.environ.get("VSCSI_BENCH_RUNTIME", "8"))
VSCSI = str(Path(sys.executable).with_name("vscsi"))
JOBS: list[tuple[str, str, str, int]] = [
    ("seq write 1M QD4", "write", "1M", 4),
    ("seq read 1M QD4", "read", "1M", 4),
    ("randread 4K QD1", "randread", "4k", 1),
    ("randread 4K QD16", "randread", "4k", 16),
    ("randwrite 4K QD1", "randwrite", "4k", 1),
    ("randwrite 4K QD16", "randwrite", "4k", 16),
]

PAIR_JOBS = [job for job in JOBS if "write" in job[1]]


def fio(dev: str, rw: str, bs: str, qd: int) -> float:
    """IOPS of one fio job (sequential jobs also report IOPS; MiB/s = IOPS for 1M); NaN when
    the backend fails the job (the table shows it rather than hiding the backend)."""
    cmd = [
        "fio", "--name=b", f"--filename={dev}", "--ioengine=libaio", "--direct=1",
        f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}", f"--size={SIZE}",
        f"--runtime={RUNTIME}", "--time_based", "--output-format=json", "--randrepeat=0",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        print(f"fio {rw} {bs} failed on {dev}: {p.stderr.strip()[:300]}", file=sys.stderr)
        return float("nan")
    job = json.loads(p.stdout)["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return float(side["iops"])


def run_jobs(dev: str, jobs: list[tuple[str, str, str, int]]) -> dict[str, float]:
    return {name: fio(dev, rw, bs, qd) for name, rw, bs, qd in jobs}


@contextmanager
def loop_export(so: rtslib_fb.StorageObject) -> Iterator[str]:
    target = rtslib_fb.Target(rtslib_fb.FabricModule("loopback"))
    tpg = rtslib_fb.TPG(target, 1)
    rtslib_fb.LUN(tpg, 0, so)
    try:
        yield configfs.find_disk(configfs.LoopExport(target.wwn, target), timeout=60)[0]
    finally:
        target.delete()


@contextmanager
def fileio_backend(work: Path) -> Iterator[str]:
    img = work / "fileio.img"
    so = rtslib_fb.FileIOStorageObject("bench_fileio", str(img), size=SIZE, write_back=True)
    try:
        with loop_export(so) as dev:
            yield dev
    finally:
        so.delete()
        img.unlink(missing_ok=True)


@contextmanager
def tcmu_runner_backend(work: Path) -> Iterator[str]:
    img = work / "bench.qcow2"
    # preallocated: the qcow handler cannot allocate clusters on tmpfs (no fallocate mode)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=full",
                    str(img), str(SIZE)], check=True)
    log = (work / "tcmu-runner.log").open("w")
    runner = subprocess.Popen(["tcmu-runner"], stdout=log, stderr=subprocess.STDOUT)
    time.sleep(2)
    so = rtslib_fb.UserBackedStorageObject("bench_qcow", config=f"qcow/{img}", size=SIZE)
    try:
        with loop_export(so) as dev:
            yield dev
    finally:
        so.delete()
        runner.send_signal(signal.SIGTERM)
        runner.wait(30)
        print(subprocess.run(["tail", "-5", "/var/log/tcmu-runner.log"], capture_output=True,
                             text=True).stdout, file=sys.stderr)
        img.unlink(missing_ok=True)


@contextmanager
def vscsi_backend(work: Path) -> Iterator[str]:
    with vscsi_daemon(work, 'name = "bench"\npath = "vscsi.img"') as (_, dev):
        yield dev


@contextmanager
def vscsi_pair_backend(work: Path) -> Iterator[str]:
    """A P-VOL in PAIR with an unexported S-VOL on the same tmpfs (ShadowImage-style)."""
    vols = 'name = "pv"\npath = "pv.img"\n[[volume]]\nname = "sv"\npath = "sv.img"\n'
    with vscsi_daemon(work, vols + 'export = "none"') as (sock, dev):
        subprocess.run([VSCSI, "pair", "create", "pv", "sv", "--mu", "0", "--wait", "600",
                        "--socket", str(sock)], check=True, stdout=subprocess.DEVNULL)
        yield dev


@contextmanager
def vscsi_daemon(work: Path, volumes: str) -> Iterator[tuple[Path, str]]:
    """`vscsi up` over `volumes` (TOML [[volume]] bodies, SIZE each); yields the socket and
    the first volume's disk, and removes the backing files afterwards."""
    sock = work / "bench.sock"
    cfg = work / "bench.toml"
    body = volumes.replace("\n[[volume]]\n", f"\nsize = {SIZE}\ncreate = true\n[[volume]]\n")
    cfg.write_text(
        f'[daemon]\nsocket = "{sock}"\nstate_dir = "state"\n[[volume]]\n{body}\n'
        f"size = {SIZE}\ncreate = true\n"
    )
    proc = subprocess.Popen([VSCSI, "up", "-c", str(cfg)], stdout=subprocess.DEVNULL)
    try:
        yield sock, wait_served(sock, proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        for img in work.glob("*.img"):
            img.unlink()


def wait_served(sock: Path, proc: subprocess.Popen[bytes]) -> str:
    for _ in range(240):
        if proc.poll() is not None:
            raise SystemExit(f"vscsi up exited {proc.returncode}")
        p = subprocess.run([VSCSI, "status", "--json", "--socket", str(sock)],
                           capture_output=True, text=True)
        if p.returncode == 0:
            vol = json.loads(p.stdout)["volumes"][0]
            if vol.get("sd"):
                return str(vol["sd"])
        time.sleep(0.5)
    raise SystemExit("vscsi did not serve its volume in time")


def table(results: dict[str, dict[str, float]]) -> str:
    names = [n for n in results if n != "vscsi-pair"]
    head = f"| job | {' | '.join(names)} | " + " | ".join(f"{n}/fileio" for n in names[1:])
    head += " | vscsi/tcmu-runner |"
    lines = [head, "|" + "---|" * (len(names) * 2 + 1)]
    for job, *_ in JOBS:
        base = results["fileio"][job]
        cells = [f"{results[n][job]:,.0f}" for n in names]
        ratios = [f"{results[n][job] / base:.2f}x" for n in names[1:]]
        vr = results["vscsi"][job] / results["tcmu-runner"][job]
        lines.append(f"| {job} | {' | '.join(cells)} | {' | '.join(ratios)} | {vr:.2f}x |")
    return "\n".join(lines)


def pair_table(results: dict[str, dict[str, float]]) -> str:
    lines = ["| job | vscsi simplex | vscsi PAIR | PAIR/simplex |", "|---|---|---|---|"]
    for job, *_ in PAIR_JOBS:
        simplex, paired = results["vscsi"][job], results["vscsi-pair"][job]
        lines.append(f"| {job} | {simplex:,.0f} | {paired:,.0f} | {paired / simplex:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    configfs.prepare_kernel()
    backends: dict[str, Callable[[Path], object]] = {
        "fileio": fileio_backend,
        "tcmu-runner": tcmu_runner_backend,
        "vscsi": vscsi_backend,
        "vscsi-pair": vscsi_pair_backend,
    }
    only = os.environ.get("VSCSI_BENCH_ONLY")
    if only:
        backends = {only: backends[only]}
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        # a tmpfs of its own: the VM's /tmp sits on a small /run and would fill up
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1G", "tmpfs", tmp], check=True)
        try:
            for name, backend in backends.items():
                print(f"== {name}", file=sys.stderr, flush=True)
                with backend(Path(tmp)) as dev:  # type: ignore[attr-defined]
                    results[name] = run_jobs(dev, PAIR_JOBS if name == "vscsi-pair" else JOBS)
                print(json.dumps(results[name]), file=sys.stderr, flush=True)
        finally:
            subprocess.run(["umount", tmp], check=False)
    if only:
        return
    print()
    print(f"fio, libaio, direct, {RUNTIME}s per job, IOPS (1M jobs: MiB/s)")
    print(table(results))
    print()
    print("mirrored writes: a P-VOL in PAIR (local S-VOL) against simplex")
    print(pair_table(results))
    out = os.environ.get("VSCSI_VM_OUT")
    if out:
        Path(out, "bench.md").write_text(table(results) + "\n\n" + pair_table(results) + "\n")


if __name__ == "__main__":
    main()
