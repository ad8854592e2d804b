"""A daemon killed while it answers a command, and the daemon that re-attaches after it.

The answer shares the command's slot with its request and must be complete before cmd_tail
moves past it, so a SIGKILL can leave a slot half way between the two. The crash model: the
answer is a sequence of stores; the killed daemon leaves any prefix of them, and a store that
is not a single instruction (a Python struct or slice write) any subset of its bytes. For every
such state the restarted daemon must give the host the answer the killed one meant — or BUSY,
which the host retries, where a CHECK CONDITION's sense was being written — and must not run a
command again once its status is in the slot (COMPARE AND WRITE would then miscompare on its
own write).
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import pytest

from tests.unit.test_tcmu_fast_path import file_lun, rw10
from tests.unit.test_tcmu_ring import Disk, rw
from vscsi.scsi.buffer import DataBuffer
from vscsi.scsi.result import BUSY, CHECK_CONDITION, GOOD, Result
from vscsi.tcmu import abi
from vscsi.tcmu import ring as ring_module
from vscsi.tcmu.loopback import Completion, LoopbackKernel
from vscsi.tcmu.ring import Before, Ring

SLOT = 128  # the first entry of a fresh loopback ring


class Killed(Exception):
    """SIGKILL, at the store that raises it."""


class Handler(Disk):
    """The test ring's disk; TEST UNIT READY answers BUSY (a status without sense)."""

    def execute(self, cdb: bytes | memoryview, buf: DataBuffer, replayed: bool = False) -> Result:
        if cdb[0] == 0x00:
            self.seen.append(bytes(cdb))
            return Result(BUSY)
        return super().execute(cdb, buf, replayed)


CASES = {
    "write": (rw(0x2A, 3, 1), b"\x5a" * 512, 0),
    "write of five iovecs": (rw(0x2A, 8, 40), bytes(range(256)) * 80, 0),
    "read": (rw(0x28, 1, 2), b"", 1024),
    "short read (read_len)": (bytes([0x12, 0, 0, 0, 64, 0]), b"", 64),
    "check condition with data": (rw(0x2F, 0, 1), b"\0" * 512, 0),
    "check condition without data": (bytes([0x1B]) + bytes(5), b"", 0),
    "busy": (bytes(6), b"", 0),
}


def queued(case: str) -> tuple[LoopbackKernel, Handler]:
    k, disk = LoopbackKernel(), Handler()
    disk.data[512:1536] = bytes(range(256)) * 4
    cdb, out, n = CASES[case]
    assert k.submit(cdb, out, n) is not None
    return k, disk


def outcome(c: Completion) -> tuple[int, bytes, bytes, int | None]:
    return c.status, c.sense, c.data, c.read_len


class Recorder:
    """Stands in for the ring's C helpers: notes the slot before each store it makes and
    dies at the cmd_tail store, so the answer is never published."""

    def __init__(self, real: object, mem: memoryview) -> None:
        self.real, self.mem = real, mem
        self.before: list[tuple[bytes, int, bytes]] = []  # slot, then each atomic store

    def ring_store_u64(self, base: object, off: int, value: int) -> None:
        self.before.append((self.slot(), off - SLOT, value.to_bytes(8, "little")))
        self.real.ring_store_u64(base, off, value)  # type: ignore[attr-defined]

    def ring_store_release_u32(self, base: object, off: int, value: int) -> None:
        self.before.append((self.slot(), -1, b""))
        raise Killed

    def slot(self) -> bytes:
        return bytes(self.mem[SLOT : SLOT + 256])

    def __getattr__(self, name: str) -> object:
        return getattr(self.real, name)


def crash_states(monkeypatch: pytest.MonkeyPatch, case: str) -> list[tuple[bytes, bool]]:
    """Every state the slot can be left in (and whether the status store is in it)."""
    k, disk = queued(case)
    ring = Ring(k.mem, disk)
    (cmd,) = ring.fetch()
    result = ring.run(cmd)
    start = bytes(k.mem[SLOT : SLOT + 256])
    rec = Recorder(ring_module.lib, memoryview(k.mem))
    with monkeypatch.context() as m:
        m.setattr(ring_module, "lib", rec)
        with pytest.raises(Killed):
            ring.complete(cmd, result)
    rng = random.Random(case)
    states: list[tuple[bytes, bool]] = []
    prev, status_in = start, False
    for slot, off, value in rec.before:
        # the Python writes since the last atomic store: any subset of their bytes landed
        changed = [i for i in range(256) if slot[i] != prev[i]]
        for _ in range(12 if changed else 0):
            mid = bytearray(prev)
            for i in rng.sample(changed, rng.randint(0, len(changed))):
                mid[i] = slot[i]
            states.append((bytes(mid), status_in))
        states.append((slot, status_in))
        if off >= 0:  # the atomic store itself, then on from there
            after = bytearray(slot)
            after[off : off + 8] = value
            prev, status_in = bytes(after), status_in or off == 8
            states.append((prev, status_in))
    return states


@pytest.mark.parametrize("case", list(CASES))
def test_a_daemon_killed_while_answering_leaves_an_answer_the_next_one_gives(
    monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    k, disk = queued(case)
    Ring(k.mem, disk).process()
    (meant,) = k.reap()
    allowed = {outcome(meant)}
    if meant.status == CHECK_CONDITION:
        allowed.add((BUSY, b"", b"", None))
    for state, status_in in crash_states(monkeypatch, case):
        k2, disk2 = queued(case)
        k2.mem[:] = k.mem[:]  # the data area as the killed daemon left it (a READ's data)
        k2.mem[SLOT : SLOT + 256] = state
        disk2.data[:] = disk.data  # its writes landed
        abi.U32.pack_into(k2.mem, abi.MAILBOX_TAIL_OFFSET, 0)  # never published
        resumed = Ring(k2.mem, disk2)
        resumed.process()
        (got,) = k2.reap()
        assert outcome(got) in allowed, (case, state[:48].hex())
        assert resumed.replayed.total() == 1
        if status_in:
            assert disk2.seen == [], "run again although its status was in the slot"
            assert resumed.replayed[Before.NOTHING] == 0
        assert disk2.data == disk.data


def test_the_compiled_paths_answer_before_its_tail_store_is_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """C answered a WRITE in its slot; the daemon died before cmd_tail moved (the tail is set
    back to model it). The next daemon gives the host that GOOD and writes nothing again."""
    lun = file_lun(tmp_path / "v.img")
    k = LoopbackKernel(cmdr_size=64 << 10, data_size=1 << 20)
    ring = Ring(k.mem, lun)
    k.submit(rw10(0x2A, 0, 8), b"\x33" * 4096)
    with lun.direct() as path:
        assert path is not None
        r, w = os.pipe()
        assert ring.serve_fast(path, w, 0, 0)[0] == 1 and ring.fast_commands == 1
        os.close(r)
        os.close(w)
    abi.U32.pack_into(k.mem, abi.MAILBOX_TAIL_OFFSET, 0)
    seen: list[bytes] = []
    real = lun.execute

    def execute(cdb: bytes | memoryview, buf: DataBuffer, replayed: bool = False) -> Result:
        seen.append(bytes(cdb))
        return real(cdb, buf, replayed)

    lun.execute = execute  # type: ignore[method-assign]
    k.submit(rw10(0x28, 0, 8), data_in_len=4096)  # queued before the attach too: served again
    with caplog.at_level(logging.INFO, "vscsi.tcmu.ring"):
        assert Ring(k.mem, lun, "uio7").process() == 2
    written, read = k.reap()
    assert written.status == GOOD and seen == [rw10(0x28, 0, 8)]
    assert read.status == GOOD and read.data == b"\x33" * 4096
    assert "uio7: 2 command(s) queued across the restart: 1 served again, 1 answered before it" in (
        caplog.text
    )
    assert (tmp_path / "v.img").read_bytes()[:4096] == b"\x33" * 4096
