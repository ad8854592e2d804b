"""Shadow sets served through the real kernel: fio with verification while a member is copied
in, while the daemon is SIGKILLed (minimerge with the log, full merge without), and while a
member's device starts failing; `cmp` proves the members identical afterwards.

One daemon serves three sets for the whole module, on each transport in turn:
- dsa1: two loop block devices and a file, write-intent log on;
- dsa2: two files, write-intent log off (a crash means a full merge);
- dsa3: a file and a device-mapper device that is switched to `error` mid-run.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import VSCSI, Daemon, run
from tests.integration.hostio import Writer, fio, fio_ok, wait_writes
from vscsi.control import request
from vscsi.shadow import AREA

MIB = 1 << 20
SIZE = 16 * MIB
MEMBER = SIZE + AREA


def losetup(img: Path) -> str:
    with img.open("wb") as f:
        f.truncate(MEMBER)
    return run("losetup", "--find", "--show", str(img)).strip()


@pytest.fixture(scope="module")
def devices(here: Path) -> Iterator[dict[str, str]]:
    run("modprobe", "loop")
    run("modprobe", "dm_mod")
    loops = {name: losetup(here / f"{name}.img") for name in ("loopA", "loopB", "loopF")}
    sectors = MEMBER // 512
    run("dmsetup", "create", "vscsi-flaky", input=f"0 {sectors} linear {loops['loopF']} 0\n")
    yield {**loops, "flaky": "/dev/mapper/vscsi-flaky"}
    run("dmsetup", "remove", "vscsi-flaky", check=False)
    for dev in loops.values():
        run("losetup", "-d", dev, check=False)


@pytest.fixture(scope="module")
def daemon(here: Path, transport: str, devices: dict[str, str]) -> Iterator[Daemon]:
    sets = [
        ("dsa1", [devices["loopA"], devices["loopB"], f"{here}/c.img"], True, 0x400),
        ("dsa2", [f"{here}/d0.img", f"{here}/d1.img"], False, 0x401),
        ("dsa3", [f"{here}/e0.img", devices["flaky"]], True, 0x402),
    ]
    body = "".join(
        f'\n[[shadow_set]]\nname = "{name}"\nmembers = {json.dumps(members)}\nsize = "16MiB"\n'
        f"create = true\nwrite_intent_log = {str(wil).lower()}\n"
        f"[shadow_set.identity]\nserial = 410004\nvolume_id = {vid}\n"
        for name, members, wil, vid in sets
    )
    daemon_keys = (f'transport = "{transport}"\nstate_dir = "{here}/shadowstate"\n'
                   f'command_timeout = 0\ncopy_rate = "4MiB"\n')  # fmt: skip
    d = Daemon(here, daemon_keys + body, "shadow")
    d.start()
    for name in ("dsa1", "dsa2", "dsa3"):
        wait_steady(d, name)
        # commands queued while the daemon is down must wait for its restart, not time out
        Path(f"/sys/block/{Path(d.sd(name)).name}/device/timeout").write_text("300")
    yield d
    if d.proc is not None:
        d.stop()


# -- helpers ----------------------------------------------------------------------------------


def show(d: Daemon, name: str) -> dict[str, Any]:
    (s,) = request(d.socket, "shadow_show", name=name)
    return dict(s)


def wait_steady(d: Daemon, name: str, timeout: float = 300) -> None:
    """What `vscsi shadow wait` waits for (no copy or merge pending), asked on the control
    socket: a CLI process costs seconds in the emulated VM (one test runs the CLI)."""
    deadline = time.monotonic() + timeout
    while (s := show(d, name))["operations"]:
        assert time.monotonic() < deadline, s
        time.sleep(0.2)


def cmp_members(*members: str) -> None:
    first, *rest = members
    for other in rest:
        run("cmp", "-n", str(SIZE), first, other)


def displays(s: dict[str, Any]) -> dict[str, str]:
    return {m["name"]: m["display"] for m in s["members"]}


# -- tests ------------------------------------------------------------------------------------


def test_three_members_serve_fio(daemon: Daemon, devices: dict[str, str], here: Path) -> None:
    s = show(daemon, "dsa1")
    assert s["state"] == "Steady State" and s["size"] == SIZE
    assert list(displays(s).values()) == ["ShadowSetMember"] * 3
    fio_ok(fio(daemon.sd("dsa1"), "6M"), daemon)
    cmp_members(devices["loopA"], devices["loopB"], f"{here}/c.img")
    out = run(VSCSI, "shadow", "show", "dsa1", "--socket", daemon.socket)
    assert "Virtual Unit State:   Steady State" in out


def test_member_added_while_fio_runs_gets_a_copy(
    daemon: Daemon, devices: dict[str, str], here: Path
) -> None:
    member = f"{here}/c.img"
    run(VSCSI, "shadow", "remove", "dsa1", member, "--socket", daemon.socket)
    before = show(daemon, "dsa1")["stats"]["copied"]
    job = fio(daemon.sd("dsa1"))
    out = run(VSCSI, "shadow", "add", "dsa1", member, "--socket", daemon.socket)
    assert "Copy" in out, out
    fio_ok(job, daemon)
    out = run(VSCSI, "shadow", "wait", "dsa1", "--timeout", "300", "--socket", daemon.socket,
              timeout=330)  # fmt: skip
    assert out.splitlines()[-1] == "dsa1: Steady State", out
    assert show(daemon, "dsa1")["stats"]["copied"] > before
    cmp_members(devices["loopA"], devices["loopB"], member)


def test_sigkill_under_writes_minimerge_with_log_full_merge_without(
    daemon: Daemon, devices: dict[str, str], here: Path, transport: str
) -> None:
    # writers within the first 4 MiB that are writing when the daemon dies, and after
    writers = [Writer(daemon.sd(name), 4 * MIB) for name in ("dsa1", "dsa2")]
    killed = time.monotonic()
    logged = len(daemon.output())
    try:
        for w in writers:
            w.start()
            w.wait_for(50)
        daemon.kill()
        killed = time.monotonic()
        daemon.start()  # the queued I/O is served; the writers go on
        for w in writers:
            w.wait_for(50)
    except AssertionError as e:  # a host I/O error: the daemon's and the kernel's side of it
        raise AssertionError(
            f"{e}\n{time.monotonic() - killed:.1f}s since the kill\n--- daemon ---\n"
            f"{daemon.output()[-4000:]}\n--- kernel ---\n{run('dmesg')[-4000:]}"
        ) from e
    finally:  # never leave a writer running into the next test
        for w in writers:
            w.stop_and_verify()
    if transport == "native":
        # each writer waited on a write in the ring across the restart: the restarted daemon
        # must see the kernel's untouched requests as such (vscsi/tcmu/ring.py), and serve them
        after = daemon.output()[logged:]
        again = re.findall(r"queued across the restart: (\d+) served again", after)
        assert sum(map(int, again)) >= 1, after
    for name in ("dsa1", "dsa2"):
        wait_steady(daemon, name)
    one, two = show(daemon, "dsa1"), show(daemon, "dsa2")
    assert one["log"]["valid_at_mount"] and not two["log"]["enabled"]
    # minimerge: only the regions in the write-intent log (1 MiB each, all within the first
    # 4 MiB); full merge: the whole volume, holes included (skipped where every member has one)
    merged = one["stats"]["merge_scanned"] + one["stats"]["merge_skipped"]
    assert 0 < merged <= 4 * MIB, one["stats"]
    assert two["stats"]["merge_scanned"] + two["stats"]["merge_skipped"] == SIZE, two["stats"]
    cmp_members(devices["loopA"], devices["loopB"], f"{here}/c.img")
    cmp_members(f"{here}/d0.img", f"{here}/d1.img")


def test_sigkill_during_a_copy_leaves_the_original_members(
    daemon: Daemon, devices: dict[str, str], here: Path
) -> None:
    """The seed: a standalone system that fails during a copy comes back with the original
    members; mounting the target again copies it afresh."""
    member = f"{here}/c.img"
    request(daemon.socket, "shadow_remove", name="dsa1", member=member)
    run("dd", "if=/dev/urandom", f"of={daemon.sd('dsa1')}", "bs=1M", "count=16", "oflag=direct")
    request(daemon.socket, "shadow_add", name="dsa1", member=member)
    deadline = time.monotonic() + 120
    while not 10 <= show(daemon, "dsa1")["operations"][0]["percent"] < 100:  # paced: 4 MiB/s
        assert time.monotonic() < deadline, show(daemon, "dsa1")
        time.sleep(0.2)
    daemon.kill()
    daemon.start()
    wait_steady(daemon, "dsa1")
    assert displays(show(daemon, "dsa1"))[member] != "ShadowSetMember"
    cmp_members(devices["loopA"], devices["loopB"])
    request(daemon.socket, "shadow_add", name="dsa1", member=member)
    wait_steady(daemon, "dsa1")
    assert displays(show(daemon, "dsa1"))[member] == "ShadowSetMember"
    cmp_members(devices["loopA"], devices["loopB"], member)


def test_member_that_starts_failing_is_removed_and_the_host_sees_no_error(
    daemon: Daemon, devices: dict[str, str], here: Path
) -> None:
    sd = daemon.sd("dsa3")
    job = fio(sd)
    wait_writes(sd, 200)  # the member fails under writes in flight
    sectors = MEMBER // 512
    run("dmsetup", "suspend", "--noflush", "vscsi-flaky")
    run("dmsetup", "load", "vscsi-flaky", input=f"0 {sectors} error\n")
    run("dmsetup", "resume", "vscsi-flaky")
    fio_ok(job, daemon)  # every write acknowledged, every block verified: no error, no wrong data
    s = show(daemon, "dsa3")
    assert displays(s)[devices["flaky"]].startswith("Removed"), s
    assert displays(s)[f"{here}/e0.img"] == "ShadowSetMember", s
