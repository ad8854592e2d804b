"""The failover drill of the first seed, end to end, as a runbook: two arrays (sites A and B,
each a daemon whose link lives in its own network namespace), a TrueCopy pair with fence never
and a ShadowImage pair on its S-VOL, the storage server (`vscsi host`) and the external agent
(`vscsi agent`). Site A serves its LUNs through vscsi's own ring, site B through libtcmu
(sites.TRANSPORT). Every step prints what it does and asserts what it promises; `make drill`
runs them in order, and tests/integration/test_drill.py runs each as a test.

    python -m tests.integration.drill      # inside the VM (make drill)
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.integration.conftest import VSCSI, Daemon, run, run_rc, start_all
from tests.integration.hostio import rescan
from tests.integration.sites import SERIAL, array, cut, make_keys, mend, network, volume
from vscsi.control import ControlError, request

LDEV = 0x600  # the TrueCopy pair's volumes on both arrays
SI_LDEV = 0x601  # site B's ShadowImage copy of its TrueCopy volume
FILES = 12


def say(text: str) -> None:
    print(f"[drill] {text}", flush=True)


class Drill:
    """The parties and what the steps learned (checksums, devices) on the way."""

    def __init__(self, workdir: Path) -> None:
        self.w = workdir
        self.mnt = workdir / "fs1"
        daemon = "command_timeout = 5\n"  # a dead site's I/O fails in seconds, not minutes
        self.a = array(workdir, "siteA", "siteB", volume(workdir, "tca", SERIAL["siteA"], LDEV,
                       "32MiB"), "drill-a", daemon=daemon)  # fmt: skip
        self.b = array(workdir, "siteB", "siteA", volume(workdir, "tcb", SERIAL["siteB"], LDEV,
                       "32MiB") + volume(workdir, "si0", SERIAL["siteB"], SI_LDEV, "32MiB",
                       'export = "none"\n'), "drill-b", daemon=daemon)  # fmt: skip
        self.host: subprocess.Popen[bytes] | None = None
        self.agent: subprocess.Popen[bytes] | None = None
        self.sums: dict[str, str] = {}
        self.si_digest = ""

    # -- the parties --------------------------------------------------------------------------

    def vscsi(self, d: Daemon, *args: str) -> tuple[int, str]:
        return run_rc(VSCSI, *args, "--socket", d.socket, timeout=300)

    def inq(self, dev: str) -> dict[str, Any]:
        (info,) = json.loads(run(VSCSI, "inq", "--json", dev))
        return dict(info)

    def start_host(self) -> None:
        cfg = self.w / "host.toml"
        cfg.write_text(
            f'[host]\nsocket = "{self.w}/host.sock"\npoll = 1.0\ntimeout = 1.0\n'
            f'[[filesystem]]\nname = "fs1"\nvolume = "{SERIAL["siteA"]}:{LDEV:#06x}"\n'
            f'mountpoint = "{self.mnt}"\nfstype = "ext4"\n'
        )
        self.mnt.mkdir(exist_ok=True)
        log = (self.w / "host.log").open("ab")
        self.host = subprocess.Popen([VSCSI, "host", "run", "-c", str(cfg)], stdout=log,
                                     stderr=subprocess.STDOUT)  # fmt: skip

    def fs(self) -> dict[str, Any]:
        (fs,) = request(str(self.w / "host.sock"), "status")["filesystems"]
        return dict(fs)

    def host_cli(self, *args: str) -> tuple[int, str]:
        return run_rc(VSCSI, "host", *args, "--socket", str(self.w / "host.sock"), timeout=120)

    def agent_config(self, a_socket: str = "", name: str = "agent.toml") -> Path:
        """The agent's config; `a_socket`: where it looks for site A's array instead."""
        cfg = self.w / name
        cfg.write_text(
            "[agent]\npoll = 1.0\ndown_after = 3\nchangeover_timeout = 120\n"
            f'[[site]]\nname = "siteA"\nsocket = "{a_socket or self.a.socket}"\n'
            f'[[site]]\nname = "siteB"\nsocket = "{self.b.socket}"\n'
            '[[pair]]\nname = "tc"\n'
            f'[host]\nsocket = "{self.w}/host.sock"\nfilesystems = ["fs1"]\n'
        )
        return cfg

    def wait(self, what: str, cond: Callable[[], bool], timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n{self.logs()}")
            time.sleep(0.5)

    def logs(self) -> str:
        tails = []
        for name in ("host.log", "agent.log", "drill-a.log", "drill-b.log"):
            p = self.w / name
            if p.exists():
                tails.append(f"-- {name}\n" + "\n".join(p.read_text().splitlines()[-15:]))
        return "\n".join(tails)

    def mounted_on(self, dev: str) -> bool:
        try:
            fs = self.fs()
        except ControlError:  # the follower is not up yet
            return False
        return bool(fs["state"] == "mounted" and fs["device"] == dev)

    def checksums(self) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(self.mnt.glob("file*"))}  # fmt: skip

    def same_volumes(self) -> None:
        """The two arrays' copies are identical (the filesystem frozen meanwhile)."""
        run("fsfreeze", "-f", str(self.mnt))
        try:
            run("cmp", str(self.w / "tca.img"), str(self.w / "tcb.img"))
        finally:
            run("fsfreeze", "-u", str(self.mnt))

    def stop(self) -> None:
        for p in (self.agent, self.host):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(60)
        run_rc("umount", str(self.mnt))
        for d in (self.a, self.b):
            if d.proc is not None:
                d.stop()

    # -- the steps ----------------------------------------------------------------------------

    def step_pairs(self) -> None:
        say(
            "two arrays up; TrueCopy pair tc (fence never) A:tca -> B:tcb; ShadowImage si "
            "on site B: tcb -> si0 (MU#0, not exported: the storage server never sees it)"
        )
        make_keys(self.w)
        start_all(self.b, self.a)
        rc, out = self.vscsi(self.a, "pair", "create", "tca", "siteB:tcb", "--fence", "never",
                             "--name", "tc", "--wait", "300")  # fmt: skip
        assert rc == 0 and out.splitlines()[-1] == "pair tc: PAIR", out
        rc, out = self.vscsi(self.b, "pair", "create", "tcb", "si0", "--mu", "0", "--name", "si",
                             "--wait", "300")  # fmt: skip
        assert rc == 0 and out.splitlines()[-1] == "pair si: PAIR", out
        a, b = self.inq(self.a.sd("tca")), self.inq(self.b.sd("tcb"))
        assert (a["remote"]["role"], a["remote"]["status"]) == ("P-VOL", "PAIR"), a
        assert (b["remote"]["role"], b["mu"][0]["role"]) == ("S-VOL", "P-VOL"), b
        say(
            f"vscsi inq: {self.a.sd('tca')} HORC = P-VOL PAIR; {self.b.sd('tcb')} HORC = S-VOL "
            "PAIR, MU#0 = P-VOL"
        )

    def step_mount_and_write(self) -> None:
        say("ext4 on the P-VOL; the storage server mounts the primary; files written")
        run("mkfs.ext4", "-q", "-F", self.a.sd("tca"))
        self.start_host()
        self.wait("the storage server to mount the P-VOL",
                  lambda: self.mounted_on(self.a.sd("tca")))  # fmt: skip
        for i in range(FILES):
            (self.mnt / f"file{i:02d}").write_bytes(os.urandom(64 << 10))
        run("sync")
        self.sums = self.checksums()
        # the ShadowImage copy: a consistent point in time (file system frozen for the split)
        run("fsfreeze", "-f", str(self.mnt))
        try:
            rc, out = self.vscsi(self.b, "pair", "split", "si")
        finally:
            run("fsfreeze", "-u", str(self.mnt))
        assert rc == 0, out
        self.si_digest = hashlib.sha256((self.w / "si0.img").read_bytes()).hexdigest()
        self.same_volumes()
        say(f"{FILES} files, checksums kept; si split (PSUS): the point-in-time copy")

    def agent_decides(self, cfg: Path) -> dict[str, Any]:
        """What `vscsi agent check` decides for pair tc over enough rounds to act, where a
        site or the link is down but no takeover is due (exit status 1: degraded)."""
        rc, out = run_rc(VSCSI, "agent", "check", "-c", str(cfg), "--rounds", "4", "--json",
                         timeout=120)  # fmt: skip
        assert rc == 1, out
        (decision,) = json.loads(out)["pairs"]
        return dict(decision)

    def step_agent_holds_back(self) -> None:
        say(
            "the agent must not act: the link cut between two healthy sites, then site A's "
            "array out of the agent's reach while its link is up"
        )
        cut("down")
        try:
            # fence never: served (not a file* the checksums cover: the SI copy predates it)
            (self.mnt / "written-during-cut").write_bytes(os.urandom(64 << 10))
            run("sync")
            d = self.agent_decides(self.agent_config())
            assert d["action"] == "none" and "link down, both sites healthy" in d["reason"], d
            say(f"link cut: agent: {d['reason']}; the P-VOL kept serving (fence never)")
        finally:
            mend("down")
        self.wait("the link back", lambda: all(
            link["up"] for d in (self.a, self.b) for link in request(d.socket, "status")["links"]
        ))  # fmt: skip
        rc, out = self.vscsi(self.a, "pair", "resync", "tc", "--wait", "300")
        assert rc == 0 and out.splitlines()[-1] == "pair tc: PAIR", out
        self.same_volumes()  # the write made during the cut reached site B by the resync
        d = self.agent_decides(self.agent_config(str(self.w / "nowhere.sock"), "agent-lost.toml"))
        assert d["action"] == "none" and d["reason"].startswith(
            "takeover refused: the agent cannot reach siteA"), d  # fmt: skip
        rc, out = self.vscsi(self.b, "pair", "display", "tc", "--json")
        assert json.loads(out)["pairs"][0]["svol"]["status"] == "PAIR", out
        say(f"site A out of reach: agent: {d['reason']}")

    def step_site_a_dies(self) -> None:
        say("site A's array is killed; the agent, in a dry run first, then for real")
        self.a.kill()
        cfg = self.agent_config()
        rc, out = run_rc(VSCSI, "agent", "check", "-c", str(cfg), "--rounds", "3", "--json",
                         timeout=120)  # fmt: skip
        (decision,) = json.loads(out)["pairs"] if rc == 3 else [{}]  # 3: would take over
        assert (decision.get("action"), decision.get("site")) == ("takeover", "siteB"), out
        rc, out = self.vscsi(self.b, "pair", "display", "tc", "--json")
        assert json.loads(out)["pairs"][0]["svol"]["status"] == "PAIR", out  # dry: unchanged
        log = (self.w / "agent.log").open("ab")
        self.agent = subprocess.Popen([VSCSI, "agent", "-c", str(cfg)], stdout=log,
                                      stderr=subprocess.STDOUT)  # fmt: skip
        new = self.b.sd("tcb")
        self.wait("the agent's takeover and the remount on site B",
                  lambda: self.mounted_on(new), timeout=240)  # fmt: skip
        assert self.checksums() == self.sums
        b = self.inq(new)
        assert (b["remote"]["role"], b["remote"]["status"]) == ("S-VOL", "SSWS"), b
        took = self.fs()["last_changeover_seconds"]
        assert took is not None and took > 0, self.fs()
        say(
            f"agent: SVOL-takeover at site B (SSWS); storage server remounted on {new} after "
            f"a changeover of {took:.1f} s (no primary meanwhile: I/O impossible); files verified"
        )

    def step_old_primary_returns(self) -> None:
        say(
            "site A comes back with its link still cut: fenced; forced writable by hand it is a "
            "second primary, which the storage server refuses; the link back, it is demoted"
        )
        assert self.agent is not None
        self.agent.send_signal(signal.SIGTERM)  # the operator takes over from here
        self.agent.wait(60)
        cut("down")
        try:
            self.a.start()
            a = self.inq(self.a.sd("tca"))
            assert (a["remote"]["role"], a["remote"]["fenced"]) == ("P-VOL", True), a
            rc, out = run_rc("sg_dd", "if=/dev/zero", f"of={self.a.sg('tca')}", "bs=512",
                             "count=1", "seek=2048")  # fmt: skip
            assert rc != 0 and "data protect" in out.lower(), out  # the old primary refused
            assert self.mounted_on(self.b.sd("tcb"))  # a fenced P-VOL claims nothing
            rc, out = self.vscsi(self.a, "takeover", "tc")
            assert rc == 4, out  # PVOL-takeover: the operator's mistake
            self.wait("the storage server to refuse two primaries",
                      lambda: self.fs()["state"] == "refused")  # fmt: skip
            say(f"storage server: {self.fs()['reason']}")
        finally:
            mend("down")
        self.wait("site B remounted", lambda: self.mounted_on(self.b.sd("tcb")), timeout=180)
        assert self.checksums() == self.sums
        self.wait(
            "site B's link to site A back up (an operator checks before resync --swaps)",
            lambda: all(x["up"] for x in request(self.b.socket, "status")["links"]),
        )
        rc, out = self.vscsi(self.b, "pair", "resync", "tc", "--swaps", "--wait", "300")
        assert rc == 0 and out.splitlines()[-1] == "pair tc: PAIR", out
        a = self.inq(self.a.sd("tca"))
        assert (a["remote"]["role"], a["remote"]["status"]) == ("S-VOL", "PAIR"), a
        self.same_volumes()
        say("resync --swaps at site B: B is the P-VOL, A the S-VOL; the copies are identical")

    def step_corruption_recovery(self) -> None:
        say(
            "the file system is corrupted; the ShadowImage copy is restored onto the TrueCopy "
            "primary; fsck clean; files verified; the ShadowImage copy intact"
        )
        dev = self.b.sd("tcb")
        rc, out = self.host_cli("unmount", "fs1")
        assert rc == 0, out
        rescan(dev)  # the kernel last saw it write protected (an S-VOL then)
        run("dd", "if=/dev/zero", f"of={dev}", "bs=4096", "seek=1", "count=255",
            "oflag=direct", "conv=notrunc")  # fmt: skip  # group descriptors, bitmaps, inodes
        rc, out = run_rc("fsck.ext4", "-n", dev)
        assert rc != 0, out
        say(f"fsck -n after the damage: exit {rc}")
        rc, out = self.vscsi(self.b, "pair", "split", "tc")
        assert rc == 0, out  # a restore onto a TrueCopy P-VOL waits for the split (cascade)
        rc, out = self.vscsi(self.b, "pair", "restore", "si", "--wait", "300")
        assert rc == 0, out
        run("fsck.ext4", "-n", dev)  # exit 0: clean
        assert hashlib.sha256((self.w / "si0.img").read_bytes()).hexdigest() == self.si_digest
        rc, out = self.host_cli("remount", "fs1", "--timeout", "60")
        assert rc == 0, out
        assert self.mounted_on(dev) and self.checksums() == self.sums
        rc, out = self.vscsi(self.b, "pair", "resync", "tc", "--wait", "300")
        assert rc == 0 and out.splitlines()[-1] == "pair tc: PAIR", out
        self.same_volumes()
        say(
            "restored from si (still PSUS, unchanged); fsck -n clean; files verified; the TC "
            "resync carried the restored grains to site A"
        )

    def step_fail_back(self) -> None:
        say("fail back: the storage server unmounts, swap-takeover at site A, remount on A")
        rc, out = self.host_cli("unmount", "fs1")
        assert rc == 0, out
        rc, out = self.vscsi(self.a, "takeover", "tc")
        assert (rc, out) == (1, "pair tc: swap\n"), out
        rc, out = self.host_cli("remount", "fs1", "--timeout", "60")
        assert rc == 0, out
        assert self.mounted_on(self.a.sd("tca")) and self.checksums() == self.sums
        a = self.inq(self.a.sd("tca"))
        assert (a["remote"]["role"], a["remote"]["status"]) == ("P-VOL", "PAIR"), a
        self.same_volumes()
        say(f"back on site A ({self.a.sd('tca')}, P-VOL PAIR); files verified; copies identical")


STEPS = ["step_pairs", "step_mount_and_write", "step_agent_holds_back", "step_site_a_dies",
         "step_old_primary_returns", "step_corruption_recovery", "step_fail_back"]  # fmt: skip


def main() -> int:
    run("modprobe", "target_core_user")
    with tempfile.TemporaryDirectory(prefix="vscsi-drill-") as tmp:
        run("mount", "-t", "tmpfs", "-o", "size=512M", "tmpfs", tmp)  # the VM's /tmp is small
        try:
            with network():
                drill = Drill(Path(tmp))
                try:
                    for step in STEPS:
                        getattr(drill, step)()
                except AssertionError as e:
                    say(f"FAILED: {e}")
                    return 1
                finally:
                    drill.stop()
        finally:
            run_rc("umount", tmp)
    say("drill complete: every step held")
    return 0


if __name__ == "__main__":
    sys.exit(main())
