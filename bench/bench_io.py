"""`make bench`, inside one VM boot: fio against LIO fileio, tcmu-runner (qcow) and vscsi.

Every backend sits behind tcm_loop on the same kind of backing store (a file on the VM's tmpfs)
and runs the same fio jobs; the table gives each result as a ratio to LIO's in-kernel fileio
(no userspace hop: the ceiling). A second table runs the write jobs on a vscsi P-VOL in PAIR
(every write mirrored before it is acknowledged) next to simplex vscsi: with a local S-VOL
(ShadowImage-style), and with an S-VOL on a second daemon (a remote array) whose link runs over
a veth pair between two network namespaces (TrueCopy-style). A third sets vscsi's own ring
against the same volume served through libtcmu.so.2 (`transport = "libtcmu"`).
Every backing file is written in full before its backend starts (tcmu-runner's qcow image is
created preallocated), so no job measures tmpfs allocating pages: a first write to a tmpfs page
costs about four times a rewrite here, and a pair would pay it on two files.

The backends take turns in rounds (VSCSI_BENCH_ROUNDS, 3 by default), every other round in
reverse order, and the tables give each job's median over the rounds. An emulated VM's speed
drifts by up to 3x over minutes with the host's load; measured once each, in a fixed order, the
backends met different machines and their ratios said nothing. A last table lists every round.
Absolute numbers mean nothing across machines.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import rtslib_fb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, too

from bench import bench_link
from bench.cpu import CpuUse, measured
from vscsi.control import ControlError, request
from vscsi.tcmu import configfs

SIZE = 256 << 20
RUNTIME = int(os.environ.get("VSCSI_BENCH_RUNTIME", "8"))
ROUNDS = int(os.environ.get("VSCSI_BENCH_ROUNDS", "3"))
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
        "fio",
        "--name=b",
        f"--filename={dev}",
        "--ioengine=libaio",
        "--direct=1",
        f"--rw={rw}",
        f"--bs={bs}",
        f"--iodepth={qd}",
        f"--size={SIZE}",
        f"--runtime={RUNTIME}",
        "--time_based",
        "--output-format=json",
        "--randrepeat=0",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        print(f"fio {rw} {bs} failed on {dev}: {p.stderr.strip()[:300]}", file=sys.stderr)
        return float("nan")
    job = json.loads(p.stdout)["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return float(side["iops"])


def allocated(path: Path) -> Path:
    """`path` made SIZE bytes of zeroes written (every page present, as on a disk)."""
    block = bytes(1 << 20)
    with path.open("wb") as f:
        for _ in range(SIZE // len(block)):
            f.write(block)
    return path


@dataclass
class Runs:
    """One backend's jobs over every round: each job's IOPS per round, the VM's CPU use and,
    for a vscsi backend, (commands, compiled) counts, both summed over the rounds."""

    iops: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, CpuUse] = field(default_factory=dict)
    served: dict[str, tuple[int, int]] = field(default_factory=dict)

    def median(self) -> dict[str, float]:
        """Each job's median over the rounds fio completed (NaN when it failed in every one)."""
        done = {job: [x for x in rates if not math.isnan(x)] for job, rates in self.iops.items()}
        return {job: statistics.median(xs) if xs else math.nan for job, xs in done.items()}

    def compiled(self) -> dict[str, float]:
        """The share of each job's commands that the compiled path answered."""
        return {job: done / n for job, (n, done) in self.served.items() if n}


def run_jobs(dev: str, jobs: list[tuple[str, str, str, int]], work: Path, runs: Runs) -> None:
    """Each job once, added to `runs`."""
    for name, rw, bs, qd in jobs:
        before = served_counts(work, dev)
        with measured() as use:
            rate = fio(dev, rw, bs, qd)
        after = served_counts(work, dev)
        runs.iops.setdefault(name, []).append(rate)
        runs.cpu[name] = runs.cpu.get(name, CpuUse()) + use
        if before and after:
            n, done = runs.served.get(name, (0, 0))
            runs.served[name] = (n + after[0] - before[0], done + after[1] - before[1])


def served_counts(work: Path, dev: str) -> tuple[int, int] | None:
    """(commands, compiled) of the vscsi volume whose disk is `dev`; None for other backends."""
    for sock in work.glob("*.sock"):
        with contextlib.suppress(ControlError):
            for v in request(str(sock), "status")["volumes"]:
                if v.get("sd") == dev:
                    return v["commands"], v["compiled"]
    return None


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
    img = allocated(work / "fileio.img")
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
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "preallocation=full",
            str(img),
            str(SIZE),
        ],
        check=True,
    )
    log = (work / "tcmu-runner.log").open("w")
    runner = subprocess.Popen(["tcmu-runner"], stdout=log, stderr=subprocess.STDOUT)
    try:
        so = runner_storage_object("bench_qcow", f"qcow/{img}")
    except BaseException:
        runner.send_signal(signal.SIGTERM)
        runner.wait(30)
        raise
    try:
        with loop_export(so) as dev:
            yield dev
    finally:
        so.delete()
        runner.send_signal(signal.SIGTERM)
        runner.wait(30)
        print(
            subprocess.run(
                ["tail", "-5", "/var/log/tcmu-runner.log"], capture_output=True, text=True
            ).stdout,
            file=sys.stderr,
        )
        img.unlink(missing_ok=True)


def runner_storage_object(name: str, config: str) -> rtslib_fb.UserBackedStorageObject:
    """A backstore of the tcmu-runner just started. Enabled 2 s after tcmu-runner started,
    one failed with EAGAIN in the VM, apparently before tcmu-runner had come up (a fixed
    wait is a guess either way); rtslib removes a backstore that failed to enable, so try
    again each second for up to a minute."""
    deadline = time.monotonic() + 60
    while True:
        time.sleep(1)
        try:
            return rtslib_fb.UserBackedStorageObject(name, config=config, size=SIZE)
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise


@contextmanager
def vscsi_backend(work: Path) -> Iterator[str]:
    with vscsi_daemon(work, 'name = "bench"\npath = "vscsi.img"') as (_, dev):
        yield dev


@contextmanager
def vscsi_python_backend(work: Path) -> Iterator[str]:
    """vscsi with every command served by the Python core: what the compiled path buys."""
    vol = 'name = "bench"\npath = "vscsi.img"'
    with vscsi_daemon(work, vol, daemon="fast_path = false\n") as (_, dev):
        yield dev


@contextmanager
def vscsi_libtcmu_backend(work: Path) -> Iterator[str]:
    """The same volume served through libtcmu.so.2 instead of vscsi's own ring."""
    vol = 'name = "bench"\npath = "vscsi.img"'
    with vscsi_daemon(work, vol, daemon='transport = "libtcmu"\n') as (_, dev):
        yield dev


@contextmanager
def vscsi_pair_backend(work: Path) -> Iterator[str]:
    """A P-VOL in PAIR with an unexported S-VOL on the same tmpfs (ShadowImage-style)."""
    vols = 'name = "pv"\npath = "pv.img"\n[[volume]]\nname = "sv"\npath = "sv.img"\n'
    with vscsi_daemon(work, vols + 'export = "none"') as (sock, dev):
        subprocess.run(
            [
                VSCSI,
                "pair",
                "create",
                "pv",
                "sv",
                "--mu",
                "0",
                "--wait",
                "600",
                "--socket",
                str(sock),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        yield dev


SITES = {  # name: (network namespace, link address, serial)
    "siteA": ("vscsi-bench-a", "10.78.0.1", 420001),
    "siteB": ("vscsi-bench-b", "10.78.0.2", 420002),
}


@contextmanager
def vscsi_remote_backend(work: Path) -> Iterator[str]:
    """A P-VOL in PAIR (fence never) with the S-VOL on a second daemon, a remote array; the
    link (TLS) runs over a veth pair between two network namespaces, one per site."""
    keys = work / "keys"
    for name, (_, _, serial) in SITES.items():
        subprocess.run([VSCSI, "link", "keys", "--dir", str(keys), "--name", name, "--serial",
                        str(serial)], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    s_vol = 'name = "sv"\npath = "sv.img"\nexport = "none"'
    with (
        two_sites(),
        vscsi_daemon(work, s_vol, "b", link(keys, "siteB", "siteA")),
        vscsi_daemon(work, 'name = "pv"\npath = "pv.img"', "a", link(keys, "siteA", "siteB")) as (
            sock,
            dev,
        ),
    ):
        subprocess.run([VSCSI, "pair", "create", "pv", "siteB:sv", "--fence", "never",
                        "--wait", "600", "--socket", str(sock)],
                       check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        yield dev


def link(keys: Path, me: str, peer: str) -> str:
    """The [daemon] link lines and the [[remote]] table of array `me`."""
    ns, addr, _ = SITES[me]
    _, peer_addr, peer_serial = SITES[peer]
    return (f'link_cert = "{keys}/{me}.crt"\nlink_key = "{keys}/{me}.key"\n'
            f'link_listen = "{addr}:7001"\nlink_netns = "{ns}"\n'
            f'[[remote]]\nname = "{peer}"\naddress = "{peer_addr}:7001"\n'
            f'serial = {peer_serial}\npeer_cert = "{keys}/{peer}.crt"\n')  # fmt: skip


@contextmanager
def two_sites() -> Iterator[None]:
    (ns_a, addr_a, _), (ns_b, addr_b, _) = SITES.values()
    for ns in (ns_a, ns_b):
        ip("netns", "add", ns)
    try:
        ip("link", "add", "bA", "netns", ns_a, "type", "veth", "peer", "name", "bB", "netns", ns_b)
        for ns, dev, addr in ((ns_a, "bA", addr_a), (ns_b, "bB", addr_b)):
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
        yield
    finally:
        for ns in (ns_a, ns_b):
            subprocess.run(["ip", "netns", "del", ns], check=False)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


@contextmanager
def vscsi_daemon(
    work: Path, volumes: str, name: str = "bench", daemon: str = ""
) -> Iterator[tuple[Path, str]]:
    """`vscsi up` over `volumes` (TOML [[volume]] bodies, SIZE each) with `daemon` added to its
    [daemon] table; yields the socket and the first volume's disk ("" when not exported), and
    removes the backing files afterwards."""
    sock = work / f"{name}.sock"
    cfg = work / f"{name}.toml"
    for path in re.findall(r'^path = "(.+)"$', volumes, re.MULTILINE):
        allocated(work / path)
    body = volumes.replace("\n[[volume]]\n", f"\nsize = {SIZE}\ncreate = true\n[[volume]]\n")
    cfg.write_text(
        f'[daemon]\nsocket = "{sock}"\nstate_dir = "state-{name}"\n{daemon}[[volume]]\n{body}\n'
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
        with contextlib.suppress(ControlError):
            vol = request(str(sock), "status")["volumes"][0]
            if vol["state"] == "serving" and (vol.get("sd") or vol["export"] == "none"):
                return str(vol.get("sd") or "")
        time.sleep(0.5)
    raise SystemExit("vscsi did not serve its volume in time")


def table(results: dict[str, dict[str, float]]) -> str:
    names = ["fileio", "tcmu-runner", "vscsi"]
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


def side_by_side(
    results: dict[str, dict[str, float]], left: str, right: str, head: str, right_over_left: bool
) -> str:
    """Two backends per job and the ratio of one to the other; `head` names the columns."""
    lines = [head, "|---|---|---|---|"]
    for job, *_ in JOBS:
        a, b = results[left][job], results[right][job]
        ratio = b / a if right_over_left else a / b
        lines.append(f"| {job} | {a:,.0f} | {b:,.0f} | {ratio:.2f}x |")
    return "\n".join(lines)


def cpu_table(runs: dict[str, Runs]) -> str:
    """µs of VM CPU per I/O, and in brackets how busy both vCPUs were, per backend and job
    (every round's CPU over every round's I/Os)."""
    names = list(runs)
    lines = [f"| job | {' | '.join(names)} |", "|" + "---|" * (len(names) + 1)]
    for job, *_ in JOBS:
        cells = []
        for n in names:
            use = runs[n].cpu.get(job)
            ios = sum(runs[n].iops.get(job, [])) * RUNTIME
            cells.append("—" if use is None else f"{use.per_io(ios):,.0f} ({use.share:.0%})")
        lines.append(f"| {job} | {' | '.join(cells)} |")
    return "\n".join(lines)


PAIRED = {"vscsi-pair": "local PAIR", "vscsi-remote": "remote PAIR"}


def pair_table(results: dict[str, dict[str, float]]) -> str:
    kinds = [k for k in PAIRED if k in results]
    head = "| job | vscsi simplex | " + " | ".join(PAIRED[k] for k in kinds)
    head += " | " + " | ".join(f"{PAIRED[k]}/simplex" for k in kinds) + " |"
    lines = [head, "|" + "---|" * (2 * len(kinds) + 2)]
    for job, *_ in PAIR_JOBS:
        simplex = results["vscsi"][job]
        cells = [f"{results[k][job]:,.0f}" for k in kinds]
        ratios = [f"{results[k][job] / simplex:.2f}x" for k in kinds]
        lines.append(f"| {job} | {simplex:,.0f} | {' | '.join(cells)} | {' | '.join(ratios)} |")
    return "\n".join(lines)


def compiled_table(compiled: dict[str, dict[str, float]]) -> str:
    kinds = [k for k, shares in compiled.items() if shares]
    lines = ["| job | " + " | ".join(kinds) + " |", "|" + "---|" * (len(kinds) + 1)]
    for job, *_ in JOBS:
        cells = [f"{compiled[k][job]:.1%}" if job in compiled[k] else "—" for k in kinds]
        lines.append(f"| {job} | {' | '.join(cells)} |")
    return "\n".join(lines)


def rounds_table(runs: dict[str, Runs]) -> str:
    """Every round's IOPS, the medians' spread: backend by backend, job by job."""
    lines = ["| backend | job | " + " | ".join(f"round {i + 1}" for i in range(ROUNDS)) + " |",
             "|" + "---|" * (ROUNDS + 2)]  # fmt: skip
    for name, r in runs.items():
        for job, rates in r.iops.items():
            lines.append(f"| {name} | {job} | " + " | ".join(f"{x:,.0f}" for x in rates) + " |")
    return "\n".join(lines)


def link_table(results: dict[str, dict[str, float]]) -> str:
    """The remote pair against the link alone (bench_link: the same TLS connection between
    two in-process ends, no TCMU, no pair layer, a memory volume), measured here and now."""
    name, mbps = bench_link.cipher_mbps()
    alone = bench_link.link_alone(PAIR_JOBS)
    lines = [f"the link alone (one TLS connection over loopback, memory volume; {name} "
             f"encrypts and decrypts {mbps:,.0f} MB/s on one vCPU), writes/s (1M: MiB/s)",
             "| job | vscsi simplex | link alone | remote PAIR | link alone/simplex "
             "| remote PAIR/link alone |", "|---|---|---|---|---|---|"]  # fmt: skip
    for job, *_ in PAIR_JOBS:
        s, a, r = results["vscsi"][job], alone[job], results["vscsi-remote"][job]
        lines.append(f"| {job} | {s:,.0f} | {a:,.0f} | {r:,.0f} | {a / s:.2f}x | {r / a:.2f}x |")
    return "\n".join(lines)


def turns(names: list[str], round_: int) -> list[str]:
    """The backends' order in a round: as listed, then reversed, and so on, so that a VM
    slowing down (or speeding up) over the run does not favour the backends measured first."""
    return names if round_ % 2 == 0 else names[::-1]


def main() -> None:
    configfs.prepare_kernel()
    backends: dict[str, Callable[[Path], object]] = {
        "fileio": fileio_backend,
        "tcmu-runner": tcmu_runner_backend,
        "vscsi": vscsi_backend,
        "vscsi-python": vscsi_python_backend,
        "vscsi-libtcmu": vscsi_libtcmu_backend,
        "vscsi-pair": vscsi_pair_backend,
        "vscsi-remote": vscsi_remote_backend,
    }
    only = os.environ.get("VSCSI_BENCH_ONLY")  # e.g. "vscsi,vscsi-remote": a part of the run
    if only:
        backends = {name: backends[name] for name in only.split(",")}
    runs = {name: Runs() for name in backends}
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        # a tmpfs of its own: the VM's /tmp sits on a small /run and would fill up
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1G", "tmpfs", tmp], check=True)
        try:
            for i in range(ROUNDS):
                for name in turns(list(backends), i):
                    print(f"== {name}, round {i + 1} of {ROUNDS}", file=sys.stderr, flush=True)
                    # a directory of its own: no state, keys or pair left by the last round
                    work = Path(tmp) / f"{name}-{i + 1}"
                    work.mkdir()
                    try:
                        with backends[name](work) as dev:  # type: ignore[attr-defined]
                            run_jobs(dev, PAIR_JOBS if name in PAIRED else JOBS, work, runs[name])
                    finally:
                        shutil.rmtree(work, ignore_errors=True)
                    print(json.dumps({j: r[-1] for j, r in runs[name].iops.items()}),
                          file=sys.stderr, flush=True)  # fmt: skip
        finally:
            subprocess.run(["umount", tmp], check=False)
    results = {name: r.median() for name, r in runs.items()}
    compiled = {name: r.compiled() for name, r in runs.items()}
    tables = []
    if {"fileio", "tcmu-runner", "vscsi"} <= results.keys():
        tables.append(f"fio, libaio, direct, {RUNTIME}s per job, the median of {ROUNDS} rounds, "
                      "IOPS (1M jobs: MiB/s)\n"
                      + table(results))  # fmt: skip
    if {"vscsi", "vscsi-python"} <= results.keys():
        tables.append("the compiled READ/WRITE path: vscsi with it and without it (fast_path = "
                      "false), IOPS\n" + side_by_side(
                      results, "vscsi", "vscsi-python",
                      "| job | vscsi | vscsi without the compiled path | ratio |",
                      False))  # fmt: skip
    if {"vscsi", "vscsi-libtcmu"} <= results.keys():
        tables.append("vscsi through its own ring and through libtcmu.so.2 (transport = "
                      '"libtcmu"), IOPS (1M jobs: MiB/s)\n' + side_by_side(
                      results, "vscsi", "vscsi-libtcmu",
                      "| job | native ring | libtcmu | libtcmu/native |", True))  # fmt: skip
    if "vscsi" in results and PAIRED.keys() & results.keys():
        tables.append("mirrored writes: a P-VOL in PAIR (local S-VOL; remote S-VOL over veth) "
                      "against simplex, IOPS\n" + pair_table(results))  # fmt: skip
    if "vscsi" in results and "vscsi-remote" in results:
        tables.append(link_table(results))
    if any(compiled.values()):
        tables.append("the share of each job's commands that vscsi's compiled READ/WRITE path "
                      "answered (`vscsi status`: compiled / commands); the rest took the Python "
                      "core\n" + compiled_table(compiled))  # fmt: skip
    if runs:
        tables.append("VM CPU per I/O, µs (1M jobs: per MiB), from /proc/stat over each fio run "
                      "(user+nice+system+irq+softirq of both vCPUs); in brackets the share of "
                      "both vCPUs busy\n" + cpu_table(runs))  # fmt: skip
        tables.append("every round, IOPS (1M jobs: MiB/s); the tables above give the medians\n"
                      + rounds_table(runs))  # fmt: skip
    print("\n" + "\n\n".join(tables))
    out = os.environ.get("VSCSI_VM_OUT")
    if out and tables:
        Path(out, "bench.md").write_text("\n\n".join(tables) + "\n")


if __name__ == "__main__":
    main()
