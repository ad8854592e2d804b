"""Remote pairs between two daemons (two arrays) through the real kernel: each serves its
volume on its own LUN, the TLS link joins them over loopback, and `tc netem` cuts it. Checked
with `cmp` of the backing stores, sg_dd's sense data and CCI-like exit codes.

Both daemons run in the initial network namespace: TCMU's generic netlink family exists only
there, so a daemon in another namespace could not serve its LUN (see docs/remote.md)."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import VSCSI, Daemon, run, run_rc
from vscsi.control import request

MIB = 1 << 20
SIZE = 16 * MIB


def array(workdir: Path, name: str, serial: int, port: int, peer: str, peer_serial: int,
          peer_port: int, vol: str) -> Daemon:  # fmt: skip
    keys = workdir / "linkkeys"
    return Daemon(workdir, (
        f'state_dir = "{workdir}/{name}-state"\n'
        f'link_cert = "{keys}/{name}.crt"\nlink_key = "{keys}/{name}.key"\n'
        f'link_listen = "127.0.0.1:{port}"\nlink_timeout = 2.0\n'
        f'[[remote]]\nname = "{peer}"\naddress = "127.0.0.1:{peer_port}"\n'
        f'serial = {peer_serial}\npeer_cert = "{keys}/{peer}.crt"\n'
        f'[[volume]]\nname = "{vol}"\npath = "{workdir}/{vol}.img"\nsize = "16MiB"\n'
        f'create = true\n[volume.identity]\nserial = {serial}\nvolume_id = 0x600\n'
    ), name)  # fmt: skip


@pytest.fixture(scope="module")
def sites(workdir: Path) -> Iterator[tuple[Daemon, Daemon]]:
    keys = workdir / "linkkeys"
    run(VSCSI, "link", "keys", "--dir", str(keys), "--name", "siteA", "--serial", "410011")
    run(VSCSI, "link", "keys", "--dir", str(keys), "--name", "siteB", "--serial", "410012")
    a = array(workdir, "siteA", 410011, 7101, "siteB", 410012, 7102, "ra")
    b = array(workdir, "siteB", 410012, 7102, "siteA", 410011, 7101, "rb")
    b.start()
    a.start()
    yield a, b
    run_rc("tc", "qdisc", "del", "dev", "lo", "root")
    for d in (a, b):
        if d.proc is not None:
            d.stop()


def cli(d: Daemon, *args: str) -> tuple[int, str]:
    return run_rc(VSCSI, *args, "--socket", d.socket, timeout=300)


def linked(d: Daemon, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not all(x["up"] for x in request(d.socket, "status")["links"]):
        assert time.monotonic() < deadline, "the link did not come up"
        time.sleep(0.5)


def same(workdir: Path) -> bool:
    return (workdir / "ra.img").read_bytes() == (workdir / "rb.img").read_bytes()


def settle(d: Daemon, vol: str) -> None:
    """Take the pending unit attentions (3F/03 after each state change)."""
    for _ in range(8):
        if run_rc("sg_turs", d.sg(vol))[0] == 0:
            return


def host_write(d: Daemon, vol: str, offset: int, data: bytes, workdir: Path) -> tuple[int, str]:
    src = workdir / "remote-chunk.bin"
    src.write_bytes(data)
    settle(d, vol)
    return run_rc("dd", f"if={src}", f"of={d.sd(vol)}", "bs=4096", f"seek={offset // 4096}",
                  "oflag=direct", "conv=notrunc,fsync")  # fmt: skip


def status(d: Daemon) -> dict[str, object]:
    (p,) = json.loads(cli(d, "pair", "display", "tc", "--json")[1])["pairs"]
    return p


def test_mirror_fence_never_link_cut_and_resync(
    sites: tuple[Daemon, Daemon], workdir: Path
) -> None:
    a, b = sites
    linked(a)
    linked(b)
    rc, out = cli(a, "pair", "create", "ra", "siteB:rb", "--fence", "never", "--name", "tc",
                  "--wait", "120")  # fmt: skip
    assert rc == 0 and out.splitlines()[-1] == "pair tc: PAIR", out
    assert host_write(a, "ra", MIB, os.urandom(4 * MIB), workdir)[0] == 0
    assert same(workdir)
    settle(b, "rb")
    rc, out = run_rc("sg_dd", "if=/dev/zero", f"of={b.sg('rb')}", "bs=512", "count=1")
    assert rc != 0 and re.search(r"data protect", out, re.I), out  # S-VOL read only in PAIR
    run("tc", "qdisc", "add", "dev", "lo", "root", "netem", "loss", "100%")
    try:
        rc, out = host_write(a, "ra", 8 * MIB, os.urandom(64 * 1024), workdir)
        assert rc == 0, out  # fence never: the write succeeds, the pair suspends
    finally:
        run("tc", "qdisc", "del", "dev", "lo", "root")
    assert status(a)["status"] == "PSUE"
    linked(a)
    rc, out = cli(a, "pair", "resync", "tc", "--wait", "120")
    assert rc == 0 and out.splitlines()[-1] == "pair tc: PAIR", out
    assert status(a)["copy_total"] == 64 * 1024  # only the changed grain
    assert same(workdir)


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
    rc, out = host_write(a, "ra", 0, os.urandom(4096), workdir)
    assert rc != 0, out
    rc, out = cli(b, "pair", "resync", "tc", "--swaps", "--wait", "120")
    assert rc == 0 and out.splitlines()[-1] == "pair tc: PAIR", out
    assert same(workdir)
    assert cli(a, "pair", "check", "tc")[1].startswith("pairvolchk : Volstat is S-VOL.")
