"""`vscsi host`: the primary rule over tables of claims, and the follower over fake devices and a
fake mounter (nothing is mounted on this machine), its control socket through the real server."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from vscsi.cli import main
from vscsi.control import ControlError, ControlServer, request
from vscsi.host.follow import (
    CHANGEOVER,
    MOUNTED,
    REFUSED,
    UNMOUNTED,
    Follower,
    Mounted,
    Reading,
    decide,
    is_primary,
)
from vscsi.host.hostcli import commands
from vscsi.host.hostconfig import FilesystemConfig, HostConfig
from vscsi.host.mounts import MountError

A, B, C = (410011, 0x0600), (410012, 0x0600), (410011, 0x0700)
MP = "/mnt/fs1"


def rdev(path: str) -> int:
    return os.makedev(8, 16 * (ord(path[-1]) - ord("a")))


def dev(path: str, ident: tuple[int, int] | None, role: str = "SMPL", status: str = "SMPL",
        partner: tuple[int, int] | None = None, **kw: object) -> Reading:  # fmt: skip
    return Reading(path, rdev(path), ident, role, status, partner, **kw)  # type: ignore[arg-type]


def pvol(status: str = "PAIR", path: str = "/dev/sdb") -> Reading:
    return dev(path, A, "P-VOL", status, B)


def svol(status: str = "PAIR", path: str = "/dev/sdc") -> Reading:
    return dev(path, B, "S-VOL", status, A)


def fenced(r: Reading) -> Reading:
    return replace(r, fenced=True)


def down(r: Reading) -> Reading:
    return replace(r, error="INQUIRY: host status 0x03 DID_TIME_OUT")


# -- the rule -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("readings", "state", "mount"),
    [
        ([pvol("PAIR"), svol("PAIR")], MOUNTED, "/dev/sdb"),
        ([pvol("COPY"), svol("COPY")], MOUNTED, "/dev/sdb"),
        ([pvol("PSUS"), svol("SSUS")], MOUNTED, "/dev/sdb"),
        ([pvol("PSUE"), svol("PSUE")], MOUNTED, "/dev/sdb"),
        ([down(pvol()), svol("SSWS")], MOUNTED, "/dev/sdc"),  # taken over, old site gone
        ([svol("SSWS")], MOUNTED, "/dev/sdc"),  # found through its partner, A unseen
        ([down(pvol()), svol("PAIR")], UNMOUNTED, None),  # S-VOL not SSWS: never mounted
        ([svol("SSUS")], UNMOUNTED, None),
        ([pvol("PSUE"), svol("SSWS")], REFUSED, None),  # both wrote alone: a split brain
        ([fenced(pvol("PSUE")), svol("SSWS")], MOUNTED, "/dev/sdc"),  # old primary, demoted
        ([fenced(pvol("PSUE")), svol("PSUE")], UNMOUNTED, None),  # fence data tripped
        ([dev("/dev/sdb", A)], MOUNTED, "/dev/sdb"),  # SMPL named directly: unmirrored
        ([dev("/dev/sdb", B)], UNMOUNTED, None),  # SMPL, not named: not ours
        ([dev("/dev/sdb", A), svol("SSWS")], REFUSED, None),
        ([dev("/dev/sdb", A, si_svol=True)], UNMOUNTED, None),  # a ShadowImage copy
        ([dev("/dev/sdb", None)], UNMOUNTED, None),  # cannot identify: never mounted
        ([dev("/dev/sdb", C, "P-VOL", "PAIR", (410012, 0x0700))], UNMOUNTED, None),  # other pair
        ([pvol(), pvol(path="/dev/sdd"), svol()], MOUNTED, "/dev/sdb"),  # two paths, one volume
    ],
)
def test_decide(readings: list[Reading], state: str, mount: str | None) -> None:
    plan = decide("fs1", A, readings, None)
    assert (plan.state, plan.mount, plan.unmount) == (state, mount, False)


def test_two_primaries_are_named_and_unmounted() -> None:
    mounted = Mounted("/dev/sdb", rdev("/dev/sdb"), ours=True)
    plan = decide("fs1", A, [pvol("PSUE"), svol("SSWS")], mounted)
    assert (plan.state, plan.unmount, plan.mount) == (REFUSED, True, None)
    assert plan.reason == (
        "two primaries for fs1: /dev/sdb (410011:0600 P-VOL PSUE) and "
        "/dev/sdc (410012:0600 S-VOL SSWS): not mounting"
    )


def test_no_primary_while_mounted_is_a_changeover() -> None:
    mounted = Mounted("/dev/sdb", rdev("/dev/sdb"), ours=True)
    plan = decide("fs1", A, [down(pvol()), svol("PAIR")], mounted)
    assert (plan.state, plan.unmount, plan.mount) == (CHANGEOVER, True, None)
    assert plan.reason == "changeover: no primary for fs1; I/O impossible"


def test_a_new_primary_is_mounted_after_the_old_one_is_unmounted() -> None:
    mounted = Mounted("/dev/sdb", rdev("/dev/sdb"), ours=True)
    plan = decide("fs1", A, [down(pvol()), svol("SSWS")], mounted)
    assert (plan.state, plan.unmount, plan.mount) == (MOUNTED, True, "/dev/sdc")


def test_the_primary_stays_mounted_by_any_of_its_paths() -> None:
    mounted = Mounted("/dev/sdd", rdev("/dev/sdd"))
    plan = decide("fs1", A, [pvol(), pvol(path="/dev/sdd"), svol()], mounted)
    assert (plan.state, plan.unmount, plan.mount) == (MOUNTED, False, None)


def test_a_foreign_mount_is_never_touched() -> None:
    plan = decide("fs1", A, [pvol(), svol()], Mounted(None, os.makedev(8, 99)))
    assert (plan.state, plan.unmount, plan.mount) == (REFUSED, False, None)
    assert "holds device 8:99, not a volume of fs1" in plan.reason


def test_unreachable_and_unidentified_claim_nothing() -> None:
    assert not is_primary(down(pvol()), A)
    assert not is_primary(dev("/dev/sdb", None), A)
    assert is_primary(pvol(), A) and is_primary(svol("SSWS"), A)


# -- the follower -------------------------------------------------------------------------------


class FakeReader:
    """Devices by path; every read is recorded."""

    def __init__(self, *readings: Reading) -> None:
        self.devices = {r.device: r for r in readings}
        self.second_look: dict[str, Reading] = {}
        self.reads: list[list[str]] = []

    def set(self, *readings: Reading) -> None:
        self.devices = {r.device: r for r in readings}

    def read(self, paths: Sequence[str]) -> list[Reading]:
        self.reads.append(list(paths))
        if len(paths) == 1 and paths[0] in self.second_look:
            return [self.second_look[paths[0]]]
        return [self.devices[p] for p in paths]


class FakeMounter:
    """The mount table as a dict; every operation is recorded in order."""

    def __init__(self) -> None:
        self.table: dict[str, int] = {}
        self.ops: list[tuple[str, ...]] = []
        self.fail_unmount: str | None = None
        self.fail_mount: str | None = None

    def current(self, mountpoint: str) -> int | None:
        return self.table.get(mountpoint)

    def mount(self, device: str, mountpoint: str, fstype: str | None, options: str) -> None:
        if self.fail_mount:
            raise MountError(self.fail_mount)
        assert mountpoint not in self.table, "mounted over a mounted filesystem"
        self.ops.append(("mount", device, mountpoint, fstype or "", options))
        self.table[mountpoint] = rdev(device)

    def unmount(self, mountpoint: str) -> None:
        if self.fail_unmount:
            raise MountError(self.fail_unmount)
        self.ops.append(("umount", mountpoint))
        del self.table[mountpoint]

    def check(self, device: str, fstype: str | None) -> None:
        self.ops.append(("fsck", device))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def config(poll: float = 0.01, **fs: object) -> HostConfig:
    fsc = FilesystemConfig("fs1", A, MP, "ext4", "noatime", **fs)  # type: ignore[arg-type]
    return HostConfig([fsc], socket="/unused", poll=poll, source="host.toml")


def follower(reader: FakeReader, mounter: FakeMounter, clock: Clock | None = None,
             **fs: object) -> Follower:  # fmt: skip
    return Follower(config(**fs), reader, mounter, lambda: sorted(reader.devices),
                    clock or Clock())  # fmt: skip


def fs1(f: Follower) -> dict[str, object]:
    return f.status()["filesystems"][0]


def test_mounts_the_primary_with_its_options() -> None:
    reader, mounter = FakeReader(pvol(), svol()), FakeMounter()
    f = follower(reader, mounter)
    f.step()
    assert mounter.ops == [("mount", "/dev/sdb", MP, "ext4", "noatime")]
    s = fs1(f)
    assert (s["state"], s["device"], s["last_changeover_seconds"]) == (MOUNTED, "/dev/sdb", None)
    assert [(c["device"], c["role"], c["status"], c["primary"]) for c in s["claims"]] == [
        ("/dev/sdb", "P-VOL", "PAIR", True), ("/dev/sdc", "S-VOL", "PAIR", False)]  # fmt: skip
    f.step()
    assert len(mounter.ops) == 1  # kept, not remounted


def test_changeover_unmounts_waits_and_mounts_the_new_primary_timed() -> None:
    reader, mounter, clock = FakeReader(pvol(), svol()), FakeMounter(), Clock()
    f = follower(reader, mounter, clock)
    f.step()
    reader.set(down(pvol()), svol("PAIR"))  # site A gone, takeover not done yet
    clock.now += 1.0
    f.step()
    assert mounter.ops[-1] == ("umount", MP)
    s = fs1(f)
    assert (s["state"], s["device"]) == (CHANGEOVER, None)
    assert s["reason"] == "changeover: no primary for fs1; I/O impossible"
    assert s["claims"][0]["volume"] == "410011:0600"  # still named though unreachable
    assert s["claims"][0]["error"].endswith("DID_TIME_OUT")
    reader.set(down(pvol()), svol("SSWS"))  # the agent took over
    clock.now += 2.5
    f.step()
    assert mounter.ops[-1] == ("mount", "/dev/sdc", MP, "ext4", "noatime")
    s = fs1(f)
    assert (s["state"], s["device"], s["last_changeover_seconds"]) == (MOUNTED, "/dev/sdc", 2.5)
    assert "changeover took 2.500 s" in s["reason"]


def test_a_swap_in_one_poll_unmounts_before_mounting() -> None:
    reader, mounter, clock = FakeReader(pvol(), svol()), FakeMounter(), Clock()
    f = follower(reader, mounter, clock)
    f.step()
    reader.set(dev("/dev/sdb", A, "S-VOL", "PAIR", B), dev("/dev/sdc", B, "P-VOL", "PAIR", A))
    f.step()
    assert mounter.ops[1:] == [("umount", MP), ("mount", "/dev/sdc", MP, "ext4", "noatime")]
    assert fs1(f)["last_changeover_seconds"] == 0.0


def test_two_primaries_refused_until_one_goes_away() -> None:
    reader, mounter, clock = FakeReader(pvol("PSUE"), svol("PSUE")), FakeMounter(), Clock()
    f = follower(reader, mounter, clock)
    f.step()
    reader.set(pvol("PSUE"), svol("SSWS"))  # takeover while the old primary is still online
    f.step()
    assert mounter.ops[-1] == ("umount", MP) and MP not in mounter.table
    s = fs1(f)
    assert s["state"] == REFUSED and s["reason"].startswith("two primaries for fs1: /dev/sdb")
    clock.now += 4.0
    f.step()
    assert MP not in mounter.table  # still refused
    reader.set(down(pvol("PSUE")), svol("SSWS"))
    clock.now += 1.0
    f.step()
    assert mounter.ops[-1] == ("mount", "/dev/sdc", MP, "ext4", "noatime")
    assert fs1(f)["last_changeover_seconds"] == 5.0


def test_a_failed_unmount_mounts_nothing_else() -> None:
    reader, mounter = FakeReader(pvol(), svol()), FakeMounter()
    f = follower(reader, mounter)
    f.step()
    reader.set(down(pvol()), svol("SSWS"))
    mounter.fail_unmount = "umount exited 32: target is busy"
    f.step()
    assert mounter.ops == [("mount", "/dev/sdb", MP, "ext4", "noatime")]
    s = fs1(f)
    assert s["state"] == CHANGEOVER
    assert s["reason"].endswith("unmount of /dev/sdb failed: umount exited 32: target is busy")
    mounter.fail_unmount = None
    f.step()
    assert mounter.ops[-1] == ("mount", "/dev/sdc", MP, "ext4", "noatime")


def test_a_failed_mount_is_reported_and_retried() -> None:
    reader, mounter = FakeReader(pvol(), svol()), FakeMounter()
    f = follower(reader, mounter)
    mounter.fail_mount = "mount exited 32: wrong fs type"
    f.step()
    assert fs1(f)["state"] == UNMOUNTED
    assert fs1(f)["reason"].endswith("mount of /dev/sdb failed: mount exited 32: wrong fs type")
    mounter.fail_mount = None
    f.step()
    assert fs1(f)["state"] == MOUNTED


def test_the_primary_is_read_again_before_it_is_mounted() -> None:
    reader, mounter = FakeReader(down(pvol()), svol("SSWS")), FakeMounter()
    reader.second_look["/dev/sdc"] = svol("PAIR")  # its role changed since the poll
    f = follower(reader, mounter)
    f.step()
    assert mounter.ops == [] and reader.reads[-1] == ["/dev/sdc"]
    assert "no longer claims primary on a second look" in fs1(f)["reason"]


def test_fsck_runs_before_the_mount_when_asked() -> None:
    reader, mounter = FakeReader(pvol(), svol()), FakeMounter()
    follower(reader, mounter, fsck=True).step()
    assert [op[0] for op in mounter.ops] == ["fsck", "mount"]


def test_a_foreign_mount_at_the_mountpoint_is_left_alone() -> None:
    reader, mounter = FakeReader(pvol(), svol()), FakeMounter()
    mounter.table[MP] = os.makedev(253, 0)
    f = follower(reader, mounter)
    f.step()
    assert mounter.ops == [] and fs1(f)["state"] == REFUSED


def test_an_existing_mount_of_the_primary_is_adopted() -> None:
    reader, mounter = FakeReader(pvol(), svol()), FakeMounter()
    mounter.table[MP] = rdev("/dev/sdb")
    f = follower(reader, mounter)
    f.step()
    assert mounter.ops == [] and (fs1(f)["state"], fs1(f)["device"]) == (MOUNTED, "/dev/sdb")
    reader.set(down(pvol()), svol("SSWS"))
    f.step()
    assert mounter.ops == [("umount", MP), ("mount", "/dev/sdc", MP, "ext4", "noatime")]


def test_an_unmount_by_hand_is_mounted_again() -> None:
    reader, mounter = FakeReader(pvol(), svol()), FakeMounter()
    f = follower(reader, mounter)
    f.step()
    del mounter.table[MP]
    f.step()
    assert [op[0] for op in mounter.ops] == ["mount", "mount"]


def test_run_stops_on_stop_and_unmounts_nothing() -> None:
    reader, mounter = FakeReader(pvol(), svol()), FakeMounter()
    f = follower(reader, mounter)
    t = threading.Thread(target=f.run)
    t.start()
    while MP not in mounter.table:
        f.stop.wait(0.01)
    f.stop.set()
    t.join(5)
    assert not t.is_alive() and MP in mounter.table
    f.unmount_all()  # run --unmount-on-exit
    assert mounter.ops[-1] == ("umount", MP) and fs1(f)["state"] == UNMOUNTED


# -- remount and the control socket -------------------------------------------------------------


Served = tuple[str, FakeReader, FakeMounter, Clock, Follower]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    reader, mounter, clock = FakeReader(pvol(), svol()), FakeMounter(), Clock()
    f = follower(reader, mounter, clock)
    f.step()
    srv = ControlServer(str(tmp_path / "host.sock"), commands(f))
    srv.start()
    try:
        yield srv.path, reader, mounter, clock, f
    finally:
        f.stop.set()
        srv.close()


def test_status_over_the_socket(served: Served) -> None:
    path, *_ = served
    assert os.stat(path).st_mode & 0o777 == 0o600
    result = request(path, "status")
    assert result["config"] == "host.toml"
    (s,) = result["filesystems"]
    assert {k: s[k] for k in ("name", "volume", "mountpoint", "state", "device")} == {
        "name": "fs1", "volume": "410011:0600", "mountpoint": MP, "state": MOUNTED,
        "device": "/dev/sdb"}  # fmt: skip
    assert set(s) == {"name", "volume", "mountpoint", "state", "device", "reason", "claims",
                      "last_changeover_seconds", "since"}  # fmt: skip


def test_remount_after_a_swap(served: Served) -> None:
    path, reader, mounter, *_ = served
    reader.set(dev("/dev/sdb", A, "S-VOL", "PAIR", B), dev("/dev/sdc", B, "P-VOL", "PAIR", A))
    result = request(path, "remount", name="fs1")
    assert result == {"name": "fs1", "device": "/dev/sdc", "changeover_seconds": 0.0}
    assert mounter.ops[1:] == [("umount", MP), ("mount", "/dev/sdc", MP, "ext4", "noatime")]


def test_remount_always_unmounts_first(served: Served) -> None:
    path, _, mounter, *_ = served
    assert request(path, "remount", name="fs1")["device"] == "/dev/sdb"
    assert [op[0] for op in mounter.ops] == ["mount", "umount", "mount"]


def test_remount_waits_for_one_primary(served: Served) -> None:
    path, reader, mounter, clock, _ = served
    reader.set(pvol("PSUE"), svol("SSWS"))
    with pytest.raises(ControlError) as e:
        request(path, "remount", name="fs1", wait=0)
    assert str(e.value) == (
        "remount fs1: two primaries for fs1: /dev/sdb (410011:0600 P-VOL PSUE) and "
        "/dev/sdc (410012:0600 S-VOL SSWS): not mounting (waited 0 s)"
    )
    assert MP not in mounter.table

    def old_primary_goes() -> None:
        reader.set(down(pvol("PSUE")), svol("SSWS"))
        clock.now += 3.0

    timer = threading.Timer(0.2, old_primary_goes)
    timer.start()
    result = request(path, "remount", name="fs1", wait=10)
    timer.join()
    assert result["device"] == "/dev/sdc" and result["changeover_seconds"] == 3.0


def test_remount_refusals(served: Served) -> None:
    path, *_ = served
    with pytest.raises(ControlError, match=r"^remount: no filesystem 'fs9' in host.toml"):
        request(path, "remount", name="fs9")
    with pytest.raises(ControlError, match="wait must be an integer"):
        request(path, "remount", name="fs1", wait="5")
    with pytest.raises(ControlError, match="argument 'name' is required"):
        request(path, "remount")
    with pytest.raises(ControlError, match=r"^unmount: no filesystem 'fs9'"):
        request(path, "unmount", name="fs9")


def test_unmount_holds_until_remount_and_times_the_whole_change(served: Served) -> None:
    path, reader, mounter, clock, f = served
    assert request(path, "unmount", name="fs1") == {"name": "fs1", "device": "/dev/sdb"}
    assert mounter.ops[-1] == ("umount", MP)
    f.step()  # still the only primary, but held: not mounted again
    assert MP not in mounter.table
    s = fs1(f)
    assert (s["state"], s["device"]) == (CHANGEOVER, None)
    assert s["reason"] == "unmounted for a changeover (held until 'vscsi host remount fs1')"
    reader.set(dev("/dev/sdb", A, "S-VOL", "PAIR", B), dev("/dev/sdc", B, "P-VOL", "PAIR", A))
    clock.now += 7.0  # the swap-takeover
    f.step()
    assert MP not in mounter.table
    result = request(path, "remount", name="fs1")
    assert result == {"name": "fs1", "device": "/dev/sdc", "changeover_seconds": 7.0}
    f.step()
    assert [op[0] for op in mounter.ops] == ["mount", "umount", "mount"]


def test_the_cli_over_the_socket(served: Served) -> None:
    path, reader, *_ = served
    run = CliRunner().invoke
    result = run(main, ["host", "status", "--socket", path])
    assert result.exit_code == 0
    assert "fs1: mounted /dev/sdb on /mnt/fs1 (volume 410011:0600)" in result.output
    assert "  /dev/sdb  410011:0600  P-VOL PAIR  primary" in result.output
    assert json.loads(run(main, ["host", "status", "--json", "--socket", path]).output)[
        "filesystems"][0]["device"] == "/dev/sdb"  # fmt: skip
    result = run(main, ["host", "unmount", "fs1", "--socket", path])
    assert result.output == (
        "fs1: unmounted /dev/sdb; held until 'vscsi host remount fs1'\n")  # fmt: skip
    reader.set(pvol("PSUE"), svol("SSWS"))
    result = run(main, ["host", "remount", "fs1", "--timeout", "0", "--socket", path])
    assert result.exit_code == 1
    assert result.output.startswith("vscsi: remount fs1: two primaries for fs1: /dev/sdb")
    assert result.output.count("\n") == 1
    reader.set(svol("SSWS"))
    result = run(main, ["host", "remount", "fs1", "--socket", path])
    assert result.exit_code == 0
    assert result.output.startswith("fs1: mounted /dev/sdc, changeover ")


def test_no_follower_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["host", "status", "--socket", str(tmp_path / "no.sock")])
    assert result.exit_code == 1
    assert result.output == (
        f"vscsi: no vscsi host follower at {tmp_path}/no.sock; start one with "
        "'vscsi host run -c FILE'\n")  # fmt: skip
