"""Shadow set merge benchmark: "a minimerge of a 1 TiB sparse set with 0.01 % of it written
before the crash completes in under 2 s, and a full merge of the same set for comparison".

Three members on sparse files of --size each (in --dir, default a temporary directory). A child
process creates the set, writes 0.01 % of the virtual unit through it (4-64 KiB at random
64 KiB-aligned offsets, fixed seed) and is SIGKILLed while the set is mounted: a real crash.
The log keeps every written region (idle delay of an hour), the worst case for the minimerge.
Writes in flight at the crash that reached one member only are simulated by changing 64 of the
written ranges on the third member behind the set's back. The set is reopened with its
write-intent log (minimerge), checked and closed; then mounted and SIGKILLed again, the same
ranges changed again, and reopened without the log (full merge). Before each timed reopen the
page cache is written back (`sync`), so a merge's closing flush does not pay for writes made
before the crash; reads come from a warm page cache.

Identity is checked completely and cheaply: every range mapped on any member (SEEK_DATA) is
read from all three and compared; everything else is a hole, zeroes, on all of them. `cmp` of
two members would read 2 TiB of holes, so the full merge is the comparison instead; what a
merge that read every byte would take is extrapolated from reading 256 MiB of a member.

    python bench/bench_shadow.py [--size 1TiB] [--dir DIR]
"""

from __future__ import annotations

import argparse
import errno
import multiprocessing as mp
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vscsi.config import parse_size
from vscsi.shadow import AREA, OpKind, ShadowSet, Tuning
from vscsi.store.file import FileVolume

NAMES = ("a", "b", "c")
SEED = 5
FRACTION = 0.0001  # 0.01 % of the virtual unit is written before the crash
SLOT = 64 << 10  # writes start on a slot of their own, so none overlaps another
TORN = 64  # written ranges changed on member c only, as writes in flight at the crash
TUNING = Tuning(log_idle=3600.0)
TARGET = 2.0  # seconds, for the minimerge


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def plan(vsize: int) -> list[tuple[int, bytes]]:
    """The host writes: 0.01 % of the volume in 4-64 KiB pieces at distinct random slots."""
    rnd = random.Random(SEED)
    writes, total, used = [], 0, set()
    while total < vsize * FRACTION:
        slot = rnd.randrange(vsize // SLOT)
        if slot in used:
            continue
        used.add(slot)
        n = rnd.randrange(1, SLOT // 4096 + 1) * 4096
        writes.append((slot * SLOT, rnd.randbytes(n)))
        total += n
    return writes


def volumes(root: Path, size: int) -> list[FileVolume]:
    return [FileVolume(n, str(root / f"{n}.img"), size=size, create=True) for n in NAMES]


def open_set(root: Path, size: int, wil: bool) -> ShadowSet:
    return ShadowSet.open("dsa1", volumes(root, size), state_dir=root / "state", wil=wil,
                          tuning=TUNING)  # fmt: skip


def crashed(root: Path, work: Callable[[Connection], None]) -> list[float]:
    """Run `work` in a child process and SIGKILL it once it has sent its timings."""
    recv, send = mp.get_context("fork").Pipe(duplex=False)
    child = mp.get_context("fork").Process(target=work, args=(send,))
    child.start()
    if not recv.poll(3600):
        child.kill()
        raise SystemExit("the writer did not finish within an hour")
    times: list[float] = recv.recv()
    child.kill()  # SIGKILL
    child.join()
    assert child.exitcode == -signal.SIGKILL
    return times


def write_and_hang(root: Path, size: int, writes: list[tuple[int, bytes]], out: Connection) -> None:
    """The first crash: create the set (initial copies), write through it, wait for SIGKILL."""
    t0 = time.perf_counter()
    s = ShadowSet.create("dsa1", volumes(root, size), state_dir=root / "state", tuning=TUNING)
    s.wait()
    t1 = time.perf_counter()
    for off, buf in writes:
        s.write(off, [memoryview(buf)])
    out.send([t1 - t0, time.perf_counter() - t1, s.stats.copied, s.stats.copy_skipped])
    time.sleep(3600)


def mount_and_hang(root: Path, size: int, out: Connection) -> None:
    """The second crash: the set mounted (not clean) without a log, then SIGKILL."""
    s = open_set(root, size, wil=False)
    s.wait()
    out.send([])
    time.sleep(3600)


def tear(root: Path, writes: list[tuple[int, bytes]], rnd: random.Random) -> None:
    """Writes in flight at the crash that reached member c only."""
    with open(root / "c.img", "r+b") as f:
        for off, buf in rnd.sample(writes, min(TORN, len(writes))):
            os.pwrite(f.fileno(), rnd.randbytes(min(len(buf), 4096)), off)


def data_extents(path: Path, end: int) -> Iterator[tuple[int, int]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while pos < end:
            try:
                pos = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    return
                raise
            hole = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
            if pos < hole:
                yield pos, hole - pos
            pos = hole
    finally:
        os.close(fd)


def check_identical(root: Path, vsize: int, writes: list[tuple[int, bytes]]) -> int:
    """Every byte mapped on some member is equal on all three, and the host's writes are
    there (the merge master is a, which c's torn ranges never touched). Returns the bytes
    compared."""
    marks: list[tuple[int, int]] = []
    for n in NAMES:
        for off, length in data_extents(root / f"{n}.img", vsize):
            marks += [(off, 1), (off + length, -1)]
    fds = [os.open(root / f"{n}.img", os.O_RDONLY) for n in NAMES]
    compared = 0
    try:
        depth, start = 0, 0
        for pos, step in sorted(marks, key=lambda m: (m[0], -m[1])):
            if depth == 0 and step > 0:
                start = pos
            depth += step
            if depth == 0:
                compared += compare(fds, start, pos)
        for off, buf in writes:
            got = os.pread(fds[0], len(buf), off)
            assert got == buf, f"host write at {off} lost"
    finally:
        for fd in fds:
            os.close(fd)
    return compared


def compare(fds: list[int], start: int, end: int) -> int:
    for p in range(start, end, 1 << 20):
        n = min(1 << 20, end - p)
        first, *rest = (os.pread(fd, n, p) for fd in fds)
        assert all(r == first for r in rest), f"members differ at {p} (+{n})"
    return end - start


def read_everything_estimate(root: Path, vsize: int) -> float:
    """Seconds a merge reading every byte of the three members would take at least, from the
    time to read the first 256 MiB of member a (mostly holes, as the whole member is)."""
    n = min(vsize, 256 << 20)
    buf = bytearray(1 << 20)
    fd = os.open(root / "a.img", os.O_RDONLY)
    try:
        t = time.perf_counter()
        for p in range(0, n, len(buf)):
            os.preadv(fd, [buf], p)
        return (time.perf_counter() - t) * len(NAMES) * vsize / n
    finally:
        os.close(fd)


def timed_merge(root: Path, size: int, wil: bool) -> tuple[float, ShadowSet]:
    os.sync()
    t = time.perf_counter()
    s = open_set(root, size, wil)
    assert s.wait(3600)
    elapsed = time.perf_counter() - t
    expected = OpKind.MINIMERGE if wil else OpKind.MERGE
    assert s.stats.finished == [(expected, None)], s.stats.finished
    return elapsed, s


def merge_cell(s: ShadowSet) -> str:
    st = s.stats
    return (f"{human(st.merge_scanned)} compared, {human(st.merge_skipped)} skipped as holes, "
            f"{human(st.merge_written)} rewritten")  # fmt: skip


def run(root: Path, size: int) -> None:
    vsize = size - AREA
    writes = plan(vsize)
    written = sum(len(b) for _, b in writes)
    rnd = random.Random(SEED + 1)

    create_s, write_s, copied, skipped = crashed(
        root, lambda out: write_and_hang(root, size, writes, out)
    )
    tear(root, writes, rnd)
    mini_s, s = timed_merge(root, size, wil=True)
    assert s.log_valid
    mini_cell = merge_cell(s)
    s.close()
    checked = check_identical(root, vsize, writes)

    crashed(root, lambda out: mount_and_hang(root, size, out))
    tear(root, writes, rnd)
    full_s, s = timed_merge(root, size, wil=False)
    full_cell = merge_cell(s)
    s.close()
    check_identical(root, vsize, writes)
    everything_s = read_everything_estimate(root, vsize)

    print(f"3 members on sparse files of {human(size)} in {root}; {len(writes)} writes, "
          f"{human(written)} ({written / vsize:.4%}) written before the crash; "
          f"{min(TORN, len(writes))} of them torn on member c at each crash")  # fmt: skip
    print()
    print("| operation | seconds | bytes merged/scanned | vs full merge |")
    print("|---|---:|---|---:|")
    print(f"| create (2 initial copies) | {create_s:.2f} | {human(copied)} copied, "
          f"{human(skipped)} skipped as holes | |")  # fmt: skip
    print(f"| {len(writes)} writes through the set | {write_s:.2f} | {human(written)} | |")
    print(f"| minimerge (write-intent log) | {mini_s:.2f} | {mini_cell} | "
          f"{mini_s / full_s:.2f}x |")  # fmt: skip
    print(f"| full merge (no log) | {full_s:.2f} | {full_cell} | 1.00x |")
    print(f"| merge reading every byte (extrapolated, not run) | {everything_s:.0f} | "
          f"{human(len(NAMES) * vsize)} read | {everything_s / full_s:.0f}x |")  # fmt: skip
    print()
    print(
        f"members identical after each merge: {human(checked)} mapped on some member "
        "compared on all three, the rest holes on all"
    )
    print(f"target: minimerge < {TARGET:.0f} s: {'met' if mini_s < TARGET else 'missed'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1TiB", help="size of each member file (default 1TiB)")
    ap.add_argument("--dir", type=Path, help="where the member files go (default a tempdir)")
    args = ap.parse_args()
    size = parse_size(args.size, "--size")
    root = Path(tempfile.mkdtemp(prefix="bench-shadow-", dir=args.dir))
    try:
        run(root, size)
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
