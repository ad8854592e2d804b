"""Remote pairs between two daemons (two arrays) through the real kernel. Each serves its volume
on its own LUN; their links live in two network namespaces joined by a veth pair (the two
sites' replication network), which the tests cut with `ip link set down` or `tc netem`.
Checked with fio's verification, a writer that remembers every acknowledged block, `cmp` of
the backing stores, sg_dd's sense data and CCI-like exit codes.

The daemons themselves run in the initial namespace: TCMU's generic netlink family exists only
there. `link_netns` puts only their link sockets in the site's namespace (docs/link.md)."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import VSCSI, Daemon, run, run_rc, start_all
from tests.integration.hostio import Reader, Writer, fio, fio_ok, rescan, wait_writes
from tests.integration.sites import (
    ADDR,
    NS,
    PORT,
    SERIAL,
    array,
    cut,
    make_keys,
    mend,
    network,
    volume,
)
from vscsi.control import request

MIB = 1 << 20
SIZE = 16 * MIB
SPAN = 4 * MIB  # where the host writes during a test: a resync copies at most this


def site_array(workdir: Path, name: str, peer: str, vol: str, **kw: Any) -> Daemon:
    serial = kw.pop("serial", SERIAL[name])
    return array(workdir, name, peer, volume(workdir, vol, serial, 0x600), f"{name}-{vol}", **kw)


@pytest.fixture(scope="module")
def sites(workdir: Path) -> Iterator[tuple[Daemon, Daemon]]:
    make_keys(workdir)
    a = site_array(workdir, "siteA", "siteB", "ra")
    b = site_array(workdir, "siteB", "siteA", "rb")
    with network():
        try:
            start_all(b, a)
            yield a, b
        finally:
            for d in (a, b):
                if d.proc is not None:
                    d.stop()


# -- helpers ----------------------------------------------------------------------------------


def cli(d: Daemon, *args: str) -> tuple[int, str]:
    return run_rc(VSCSI, *args, "--socket", d.socket, timeout=300)


def links(d: Daemon) -> list[dict[str, object]]:
    return list(request(d.socket, "status")["links"])


def linked(d: Daemon, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not all(x["up"] for x in links(d)):
        assert time.monotonic() < deadline, f"the link did not come up: {links(d)}"
        time.sleep(0.5)


def same(workdir: Path) -> None:
    run("cmp", str(workdir / "ra.img"), str(workdir / "rb.img"))


def settle(d: Daemon, vol: str) -> None:
    """Take the pending unit attentions (3F/03 after each state change)."""
    for _ in range(8):
        if run_rc("sg_turs", d.sg(vol))[0] == 0:
            return


def host_write(d: Daemon, vol: str, offset: int, data: bytes, workdir: Path) -> tuple[int, str]:
    src = workdir / "remote-chunk.bin"
    src.write_bytes(data)
    settle(d, vol)
    return run_rc("sg_dd", f"if={src}", f"of={d.sg(vol)}", "bs=512", f"seek={offset // 512}",
                  f"count={len(data) // 512}")  # fmt: skip


def status(d: Daemon) -> dict[str, object]:
    (p,) = request(d.socket, "pair_display", name="tc")["pairs"]
    return dict(p)


def copied(d: Daemon, timeout: float = 120) -> str:
    """What `vscsi pair ... --wait` waits for: the pair's status once its copy has ended."""
    deadline = time.monotonic() + timeout
    while (now := status(d))["status"] in ("COPY", "RCPY"):
        assert time.monotonic() < deadline, now
        time.sleep(0.2)
    return str(now["status"])


def create(a: Daemon, fence: str, *, through_cli: bool = False) -> None:
    """Pair ra with siteB:rb and wait for PAIR: on the control socket unless `through_cli` (a
    CLI process costs seconds in the emulated VM)."""
    if through_cli:
        rc, out = cli(a, "pair", "create", "ra", "siteB:rb", "--fence", fence, "--name", "tc",
                      "--wait", "120")  # fmt: skip
        assert rc == 0 and out.splitlines()[-1] == "pair tc: PAIR", out
    else:
        request(a.socket, "pair_create", name="tc", pvol="ra", svol="siteB:rb", fence=fence)
        assert copied(a) == "PAIR", status(a)


def resync(a: Daemon, workdir: Path, peer: Daemon | None = None, *,
           through_cli: bool = False) -> None:  # fmt: skip
    """Resync to PAIR; only what changed was copied; the copies are identical."""
    before = [status(d) for d in (a, peer) if d is not None]
    if through_cli:
        rc, out = cli(a, "pair", "resync", "tc", "--wait", "120")
        assert rc == 0 and out.splitlines()[-1] == "pair tc: PAIR", out
    else:
        request(a.socket, "pair_resync", name="tc")
        assert copied(a) == "PAIR", (before, status(a))
    assert 0 < int(status(a)["copy_total"]) <= SPAN, (before, status(a))
    same(workdir)


def fio_cut(d: Daemon, vol: str, how: str) -> tuple[int, str]:
    """fio writing 4 MiB of random blocks (rate-limited so that it surely runs ~16 s) with
    verification; the link is cut a second in and mended once fio ends."""
    settle(d, vol)
    rescan(d.sd(vol))  # read-only to the kernel since it was last write protected
    sd = d.sd(vol)
    job = fio(sd, size="4M", rate_iops=64)
    wait_writes(sd, 64)  # a second of fio's writes
    if job.poll() is not None:
        raise AssertionError(f"fio ended before the link was cut:\n{job.communicate()[0]}")
    cut(how)
    try:
        out, _ = job.communicate(timeout=300)
    finally:
        mend(how)
    return job.returncode, out


# -- tests, in order: each starts from the pair the previous one left -------------------------


def test_mirror_then_fence_never_under_fio_with_the_link_down(
    sites: tuple[Daemon, Daemon], workdir: Path
) -> None:
    a, b = sites
    linked(a)
    linked(b)
    create(a, "never", through_cli=True)
    assert host_write(a, "ra", MIB, os.urandom(4 * MIB), workdir)[0] == 0
    same(workdir)
    settle(b, "rb")
    rc, out = run_rc("sg_dd", "if=/dev/zero", f"of={b.sg('rb')}", "bs=512", "count=1")
    assert rc != 0 and re.search(r"data protect", out, re.I), out  # S-VOL read only in PAIR
    rc, out = fio_cut(a, "ra", "down")
    assert rc == 0 and "err= 0" in out, out  # fence never: every write succeeds, verified
    assert status(a)["status"] == "PSUE" and not status(a)["fenced"]
    linked(a)
    resync(a, workdir, peer=b, through_cli=True)


def test_sigkill_of_the_p_daemon_under_writes_resends_only_logged_regions(
    sites: tuple[Daemon, Daemon], workdir: Path
) -> None:
    a, _ = sites
    writer, reader = Writer(a.sd("ra"), SPAN), Reader(a.sd("ra"), SPAN)
    try:
        writer.start()
        reader.start()  # reads finish before the writes on the link: none may take their slot
        writer.wait_for(30)
        a.kill()
        a.start()  # the queued I/O is served; the writer goes on
        writer.wait_for(30)
    finally:
        reader.stop_and_check()
        writer.stop_and_verify()
    rc, out = cli(a, "pair", "wait", "tc", "--status", "PAIR", "--timeout", "120")
    assert rc == 0, (out, status(a), a.output()[-4000:])
    assert 0 < int(status(a)["copy_total"]) <= SPAN, status(a)  # the write-intent log's regions
    same(workdir)


def test_sigkill_of_the_s_daemon_under_writes_then_resync(
    sites: tuple[Daemon, Daemon], workdir: Path
) -> None:
    a, b = sites
    writer = Writer(a.sd("ra"), SPAN)
    try:
        writer.start()
        writer.wait_for(30)
        b.kill()
        writer.wait_for(30)  # fence never: the P-VOL goes on alone
        assert status(a)["status"] == "PSUE"
    finally:
        writer.stop_and_verify()
    b.start()
    linked(a)
    resync(a, workdir, peer=b)


def test_swap_takeover_with_both_sites_up_and_back(
    sites: tuple[Daemon, Daemon], workdir: Path
) -> None:
    a, b = sites
    rc, out = cli(b, "takeover", "tc")
    assert (rc, out) == (1, "pair tc: swap\n"), out  # swap-takeover: roles swap, nothing copied
    assert cli(b, "pair", "check", "tc")[1].startswith("pairvolchk : Volstat is P-VOL.")
    assert host_write(b, "rb", 2 * MIB, os.urandom(256 * 1024), workdir)[0] == 0
    same(workdir)  # the new P-VOL's write is on the old primary too
    assert host_write(a, "ra", 0, os.urandom(4096), workdir)[0] != 0  # now an S-VOL in PAIR
    rc, out = cli(a, "takeover", "tc")
    assert (rc, out) == (1, "pair tc: swap\n"), out  # fail back
    assert host_write(a, "ra", 3 * MIB, os.urandom(256 * 1024), workdir)[0] == 0
    same(workdir)


def test_fua_writes_at_queue_depth_reach_the_svol_whole(
    sites: tuple[Daemon, Daemon], workdir: Path
) -> None:
    """Every write FUA (O_SYNC), eight in flight: the S side applies them side by side
    (docs/link.md), and each is acknowledged only once durable on both arrays."""
    a, _ = sites
    fio_ok(fio(a.sd("ra"), size="2M", sync=True), a)
    assert status(a)["status"] == "PAIR", status(a)
    same(workdir)


def test_fence_data_fails_the_write_and_fences_the_pvol(
    sites: tuple[Daemon, Daemon], workdir: Path
) -> None:
    a, b = sites
    assert cli(a, "pair", "delete", "tc")[0] == 0
    create(a, "data")
    rc, out = fio_cut(a, "ra", "down")
    # the write that could not be copied: DATA PROTECT, which Linux hands fio as EREMOTEIO
    assert rc != 0 and "Remote I/O error" in out, out
    assert status(a)["status"] == "PSUE" and status(a)["fenced"]
    rc, out = host_write(a, "ra", 8 * MIB, bytes(4096), workdir)
    assert rc != 0 and re.search(r"data protect", out, re.I), out  # read only until resync
    run("dd", f"if={a.sd('ra')}", "of=/dev/null", "bs=1M", "iflag=direct")  # reads go on
    linked(a)
    resync(a, workdir, peer=b)


def test_fence_status_fails_the_write_it_could_not_report_then_tracks(
    sites: tuple[Daemon, Daemon], workdir: Path
) -> None:
    a, b = sites
    request(a.socket, "pair_delete", name="tc")
    create(a, "status")
    rc, out = fio_cut(a, "ra", "netem")
    assert rc != 0 and "Remote I/O error" in out, out  # the S side could not be marked
    assert status(a)["status"] == "PSUE" and not status(a)["fenced"]
    assert host_write(a, "ra", 0, os.urandom(4096), workdir)[0] == 0  # then writable, tracked
    linked(a)
    resync(a, workdir, peer=b)


def test_svol_takeover_with_the_p_site_down_old_primary_refused_then_swapped(
    sites: tuple[Daemon, Daemon], workdir: Path
) -> None:
    a, b = sites
    a.kill()
    rc, out = cli(b, "takeover", "tc")
    assert (rc, out) == (225, "pair tc: svol_e\n")  # SSWS, the P side unknown: EX_VOLCUR
    assert host_write(b, "rb", 2 * MIB, os.urandom(64 * 1024), workdir)[0] == 0
    a.start()  # the old primary: its peer took over, it must not take writes
    linked(a)
    linked(b)  # the resync below runs at b: b's session to a may still be in its back-off
    rc, out = host_write(a, "ra", 0, os.urandom(4096), workdir)
    assert rc != 0, out
    rc, out = cli(b, "pair", "resync", "tc", "--swaps", "--wait", "120")
    assert rc == 0 and out.splitlines()[-1] == "pair tc: PAIR", out
    same(workdir)
    assert cli(a, "pair", "check", "tc")[1].startswith("pairvolchk : Volstat is S-VOL.")


def test_an_impostor_and_a_malformed_hello_are_refused_and_change_nothing(
    sites: tuple[Daemon, Daemon], workdir: Path
) -> None:
    a, b = sites
    before = (workdir / "rb.img").read_bytes()
    # an array with its own key claiming to be siteA (name and serial): not the pinned cert
    make_keys(workdir, "impostor", "siteA")
    c = site_array(workdir, "siteA", "siteB", "rc", keys="impostor", accept=False,
                   serial=SERIAL["siteC"])  # fmt: skip
    c.start()
    try:
        refused = r"link: refused 10\.77\.0\.1:\d+: TLS"
        deadline = time.monotonic() + 60
        while not re.search(refused, b.output()):
            assert time.monotonic() < deadline, b.output()[-2000:]
            time.sleep(0.2)
        (link,) = links(c)
        assert not link["up"], link
    finally:
        c.stop()
    # the real siteA's key, then a frame that is not a HELLO: dropped before it is applied
    keys = workdir / "linkkeys"
    rc, out = run_rc("ip", "netns", "exec", NS["siteA"], str(Path(VSCSI).with_name("python")),
                     "-c", MALFORMED, str(keys), f"{ADDR['siteB']}:{PORT['siteB']}")  # fmt: skip
    assert rc == 0 and out.strip() == "closed", out
    assert re.search(r"link: refused 10\.77\.0\.1:\d+: malformed header", b.output()), b.output()
    assert (workdir / "rb.img").read_bytes() == before
    assert all(x["up"] for x in links(a))  # the real link was not disturbed


MALFORMED = """
import socket, ssl, sys
keys, (host, port) = sys.argv[1], sys.argv[2].split(":")
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.load_cert_chain(f"{keys}/siteA.crt", f"{keys}/siteA.key")
ctx.load_verify_locations(f"{keys}/siteB.crt")
with ctx.wrap_socket(socket.create_connection((host, int(port)), timeout=30)) as s:
    s.sendall(b"NOTAFRAME" * 8)
    print("closed" if s.recv(4096) == b"" else "answered")
"""
