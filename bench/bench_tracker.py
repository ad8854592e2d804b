"""Dirty-tracker benchmark: vscsi's C DirtyMap against numpy, pyroaring and bitarray.

Workloads (1 TiB volume, 64 KiB grains): 1,000,000 random 4 KiB writes; and a sparse one of
1,000 sequential streams of 1,000 writes each. Every number is the best of a few runs; ``ratio``
is vscsi / target for times (<= 1 meets the target) and target / vscsi for throughput.
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
from bitarray import bitarray
from bitarray.util import intervals
from pyroaring import BitMap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vscsi.tracker import DirtyMap, WriteIntentLog

SIZE, GRAIN, SHIFT, N = 1 << 40, 1 << 16, 16, 1_000_000
NBITS = SIZE >> SHIFT
T = TypeVar("T")


def best(fn: Callable[[], object], repeat: int = 5) -> float:
    """Best wall time of `repeat` runs, in seconds."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def workloads() -> dict[str, np.ndarray]:
    rnd = np.random.default_rng(42)
    dense = rnd.integers(0, SIZE >> 12, N, dtype=np.uint64) << np.uint64(12)
    starts = rnd.integers(0, (SIZE - (4 << 20)) >> SHIFT, 1000, dtype=np.uint64) << np.uint64(SHIFT)
    steps = np.arange(1000, dtype=np.uint64) << np.uint64(12)
    sparse = (steps[:, None] + starts[None, :]).ravel()  # streams interleaved write by write
    return {"dense": dense, "sparse": sparse}


# -- the same work in each library --------------------------------------------------------------


def vscsi_map(offs: np.ndarray, lens: np.ndarray) -> DirtyMap:
    m = DirtyMap(SIZE, GRAIN)
    m.mark_many(offs, lens)
    return m


def numpy_map(offs: np.ndarray) -> np.ndarray:
    bits = np.zeros(NBITS, dtype=np.bool_)
    bits[offs >> np.uint64(SHIFT)] = True
    return bits


def roaring_map(offs: np.ndarray) -> BitMap:
    return BitMap((offs >> np.uint64(SHIFT)).astype(np.uint32))


def bitarray_map(offs: np.ndarray) -> bitarray:
    bits = bitarray(NBITS)
    bits.setall(0)
    bits[(offs >> np.uint64(SHIFT)).tolist()] = 1
    return bits


def runs_from_sorted(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coalesced byte extents from sorted grain indices (what numpy and pyroaring need)."""
    if not len(idx):
        return idx, idx
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    firsts = idx[np.r_[0, breaks]]
    lasts = idx[np.r_[breaks - 1, len(idx) - 1]]
    return firsts << SHIFT, (lasts - firsts + 1) << SHIFT


def bitarray_runs(bits: bitarray) -> list[tuple[int, int]]:
    return [(s << SHIFT, (e - s) << SHIFT) for v, s, e in intervals(bits) if v]


# -- rows -----------------------------------------------------------------------------------


def best_fresh(setup: Callable[[], T], work: Callable[[T], object], repeat: int = 5) -> float:
    """Best time of `work` on a fresh, already-faulted structure from `setup` (not timed)."""
    times = []
    for _ in range(repeat):
        fresh = setup()
        t = time.perf_counter()
        work(fresh)
        times.append(time.perf_counter() - t)
    return min(times)


def empty_map() -> DirtyMap:
    m = DirtyMap(SIZE, GRAIN)
    m.mark(0, SIZE)  # fault the bitmap in, as numpy's and bitarray's are below
    m.clear(0, SIZE)
    return m


def empty_bits() -> np.ndarray:
    return np.ones(NBITS, dtype=np.bool_) & False


def empty_bitarray() -> bitarray:
    bits = bitarray(NBITS)
    bits.setall(0)
    return bits


def row_mark_many(offs: np.ndarray) -> list[float]:
    """Marking 1M writes into an empty structure; allocating it is not timed for anyone."""
    lens = np.full(len(offs), 4096, dtype=np.uint64)
    idx = offs >> np.uint64(SHIFT)

    def bits_set(bits: np.ndarray) -> None:
        bits[offs >> np.uint64(SHIFT)] = True

    def ba_set(bits: bitarray) -> None:
        bits[(offs >> np.uint64(SHIFT)).tolist()] = 1

    per = 1e9 / len(offs)
    return [
        best_fresh(empty_map, lambda m: m.mark_many(offs, lens)) * per,
        best_fresh(empty_bits, bits_set) * per,
        best(lambda: BitMap(idx.astype(np.uint32)), 3) * per,
        best_fresh(empty_bitarray, ba_set, 3) * per,
    ]


def per_call(fn: Callable[[int], object], offsets: list[int]) -> float:
    def loop() -> None:
        for o in offsets:
            fn(o)

    return best(loop) * 1e9 / len(offsets)


def row_mark_one(offs: np.ndarray) -> list[float]:
    sample = offs[:200_000].tolist()
    m = DirtyMap(SIZE, GRAIN)
    mark = m.mark
    bits = np.zeros(NBITS, dtype=np.bool_)
    roaring = BitMap()
    ba = bitarray(NBITS)
    ba.setall(0)

    def np_set(o: int) -> None:
        bits[o >> SHIFT] = True

    def ba_set(o: int) -> None:
        ba[o >> SHIFT] = 1

    return [
        per_call(lambda o: mark(o, 4096), sample),
        per_call(np_set, sample),
        per_call(lambda o: roaring.add(o >> SHIFT), sample),
        per_call(ba_set, sample),
    ]


def row_extents(offs: np.ndarray) -> tuple[list[float], int]:
    lens = np.full(len(offs), 4096, dtype=np.uint64)
    m = vscsi_map(offs, lens)
    bits, roaring, ba = numpy_map(offs), roaring_map(offs), bitarray_map(offs)
    got = m.extents_array()
    expect = runs_from_sorted(np.flatnonzero(bits).astype(np.uint64))
    assert np.array_equal(np.frombuffer(got[0], np.uint64), expect[0]), "extents differ"
    assert np.array_equal(np.frombuffer(got[1], np.uint64), expect[1]), "extents differ"
    ms = 1e3
    return [
        best(m.extents_array, 7) * ms,
        best(lambda: runs_from_sorted(np.flatnonzero(bits).astype(np.uint64)), 3) * ms,
        best(lambda: runs_from_sorted(np.asarray(roaring.to_array(), np.uint64)), 3) * ms,
        best(lambda: bitarray_runs(ba), 3) * ms,
    ], len(got[0])


def row_memory(offs: np.ndarray) -> list[float]:
    lens = np.full(len(offs), 4096, dtype=np.uint64)
    mib = 1 / (1 << 20)
    return [
        vscsi_map(offs, lens).nbytes * mib,
        numpy_map(offs).nbytes * mib,
        len(roaring_map(offs).serialize()) * mib,
        bitarray_map(offs).nbytes * mib,
    ]


def wil_pairs_per_second(threads: int = 8, per_thread: int = 25_000) -> float:
    """8 threads, random 4 KiB writes into a 4 GiB hot area of the volume (1,024 regions)."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        log = WriteIntentLog(os.path.join(tmp, "wil"), SIZE, idle_delay=5.0)
        hot = 4 << 30
        plans = [
            [random.Random(k * 7 + i).randrange(hot >> 12) << 12 for i in range(per_thread)]
            for k in range(threads)
        ]
        go = threading.Barrier(threads + 1)

        def work(plan: list[int]) -> None:
            begin, end = log.begin, log.end
            go.wait()
            for o in plan:
                begin(o, 4096)
                end(o, 4096)

        pool = [threading.Thread(target=work, args=(p,)) for p in plans]
        for t in pool:
            t.start()
        go.wait()
        t0 = time.perf_counter()
        for t in pool:
            t.join()
        elapsed = time.perf_counter() - t0
        log.close()
    return threads * per_thread / elapsed


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if v >= 1000 else f"{v:.3g}"


def main() -> None:
    w = workloads()
    table: list[tuple[str, list[float | None], float, bool]] = []
    table.append(("mark_many, ns/write", row_mark_many(w["dense"]), 3.5, False))
    table.append(("mark (one call), ns", row_mark_one(w["dense"]), 200, False))
    dense, nd = row_extents(w["dense"])
    table.append((f"extents_array dense ({nd:,} runs), ms", [*dense], 5.0, False))
    sparse, ns = row_extents(w["sparse"])
    table.append((f"extents_array sparse ({ns:,} runs), ms", [*sparse], 0.3, False))
    table.append(("memory, MiB", [*row_memory(w["dense"])], 1.1 * 2, False))
    table.append(
        (
            "WIL begin+end, pairs/s (8 thr)",
            [wil_pairs_per_second(), None, None, None],
            200_000,
            True,
        )
    )

    head = ["operation", "vscsi", "numpy", "pyroaring", "bitarray", "target", "ratio"]
    rows = [head]
    for name, vals, target, higher in table:
        ratio = target / vals[0] if higher else vals[0] / target
        rows.append([name, *map(fmt, vals), fmt(target), f"{ratio:.2f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for i, r in enumerate(rows):
        cells = (c.ljust(widths[j]) if j == 0 else c.rjust(widths[j]) for j, c in enumerate(r))
        print("  ".join(cells))
        if i == 0:
            print("  ".join("-" * x for x in widths))
    print("ratio: vscsi/target for times and memory, target/vscsi for throughput; <= 1 meets it")


if __name__ == "__main__":
    main()
