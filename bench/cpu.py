"""CPU time of the whole VM (every process and the kernel) around a benchmark run, from
/proc/stat, and of one process, from /proc/PID/stat. fio's own usr+sys counts only fio's
process; a backend's daemon threads, kernel workers and interrupts show only here, so a backend
that gets its IOPS by burning both vCPUs is seen as such.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

TICK_US = 1e6 / os.sysconf("SC_CLK_TCK")


@dataclass
class CpuUse:
    """What the CPUs did over a window: busy is user+nice+system+irq+softirq (guest time is
    inside user), total adds idle, iowait and steal; both summed over every CPU."""

    busy_us: float = 0.0
    total_us: float = 0.0

    def __add__(self, other: CpuUse) -> CpuUse:
        """Two windows' use together (the same job over several rounds)."""
        return CpuUse(self.busy_us + other.busy_us, self.total_us + other.total_us)

    def per_io(self, ios: float) -> float:
        """µs of CPU per I/O (NaN when there were none)."""
        return self.busy_us / ios if ios > 0 else float("nan")

    @property
    def share(self) -> float:
        """The busy fraction of all CPUs together (1.0: every vCPU busy all the time)."""
        return self.busy_us / self.total_us if self.total_us else float("nan")


def vm_jiffies() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot, from the `cpu` line of /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    busy = user + nice + system + irq + softirq
    return busy, busy + idle + iowait + steal


@contextmanager
def measured() -> Iterator[CpuUse]:
    """The VM's CPU use over the `with` body, filled in when it ends."""
    use = CpuUse()
    busy0, total0 = vm_jiffies()
    try:
        yield use
    finally:
        busy1, total1 = vm_jiffies()
        use.busy_us = (busy1 - busy0) * TICK_US
        use.total_us = (total1 - total0) * TICK_US


def process_us(pid: int, tid: int | None = None) -> float:
    """utime+stime so far of process `pid` (all its threads), or of its thread `tid`, µs."""
    where = f"/proc/{pid}" if tid is None else f"/proc/{pid}/task/{tid}"
    stat = Path(f"{where}/stat").read_text()
    fields = stat.rpartition(")")[2].split()  # the command name may hold spaces and ')'
    return (int(fields[11]) + int(fields[12])) * TICK_US
