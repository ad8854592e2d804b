"""Durability: a process killed with SIGKILL mid-COPY or mid-RCPY resumes from its persisted
fence and remaining-to-copy map, and the data ends identical."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from tests.unit.pairvolumes import GatedReplica
from vscsi.pair.manager import PairManager
from vscsi.pair.persist import PairRecord, PairStore
from vscsi.pair.states import Status
from vscsi.scsi.identity import Identity
from vscsi.store.file import FileVolume
from vscsi.tracker import DirtyMap

SIZE = 8 << 20
CHILD = textwrap.dedent(
    """
    import sys, time
    from vscsi.pair.manager import PairManager
    from vscsi.pair.replica import LocalReplica
    from vscsi.store.file import FileVolume

    class Slow(LocalReplica):
        def write(self, offset, bufs, fua=False):
            time.sleep(0.01)
            super().write(offset, bufs, fua)
        def readinto(self, offset, bufs):
            time.sleep(0.01)
            super().readinto(offset, bufs)

    d, mode = sys.argv[1], sys.argv[2]
    vols = {n: FileVolume(n, f"{d}/{n}.img") for n in ("p", "s")}
    m = PairManager(f"{d}/state", vols, {}, chunk=65536, checkpoint_bytes=256 << 10,
                    wil_idle=0.05, replica_factory=Slow)
    if mode == "copy":
        m.create("x", "p", "s", 0)
    else:
        m.split("x")
        m.volume("p").write(0, [memoryview(b"\\xee" * (4 << 20))])
        m.restore("x")
    print("started", flush=True)
    time.sleep(60)
    """
)


def _files(tmp_path: Path) -> dict[str, FileVolume]:
    return {n: FileVolume(n, str(tmp_path / f"{n}.img")) for n in ("p", "s")}


def _run_and_kill(tmp_path: Path, mode: str, status: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path), mode], stdout=subprocess.PIPE, env=env
    )
    assert child.stdout is not None and child.stdout.readline().strip() == b"started"
    deadline = time.monotonic() + 30
    record = tmp_path / "state" / "pairs" / "x.json"
    while time.monotonic() < deadline:  # until a checkpoint shows progress
        rec = json.loads(record.read_bytes())["payload"]
        if rec["status"] == status and rec["fence"] > 0:
            break
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()


def _reopen(tmp_path: Path) -> tuple[PairManager, dict[str, GatedReplica]]:
    replicas: dict[str, GatedReplica] = {}

    def factory(v):
        replicas[v.name] = GatedReplica(v)
        return replicas[v.name]

    m = PairManager(str(tmp_path / "state"), _files(tmp_path), {}, replica_factory=factory)
    return m, replicas


def test_killed_mid_copy_resumes_from_fence(tmp_path: Path) -> None:
    for n in ("p", "s"):
        (tmp_path / f"{n}.img").write_bytes(os.urandom(SIZE) if n == "p" else bytes(SIZE))
    _run_and_kill(tmp_path, "copy", "COPY")
    m, replicas = _reopen(tmp_path)
    assert m.pair("x").status in (Status.COPY, Status.PAIR)
    assert m.wait("x", 30)
    assert m.pair("x").status is Status.PAIR
    assert 0 < replicas["s"].written < SIZE  # resumed, not from zero
    m.close()
    assert (tmp_path / "p.img").read_bytes() == (tmp_path / "s.img").read_bytes()


def test_killed_mid_restore_resumes(tmp_path: Path) -> None:
    data = os.urandom(SIZE)
    for n in ("p", "s"):
        (tmp_path / f"{n}.img").write_bytes(data)
    m = PairManager(str(tmp_path / "state"), _files(tmp_path), {})
    m.create("x", "p", "s", 0)
    assert m.wait("x", 30)
    m.close()
    _run_and_kill(tmp_path, "restore", "RCPY")
    m, replicas = _reopen(tmp_path)
    assert m.wait("x", 30)
    assert m.pair("x").status is Status.PSUS
    assert replicas["s"].reads < 4 << 20  # resumed, not from zero
    m.close()
    assert (tmp_path / "p.img").read_bytes() == data == (tmp_path / "s.img").read_bytes()


def test_record_round_trip(tmp_path: Path) -> None:
    store = PairStore(tmp_path)
    pending = DirtyMap(1 << 20)
    pending.mark(65536, 100)
    rec = PairRecord("x", "p", "s", 2, Status.COPY, generation=5, fence=65536, pending=pending)
    assert store.commit(rec, store.stamp(), create=True)
    (back,) = PairStore(tmp_path).load_all()
    assert (back.name, back.mu, back.status, back.generation, back.fence) == (
        "x", 2, Status.COPY, 5, 65536,
    )  # fmt: skip
    assert back.pending == pending and back.pdiff is None
    store.delete("x", store.stamp())
    assert store.load_all() == [] and PairStore(tmp_path).load_all() == []


def test_identity_unused_defaults(tmp_path: Path) -> None:
    """Volumes without a configured identity display the default one."""
    m = PairManager(str(tmp_path / "st"), {}, {"a": Identity(volume_id=3)})
    assert m.display() == []
    m.close()
