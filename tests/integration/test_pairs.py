"""Pairs seen from the host through the real kernel: page 0xC0 with sg_vpd and `vscsi inq`,
unit attentions, write protection, resync and restore with a file system, SIGKILL during COPY
and RCPY, three MUs, and an S-VOL that fails.

The tests run in file order and walk one P-VOL through its life: create → COPY → PAIR → split
→ resync → split → restore → delete, then crashes, then three MUs at once; on each transport.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import VSCSI, Daemon, run, run_rc
from vscsi.control import request
from vscsi.pair.vpd import parse_page

MIB = 1 << 20
SIZE = 16 * MIB  # copied at copy_rate 2 MiB/s: a copy runs for 8 s
GRAIN = 64 << 10


@pytest.fixture(scope="module")
def daemon(here: Path, transport: str, baddev: str) -> Iterator[Daemon]:
    vols = "".join(
        f'\n[[volume]]\nname = "{name}"\npath = "{here}/{name}.img"\nsize = "16MiB"\n'
        f'create = true\n[volume.identity]\nserial = 410002\nvolume_id = {vid}\nport = "CL1-A"\n'
        for name, vid in (("pv", 0x200), ("sv0", 0x201), ("sv1", 0x202), ("sv2", 0x203))
    )
    vols += (
        f'\n[[volume]]\nname = "pv2"\npath = "{here}/pv2.img"\nsize = "16MiB"\ncreate = true\n'
        f"[volume.identity]\nserial = 410002\nvolume_id = 0x210\n"
        f'\n[[volume]]\nname = "sbad"\npath = "{baddev}"\n'
        f"[volume.identity]\nserial = 410002\nvolume_id = 0x211\n"
    )
    d = Daemon(
        here,
        f'transport = "{transport}"\nstate_dir = "{here}/pairstate"\ncopy_rate = "2MiB"\n{vols}',
        "pairs",
    )
    d.start()
    yield d
    if d.proc is not None:
        d.stop()


# -- helpers ----------------------------------------------------------------------------------


def vpd_hex(daemon: Daemon, volume: str, page: int) -> bytes:
    """A VPD page as `sg_vpd -p PAGE --hex` prints it, back to bytes."""
    out = run("sg_vpd", "-p", hex(page), "--hex", daemon.sg(volume))
    data = bytearray()
    for line in out.splitlines():
        offset, *rest = line.split() or [""]
        if not re.fullmatch(r"[0-9a-f]{2,}", offset) or int(offset, 16) != len(data):
            continue
        for token in rest[:16]:  # then the ASCII column
            if not re.fullmatch(r"[0-9a-f]{2}", token):
                break
            data.append(int(token, 16))
    return bytes(data[: int.from_bytes(data[2:4], "big") + 4])


def vpd_c0(daemon: Daemon, volume: str) -> Any:
    """Page 0xC0 decoded with our declaration."""
    return parse_page(vpd_hex(daemon, volume, 0xC0)).body


def mu_roles(body: Any) -> list[tuple[str, str]]:
    return [(s.role.value, s.status.value) for s in body.slots[1:]]


def pair(daemon: Daemon, name: str) -> dict[str, Any]:
    """What `vscsi pair display NAME --json` shows, asked on the control socket directly (it is
    polled: a CLI process per poll is slow in the emulated VM)."""
    (p,) = request(daemon.socket, "pair_display", name=name)["pairs"]
    return p


def vscsi(daemon: Daemon, *args: str, timeout: float = 300) -> str:
    """The CLI, where it is what the test checks; the rest use `op` (a CLI process costs
    seconds in the emulated VM)."""
    return run(VSCSI, *args, "--socket", daemon.socket, timeout=timeout)


def op(daemon: Daemon, cmd: str, **args: Any) -> Any:
    """A pair operation on the control socket, as the CLI sends it."""
    return request(daemon.socket, cmd, **args)


def wait_copied(daemon: Daemon, name: str, timeout: float = 120) -> None:
    """What `vscsi pair wait NAME` waits for: the copy (COPY/RCPY) has ended."""
    wait_for(lambda: pair(daemon, name)["status"] not in ("COPY", "RCPY"), timeout,
             f"the copy of pair {name}")  # fmt: skip


def wait_for(cond: Any, timeout: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def unit_attentions(daemon: Daemon, volume: str) -> str:
    """What `sg_turs` reports until the LUN is ready (pending unit attentions, in order)."""
    seen = []
    for _ in range(8):
        rc, out = run_rc("sg_turs", "-v", daemon.sg(volume))
        if rc == 0:
            break
        seen.append(out)
    if seen:  # the kernel answers each with a udev "change" whose probe reads the disk: done
        run("udevadm", "settle", "--timeout=120")  # before it can take the next one
    return "\n".join(seen)


def write_past_attentions(daemon: Daemon, volume: str) -> tuple[int, str]:
    """sg_raw's WRITE(10) of block 0, sent again after each UNIT ATTENTION (the restore's
    3F/03 first): the answer to the write itself. No `udevadm settle` in between, unlike
    `unit_attentions`: on a slow machine the probes it waits for outlast a short copy."""
    for _ in range(8):
        rc, out = run_rc("sg_raw", "-s", "512", "-i", "/dev/zero", daemon.sg(volume),
                         "2a", "00", "00", "00", "00", "00", "00", "00", "01", "00")  # fmt: skip
        if not re.search(r"unit attention", out, re.I):
            return rc, out
    raise AssertionError(f"UNIT ATTENTION 8 times in a row:\n{out}")


def backing(here: Path, volume: str) -> bytes:
    return (here / f"{volume}.img").read_bytes()


def digest(here: Path, volume: str) -> str:
    return hashlib.sha256(backing(here, volume)).hexdigest()


def write_dev(daemon: Daemon, volume: str, offset: int, data: bytes, here: Path) -> None:
    """Write through the host's block device (4 KiB aligned), acknowledged when it returns."""
    src = here / "chunk.bin"
    src.write_bytes(data)
    run("dd", f"if={src}", f"of={daemon.sd(volume)}", "bs=4096", f"seek={offset // 4096}",
        "oflag=direct", "conv=notrunc,fsync")  # fmt: skip


def cmp_files(a: Path, b: Path, length: int | None = None) -> None:
    args = ["cmp", str(a), str(b)] + (["-n", str(length)] if length else [])
    run(*args)


# -- the life of one pair ---------------------------------------------------------------------


def test_simplex_page_and_inq(daemon: Daemon) -> None:
    assert 0xC0 in vpd_hex(daemon, "pv", 0x00)[4:]
    body = vpd_c0(daemon, "pv")
    assert (body.version, body.serial, body.volume_id, body.port) == (1, 410002, 0x200, "CL1-A")
    assert mu_roles(body) == [("SMPL", "SMPL")] * 3
    line = run(VSCSI, "inq", daemon.sd("pv"))
    assert (
        "Ser = 410002" in line and "HORC = SMPL HOMRCF[MU#0 = SMPL MU#1 = SMPL MU#2 = SMPL]" in line
    )


def test_create_copy_then_pair(daemon: Daemon, here: Path) -> None:
    run("dd", "if=/dev/urandom", f"of={daemon.sd('pv')}", "bs=1M", "count=16", "oflag=direct")
    unit_attentions(daemon, "pv")
    vscsi(daemon, "pair", "create", "pv", "sv0", "--mu", "0", "--name", "si0")
    body, sbody = vpd_c0(daemon, "pv"), vpd_c0(daemon, "sv0")  # at once: the copy takes 8 s
    assert mu_roles(body)[0] == ("P-VOL", "COPY") and body.slots[1].progress < 100
    assert mu_roles(sbody)[0] == ("S-VOL", "COPY")
    assert body.slots[1].partner_volume_id == 0x201
    gen = body.slots[1].generation
    assert "Inquiry data has changed" in unit_attentions(daemon, "pv")
    vscsi(daemon, "pair", "wait", "si0", "--timeout", "120")
    body = vpd_c0(daemon, "pv")
    assert mu_roles(body)[0] == ("P-VOL", "PAIR") and body.slots[1].progress == 100
    assert body.slots[1].generation > gen
    assert "Inquiry data has changed" in unit_attentions(daemon, "sv0")
    cmp_files(here / "pv.img", here / "sv0.img")
    inq = json.loads(run(VSCSI, "inq", "--json", daemon.sd("pv"), daemon.sd("sv0")))
    assert [d["mu"][0]["role"] for d in inq] == ["P-VOL", "S-VOL"]


def test_svol_is_write_protected_in_pair(daemon: Daemon, here: Path) -> None:
    rc, out = run_rc("sg_dd", "if=/dev/zero", f"of={daemon.sg('sv0')}", "bs=512", "count=8")
    assert rc != 0 and re.search(r"data protect", out, re.I), out
    assert re.search(r"write protected", out, re.I), out
    rc, out = run_rc("dd", "if=/dev/zero", f"of={daemon.sd('sv0')}", "bs=4096", "count=1",
                     "oflag=direct")  # fmt: skip
    assert rc != 0, out
    mode = run("sg_modes", "-p", "0x0a", daemon.sg("sv0"))
    assert "WP=1" in mode.replace(" ", "") or "write protect" in mode.lower(), mode
    write_dev(daemon, "pv", 8 * MIB, b"P" * 8192, here)  # mirrored before it is acked
    assert backing(here, "sv0")[8 * MIB : 8 * MIB + 8192] == b"P" * 8192


def test_split_then_both_sides_write_then_resync_copies_the_union(
    daemon: Daemon, here: Path
) -> None:
    vscsi(daemon, "pair", "split", "si0")
    shown = vscsi(daemon, "pairdisplay", "si0").splitlines()
    assert shown[1].split()[6:8] == ["P-VOL", "PSUS"] and shown[2].split()[6:8] == ["S-VOL", "PSUS"]
    assert mu_roles(vpd_c0(daemon, "sv0"))[0] == ("S-VOL", "PSUS")
    assert "Inquiry data has changed" in unit_attentions(daemon, "sv0")
    split_image = backing(here, "sv0")
    assert split_image == backing(here, "pv")
    write_dev(daemon, "pv", 12 * MIB, b"p" * 4096, here)  # grain 192
    write_dev(daemon, "sv0", 12 * MIB, b"s" * 4096, here)  # grain 192 again
    write_dev(daemon, "sv0", 14 * MIB + 4096, b"s" * 8192, here)  # grain 224
    p = pair(daemon, "si0")
    assert (p["pvol"]["changed_bytes"], p["svol"]["changed_bytes"]) == (GRAIN, 2 * GRAIN)
    vscsi(daemon, "pair", "resync", "si0", "--wait", "120")
    p = pair(daemon, "si0")
    assert p["status"] == "PAIR" and p["copy_total"] == 2 * GRAIN and p["copied"] == 2 * GRAIN
    cmp_files(here / "pv.img", here / "sv0.img")


def test_restore_rolls_back_a_corrupted_filesystem(daemon: Daemon, here: Path) -> None:
    pv = daemon.sd("pv")
    run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", pv)
    mnt = here / "mnt"
    mnt.mkdir(exist_ok=True)
    run("mount", pv, str(mnt))
    for i in range(20):
        (mnt / f"f{i}").write_bytes(os.urandom(200_000))
    (mnt / "sums").write_text(run("sh", "-c", f"cd {mnt} && sha256sum f*"))
    run("umount", str(mnt))  # in PAIR: everything is on the S-VOL too
    vscsi(daemon, "pair", "split", "si0", "--read-only")
    sv_before = digest(here, "sv0")
    rc, out = run_rc("sg_dd", "if=/dev/zero", f"of={daemon.sg('sv0')}", "bs=512", "count=1")
    assert rc != 0 and re.search(r"write protected", out, re.I), out  # split --read-only
    run("dd", "if=/dev/urandom", f"of={pv}", "bs=1M", "count=2", "oflag=direct", "conv=fsync")
    run("blockdev", "--flushbufs", pv)
    rc, _ = run_rc("fsck.ext4", "-n", pv)
    assert rc != 0  # really corrupted
    vscsi(daemon, "pair", "restore", "si0", "--wait", "120")
    assert mu_roles(vpd_c0(daemon, "pv"))[0] == ("P-VOL", "PSUS")
    run("blockdev", "--flushbufs", pv)
    run("fsck.ext4", "-n", "-f", pv)
    mnt = here / "mnt"
    run("mount", pv, str(mnt))
    try:
        run("sh", "-c", f"cd {mnt} && sha256sum -c --quiet sums")
    finally:
        run("umount", str(mnt))
    assert digest(here, "sv0") == sv_before  # the good copy is kept
    assert pair(daemon, "si0")["copy_total"] == 2 * MIB


def test_delete_makes_both_simplex_and_writable(daemon: Daemon, here: Path) -> None:
    # the restore's unit attentions, reported to the kernel's own reads, left udev probes
    run("udevadm", "settle", "--timeout=120")  # that would take the one this test checks
    vscsi(daemon, "pair", "delete", "si0")
    for vol in ("pv", "sv0"):
        assert mu_roles(vpd_c0(daemon, vol)) == [("SMPL", "SMPL")] * 3
        assert "Inquiry data has changed" in unit_attentions(daemon, vol)
    write_dev(daemon, "sv0", 0, b"w" * 4096, here)
    assert "no pairs" in vscsi(daemon, "pairdisplay")


# -- crashes ----------------------------------------------------------------------------------


def test_sigkill_during_copy_resumes_from_its_progress(daemon: Daemon, here: Path) -> None:
    run("dd", "if=/dev/urandom", f"of={daemon.sd('pv')}", "bs=1M", "count=16", "oflag=direct")
    op(daemon, "pair_create", name="si0", pvol="pv", svol="sv0", mu=0)
    wait_for(lambda: pair(daemon, "si0")["progress"] >= 50, what="copy progress")
    daemon.kill()
    daemon.start()
    p = pair(daemon, "si0")
    assert p["status"] in ("COPY", "PAIR") and p["progress"] > 0, p
    wait_copied(daemon, "si0")
    p = pair(daemon, "si0")
    assert p["status"] == "PAIR" and p["copied"] < SIZE, p  # resumed, not from zero
    cmp_files(here / "pv.img", here / "sv0.img")


def test_sigkill_during_restore(daemon: Daemon, here: Path) -> None:
    op(daemon, "pair_split", name="si0")
    good = backing(here, "sv0")
    run("dd", "if=/dev/zero", f"of={daemon.sd('pv')}", "bs=1M", "count=16", "oflag=direct")
    op(daemon, "pair_restore", name="si0")  # 16 MiB at 2 MiB/s: the checks below come first
    rc, out = write_past_attentions(daemon, "pv")
    assert rc != 0 and re.search(r"not ready", out, re.I), out  # P-VOL: no writes in RCPY
    wait_for(lambda: pair(daemon, "si0")["progress"] >= 30, what="restore progress")
    daemon.kill()
    daemon.start()
    wait_copied(daemon, "si0")
    assert pair(daemon, "si0")["status"] == "PSUS"
    assert backing(here, "pv") == good and backing(here, "sv0") == good


def test_sigkill_after_split_keeps_the_split(daemon: Daemon, here: Path) -> None:
    """An acknowledged split survives a SIGKILL right after it: PSUS after the restart, the
    S-VOL still the point-in-time image (not re-copied), the P-VOL's later write tracked."""
    op(daemon, "pair_resync", name="si0")
    wait_copied(daemon, "si0")
    write_dev(daemon, "pv", 2 * MIB, os.urandom(8192), here)
    op(daemon, "pair_split", name="si0")
    image = backing(here, "sv0")
    write_dev(daemon, "pv", 6 * MIB, os.urandom(8192), here)
    daemon.kill()
    daemon.start()
    p = pair(daemon, "si0")
    assert p["status"] == "PSUS" and p["pvol"]["changed_bytes"] >= GRAIN, p
    time.sleep(2)  # a re-copy, if one started, would be under way by now
    assert backing(here, "sv0") == image


# -- several pairs at once, and a failing S-VOL -----------------------------------------------


def test_three_mus_on_one_pvol(daemon: Daemon, here: Path) -> None:
    op(daemon, "pair_resync", name="si0")
    op(daemon, "pair_create", name="si1", pvol="pv", svol="sv1", mu=1)
    op(daemon, "pair_create", name="si2", pvol="pv", svol="sv2", mu=2)
    for name in ("si0", "si1", "si2"):
        wait_copied(daemon, name, 180)
    body = vpd_c0(daemon, "pv")
    assert mu_roles(body) == [("P-VOL", "PAIR")] * 3
    assert [s.partner_volume_id for s in body.slots[1:]] == [0x201, 0x202, 0x203]
    line = run(VSCSI, "inq", daemon.sd("pv"))
    assert "HOMRCF[MU#0 = P-VOL MU#1 = P-VOL MU#2 = P-VOL]" in line, line
    write_dev(daemon, "pv", 4 * MIB, os.urandom(64 * 1024), here)
    for sv in ("sv0", "sv1", "sv2"):
        cmp_files(here / "pv.img", here / f"{sv}.img")
    export = run(VSCSI, "inq", "--export", daemon.sd("sv2"))
    assert "VSCSI_ROLE=S-VOL" in export.splitlines() and "VSCSI_SERIAL=410002" in export


def test_udev_rule_links_follow_the_role(daemon: Daemon) -> None:
    rules = Path("/run/udev/rules.d")
    rules.mkdir(parents=True, exist_ok=True)
    rule = Path(__file__).parents[2] / "examples" / "udev" / "60-vscsi.rules"
    installed = rules / "60-vscsi.rules"
    installed.write_text(rule.read_text().replace("/usr/local/bin/vscsi", VSCSI))
    links = Path("/dev/disk/by-vscsi")
    try:
        run("udevadm", "control", "--reload")
        # as the rule's install steps say, but for the two disks checked: each disk's rule runs
        # `vscsi inq`, an interpreter start of seconds in the emulated VM
        disks = [Path("/sys/class/block") / Path(daemon.sd(v)).name for v in ("pv", "sv1")]
        run("udevadm", "trigger", "--action=add", *map(str, disks),
            *(str((d / "device").resolve()) for d in disks))  # fmt: skip
        run("udevadm", "settle", "--timeout=120")
        assert (links / "410002-0202-S-VOL").resolve() == Path(daemon.sd("sv1"))
        assert (links / "410002-0200-P-VOL").resolve() == Path(daemon.sd("pv"))
        op(daemon, "pair_delete", name="si1")
        run("sg_turs", daemon.sg("sv1"), check=False)  # meets the unit attention
        wait_for(lambda: (links / "410002-0202-SMPL").exists(), 120, "the SMPL link")
        assert not (links / "410002-0202-S-VOL").exists()
    finally:
        installed.unlink()
        run("udevadm", "control", "--reload")


def test_svol_write_error_suspends_without_failing_the_host(daemon: Daemon, here: Path) -> None:
    op(daemon, "pair_create", name="bad", pvol="pv2", svol="sbad", mu=0)
    wait_for(lambda: pair(daemon, "bad")["status"] != "COPY", what="copy into the bad S-VOL")
    assert pair(daemon, "bad")["status"] == "PSUE"
    assert mu_roles(vpd_c0(daemon, "sbad"))[0] == ("S-VOL", "PSUE")
    unit_attentions(daemon, "sbad")
    rc, out = run_rc("sg_turs", "-v", daemon.sg("sbad"))
    assert rc != 0 and re.search(r"not ready", out, re.I), out
    write_dev(daemon, "pv2", 0, b"x" * 4096, here)  # the P-VOL runs on
    assert pair(daemon, "bad")["pvol"]["changed_bytes"] > 0
    op(daemon, "pair_delete", name="bad")


def test_sigkill_after_delete_keeps_it_deleted(daemon: Daemon) -> None:
    op(daemon, "pair_delete", name="si0")
    daemon.kill()
    daemon.start()
    assert "si0" not in [p["pair"] for p in op(daemon, "pair_display")["pairs"]]
    assert mu_roles(vpd_c0(daemon, "sv0")) == [("SMPL", "SMPL")] * 3
