"""Host groups over LIO's iSCSI fabric as the real open-iscsi initiator sees them
(docs/host-groups.md): three initiator names on this host (open-iscsi ifaces), two ports on
loopback portals. Each initiator sees exactly its host group's LUNs at their host LUN numbers;
one in no host group, and one with a wrong CHAP secret, are refused at login; `vscsi lun
map/unmap` reaches the host as REPORTED LUNS DATA HAS CHANGED and a rescan; a volume on both
ports is one dm-multipath map whose fio --verify survives a path logging out and back in;
`vscsi status` lists the sessions per port and host group. On each transport (conftest's
`transport`).

The module writes open-iscsi's and multipath's files into the VM's /etc (a tmpfs overlay) and
puts them back afterwards; it runs iscsid and multipathd itself (there is no systemd in the VM)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import VSCSI, Daemon, run, run_rc
from tests.integration.hostio import fio, fio_ok, wait_writes
from vscsi.control import request

IQN_A = "iqn.2026-01.test.vscsi:host-a"
IQN_B = "iqn.2026-01.test.vscsi:host-b"
IQN_C = "iqn.2026-01.test.vscsi:host-c"  # in no host group
IFACES = {"vs-a": IQN_A, "vs-b": IQN_B, "vs-c": IQN_C}
PORT1 = ("iqn.2026-01.test.vscsi:array.cl1-a", "127.0.0.1:3260")  # CL1-A, CHAP
PORT2 = ("iqn.2026-01.test.vscsi:array.cl2-a", "127.0.0.1:3261")  # CL2-A, no CHAP
SECRETS = {"hosta": "secret-of-host-a", "hostb": "secret-of-host-b"}
SESSIONS = Path("/sys/class/iscsi_session")
MPATH = "/dev/mapper/vscsi-mp0"

ISCSID_CONF = """\
node.startup = manual
node.session.scan = auto
node.session.timeo.replacement_timeout = 10
node.session.initial_login_retry_max = 2
node.conn[0].timeo.login_timeout = 30
node.conn[0].timeo.logout_timeout = 30
node.conn[0].timeo.noop_out_interval = 0
node.conn[0].timeo.noop_out_timeout = 0
node.session.cmds_max = 128
node.session.queue_depth = 32
"""


def volume(name: str, size: str, volume_id: int) -> str:
    return (f'\n[[volume]]\nname = "{name}"\npath = "{{w}}/{name}.img"\nsize = "{size}"\n'
            f'create = true\nexport = "iscsi"\n'
            f'[volume.identity]\nserial = 410013\nvolume_id = {volume_id:#x}\n')  # fmt: skip


CONFIG = (
    'transport = "{t}"\nstate_dir = "{w}/iscsistate"\n'
    + volume("hg0", "8MiB", 0x610) + volume("hg1", "8MiB", 0x611)
    + volume("hg2", "8MiB", 0x612) + volume("mp0", "16MiB", 0x613)
    + volume("ipv", "8MiB", 0x614) + volume("isv", "8MiB", 0x615).replace('"iscsi"', '"none"')
    + '\n[[shadow_set]]\nname = "dsa9"\nmembers = ["{w}/im1.img", "{w}/im2.img"]\n'
      'size = "8MiB"\ncreate = true\nexport = "iscsi"\n'
      '[shadow_set.identity]\nserial = 410013\nvolume_id = 0x616\n'
    + f'\n[[port]]\nname = "CL1-A"\niqn = "{PORT1[0]}"\nportals = ["{PORT1[1]}"]\n'
    + f'\n[[port]]\nname = "CL2-A"\niqn = "{PORT2[0]}"\nportals = ["{PORT2[1]}"]\n'
    + f'\n[[host_group]]\nport = "CL1-A"\nname = "hosta"\ninitiators = ["{IQN_A}"]\n'
      'luns = { 0 = "hg0", 4 = "mp0" }\nchap_user = "hosta"\n'
      'chap_secret_file = "{w}/chap-hosta"\n'
    + f'\n[[host_group]]\nport = "CL1-A"\nname = "hostb"\ninitiators = ["{IQN_B}"]\n'
      'luns = { 2 = "hg1" }\nchap_user = "hostb"\nchap_secret_file = "{w}/chap-hostb"\n'
    + f'\n[[host_group]]\nport = "CL2-A"\nname = "hosta"\ninitiators = ["{IQN_A}"]\n'
      'luns = { 4 = "mp0" }\n'
)  # fmt: skip


# -- the host: /etc, iscsid, ifaces ---------------------------------------------------------------


@pytest.fixture(scope="module")
def etc(workdir: Path) -> Iterator[None]:
    """/etc/iscsi and /etc/multipath* as they were before the module (the VM's /etc is a tmpfs
    overlay shared with the rest of the suite)."""
    backup = workdir / "etc-iscsi"
    shutil.copytree("/etc/iscsi", backup)
    made = [p for p in (Path("/etc/multipath.conf"), Path("/etc/multipath")) if not p.exists()]
    yield
    shutil.rmtree("/etc/iscsi")
    shutil.copytree(backup, "/etc/iscsi")
    for p in made:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def iscsid(etc: None, workdir: Path) -> Iterator[None]:
    """iscsid in the foreground, and an open-iscsi iface per initiator name."""
    Path("/etc/iscsi/iscsid.conf").write_text(ISCSID_CONF)
    Path("/etc/iscsi/initiatorname.iscsi").write_text("InitiatorName=iqn.2026-01.test.vscsi:vm\n")
    Path("/run/lock/iscsi").mkdir(parents=True, exist_ok=True)
    run("modprobe", "iscsi_tcp")
    run("ip", "link", "set", "lo", "up")
    log = (workdir / "iscsid.log").open("ab")
    proc = subprocess.Popen(
        ["iscsid", "-f", "-n"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )  # it signals its process group on SIGTERM
    deadline = time.monotonic() + 60
    while "ISCSIADM_ABSTRACT_NAMESPACE" not in Path("/proc/net/unix").read_text():
        assert proc.poll() is None, (workdir / "iscsid.log").read_text()
        assert time.monotonic() < deadline, "iscsid did not start listening"
        time.sleep(0.5)
    for iface, iqn in IFACES.items():
        run("iscsiadm", "-m", "iface", "-I", iface, "-o", "new")
        for name, value in (("iface.transport_name", "tcp"), ("iface.initiatorname", iqn)):
            run("iscsiadm", "-m", "iface", "-I", iface, "-o", "update", "-n", name, "-v", value)
    yield
    proc.terminate()
    proc.wait(60)


@pytest.fixture(scope="module")
def daemon(iscsid: None, here: Path, transport: str) -> Iterator[Daemon]:
    for group, secret in SECRETS.items():
        f = here / f"chap-{group}"
        f.write_text(secret + "\n")
        f.chmod(0o600)
    d = Daemon(here, CONFIG.replace("{w}", str(here)).replace("{t}", transport), "iscsi")
    d.start()
    deadline = time.monotonic() + 120  # the ports come after the volumes are served
    while "vscsi: serving" not in d.output():
        assert d.proc is not None and d.proc.poll() is None, d.output()
        assert time.monotonic() < deadline, d.output()
        time.sleep(0.5)
    yield d
    run("iscsiadm", "-m", "node", "-u", check=False)
    if d.proc is not None:
        d.stop()


# -- what the host sees ---------------------------------------------------------------------------


def iscsiadm_node(iface: str, port: tuple[str, str], *args: str) -> list[str]:
    return ["iscsiadm", "-m", "node", "-T", port[0], "-p", port[1], "-I", iface, *args]


Chap = tuple[str, str]  # user, secret


def login(iface: str, port: tuple[str, str], chap: Chap | None = None) -> tuple[int, str]:
    """Log in through `iface` (its initiator name), with CHAP user and secret if given."""
    if run_rc(*iscsiadm_node(iface, port))[0] != 0:
        run(*iscsiadm_node(iface, port, "-o", "new"))
    if chap is not None:
        for name, value in (("authmethod", "CHAP"), ("username", chap[0]),
                            ("password", chap[1])):  # fmt: skip
            run(*iscsiadm_node(iface, port, "-o", "update", "-n", f"node.session.auth.{name}",
                               "-v", value))  # fmt: skip
    return run_rc(*iscsiadm_node(iface, port, "--login"))


def session(initiator: str, port: tuple[str, str]) -> Path | None:
    for s in SESSIONS.glob("session*"):
        if ((s / "initiatorname").read_text().strip() == initiator
                and (s / "targetname").read_text().strip() == port[0]):  # fmt: skip
            return s
    return None


def logged_in(initiator: str, port: tuple[str, str]) -> Path:
    s = session(initiator, port)
    assert s is not None, f"{initiator} has no session with {port[0]}"
    return s


def luns(initiator: str, port: tuple[str, str]) -> dict[int, tuple[str, str]]:
    """Host LUN -> (sg, sd) of the initiator's session through the port, from sysfs."""
    out = {}
    for dev in (logged_in(initiator, port) / "device").glob("target*/*:*:*:*"):
        sg = [p.name for p in (dev / "scsi_generic").glob("sg*")]
        sd = [p.name for p in (dev / "block").glob("sd*")]
        out[int(dev.name.split(":")[3])] = (f"/dev/{sg[0]}" if sg else "",
                                            f"/dev/{sd[0]}" if sd else "")  # fmt: skip
    return out


def wait_luns(initiator: str, port: tuple[str, str], want: set[int],
              timeout: float = 120) -> dict[int, tuple[str, str]]:  # fmt: skip
    """The session's LUNs once they are `want`, each with its sg and sd (scans are async)."""
    deadline = time.monotonic() + timeout
    while True:
        have = luns(initiator, port)
        if set(have) == want and all(sg and sd for sg, sd in have.values()):
            run("udevadm", "settle", check=False)
            return have
        assert time.monotonic() < deadline, f"{initiator} via {port[0]}: {have}, want {want}"
        time.sleep(0.5)


def reported_luns(sg: str) -> set[int]:
    """The LUN inventory the target reports (REPORT LUNS, peripheral addressing)."""
    out = run("sg_luns", sg)
    return {int(x[:4], 16) & 0x3FFF for x in re.findall(r"^\s+([0-9a-f]{16})\b", out, re.M)}


def remove_device(initiator: str, port: tuple[str, str], lun: int) -> None:
    """Delete a LUN's SCSI device: Linux never removes one whose LUN was unmapped."""
    (dev,) = (logged_in(initiator, port) / "device").glob(f"target*/*:*:*:{lun}")
    (dev / "delete").write_text("1")


def unit_attentions(sg: str) -> str:
    """What `sg_turs` reports until the LUN is ready (pending unit attentions, in order)."""
    seen = []
    for _ in range(8):
        rc, out = run_rc("sg_turs", "-v", sg)
        if rc == 0:
            return "\n".join(seen)
        seen.append(out)
    raise AssertionError(f"{sg} never became ready:\n" + "\n".join(seen))


def vscsi(daemon: Daemon, *args: str) -> str:
    """The CLI, where it is what the test checks; the rest use `op` (a CLI process costs
    seconds in the emulated VM)."""
    return run(VSCSI, *args, "--socket", daemon.socket)


def op(daemon: Daemon, cmd: str, **args: Any) -> Any:
    """A command on the control socket, as the CLI sends it."""
    return request(daemon.socket, cmd, **args)


def wait_idle(daemon: Daemon, timeout: float = 300) -> None:
    """What `vscsi pair wait` and `vscsi shadow wait` wait for: no copy or merge running."""
    deadline = time.monotonic() + timeout
    while True:
        pairs = op(daemon, "pair_display")["pairs"]
        sets = op(daemon, "shadow_show")
        if not any(p["status"] in ("COPY", "RCPY") for p in pairs) and not any(
                s["operations"] for s in sets):  # fmt: skip
            return
        assert time.monotonic() < deadline, (pairs, sets)
        time.sleep(0.2)


# -- tests ----------------------------------------------------------------------------------------


def test_each_initiator_sees_exactly_its_host_groups_luns(daemon: Daemon) -> None:
    rc, out = login("vs-b", PORT1, ("hostb", "wrong-secret-of-b"))
    assert rc == 24 and session(IQN_B, PORT1) is None, f"wrong CHAP secret: {rc} {out}"
    rc, out = login("vs-c", PORT2)
    assert rc == 24 and session(IQN_C, PORT2) is None, f"initiator in no host group: {rc} {out}"
    for iface, port, chap in (("vs-a", PORT1, ("hosta", SECRETS["hosta"])),
                              ("vs-b", PORT1, ("hostb", SECRETS["hostb"])),
                              ("vs-a", PORT2, None)):  # fmt: skip
        rc, out = login(iface, port, chap)
        assert rc == 0, f"{iface} to {port[0]}: {out}\n{daemon.output()[-2000:]}"
    for initiator, port, want in ((IQN_A, PORT1, {0, 4}), (IQN_B, PORT1, {2}),
                                  (IQN_A, PORT2, {4})):  # fmt: skip
        for sg, _sd in wait_luns(initiator, port, want).values():
            assert reported_luns(sg) == want, (initiator, port[0], sg)
    assert not [s for s in SESSIONS.glob("session*")
                if (s / "initiatorname").read_text().strip() == IQN_C]  # fmt: skip


def test_status_lists_the_sessions_per_port_and_host_group(daemon: Daemon) -> None:
    ports = {p["name"]: p for p in json.loads(vscsi(daemon, "status", "--json"))["ports"]}
    seen = {name: sorted((s["host_group"], s["initiator"]) for s in p["sessions"])
            for name, p in ports.items()}  # fmt: skip
    assert seen == {"CL1-A": [("hosta", IQN_A), ("hostb", IQN_B)],
                    "CL2-A": [("hosta", IQN_A)]}, ports  # fmt: skip
    assert ports["CL1-A"]["portals"] == [PORT1[1]] and ports["CL2-A"]["portals"] == [PORT2[1]]
    text = vscsi(daemon, "status")
    assert "host group hostb: 1 initiator(s), 1 LUN(s), CHAP, 1 logged in" in text, text


def test_lun_map_and_unmap_at_run_time_reach_the_host(daemon: Daemon) -> None:
    b2 = luns(IQN_B, PORT1)[2][0]
    a0 = luns(IQN_A, PORT1)[0][0]
    unit_attentions(b2)  # whatever the logins left pending
    unit_attentions(a0)
    vscsi(daemon, "lun", "map", "CL1-A", "hostb", "7", "hg2")
    assert "Reported luns data has changed" in unit_attentions(b2)
    assert unit_attentions(a0) == "", "another host group's initiator was told"
    assert reported_luns(b2) == {2, 7}
    sid = logged_in(IQN_B, PORT1).name.removeprefix("session")
    run("iscsiadm", "-m", "session", "-r", sid, "--rescan")
    found = wait_luns(IQN_B, PORT1, {2, 7})
    run("dd", f"if={found[7][1]}", "of=/dev/null", "bs=4096", "count=16", "iflag=direct")

    vscsi(daemon, "lun", "unmap", "CL1-A", "hostb", "7")
    assert "Reported luns data has changed" in unit_attentions(b2)
    assert reported_luns(b2) == {2}
    # A rescan adds LUNs but never removes one: the host deletes the device REPORT LUNS no
    # longer lists (`rescan-scsi-bus.sh -r` would, but here it removed the mapped LUN 2, too).
    run("iscsiadm", "-m", "session", "-r", sid, "--rescan")
    assert set(luns(IQN_B, PORT1)) - reported_luns(b2) == {7}
    remove_device(IQN_B, PORT1, 7)
    wait_luns(IQN_B, PORT1, {2})


def paths(out: str) -> list[tuple[str, str]]:
    """(sd, "dm_state checker_state online_state") of each path `multipath -ll` shows."""
    return re.findall(r"\d+:\d+:\d+:\d+\s+(sd[a-z]+)\s+\d+:\d+\s+(\w+ \w+ \w+)", out)


def wait_paths(want: int, timeout: float = 180) -> list[tuple[str, str]]:
    deadline = time.monotonic() + timeout
    while True:
        out = run("multipath", "-ll", check=False)
        found = paths(out)
        if len(found) == want and all(state == "active ready running" for _, state in found):
            return found
        assert time.monotonic() < deadline, f"want {want} active paths:\n{out}"
        time.sleep(1)


def wait_node(node: str, timeout: float = 60) -> None:
    """The map's /dev/mapper node, which udev makes after the map exists (its uevent)."""
    run("udevadm", "settle", "--timeout=60", check=False)
    deadline = time.monotonic() + timeout
    while not Path(node).exists():
        assert time.monotonic() < deadline, f"{node} never appeared:\n{run('dmsetup', 'ls')}"
        time.sleep(0.5)


@pytest.fixture
def multipathd(daemon: Daemon, workdir: Path) -> Iterator[str]:
    """multipathd managing only mp0 (by its WWID, as udev reads it from VPD page 0x83)."""
    sd = luns(IQN_A, PORT1)[4][1]
    props = run("udevadm", "info", "--query=property", f"--name={sd}")
    wwid = re.search(r"^ID_SERIAL=(\S+)$", props, re.M)
    assert wwid is not None, props
    Path("/etc/multipath").mkdir(exist_ok=True)
    Path("/etc/multipath.conf").write_text(
        "defaults {\n  user_friendly_names no\n  find_multipaths no\n  polling_interval 2\n"
        "  no_path_retry 30\n}\n"
        'blacklist {\n  wwid ".*"\n}\n'
        f'blacklist_exceptions {{\n  wwid "^{wwid[1]}$"\n}}\n'
        f'multipaths {{\n  multipath {{\n    wwid "{wwid[1]}"\n    alias "vscsi-mp0"\n  }}\n}}\n'
    )  # fmt: skip
    run("modprobe", "dm_multipath")
    log = (workdir / "multipathd.log").open("ab")
    proc = subprocess.Popen(
        ["multipathd", "-d", "-s"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    yield wwid[1]
    proc.terminate()
    proc.wait(60)
    run("multipath", "-F", check=False)


def test_a_volume_on_two_ports_is_one_multipath_map(daemon: Daemon, multipathd: str) -> None:
    one, two = luns(IQN_A, PORT1)[4], luns(IQN_A, PORT2)[4]
    ident = run("sg_vpd", "-p", "di", one[0])
    assert ident == run("sg_vpd", "-p", "di", two[0]) and "NAA" in ident, ident
    assert ident != run("sg_vpd", "-p", "di", luns(IQN_A, PORT1)[0][0])
    assert {sd for sd, _ in wait_paths(2)} == {Path(one[1]).name, Path(two[1]).name}
    assert "vscsi-mp0" in run("multipath", "-ll")
    wait_node(MPATH)

    job = fio(MPATH, size="8M", rate_iops=100)
    wait_writes(MPATH, 100)  # a second of fio's writes
    assert job.poll() is None, job.communicate()[0]
    run(*iscsiadm_node("vs-a", PORT2, "--logout"))
    assert session(IQN_A, PORT2) is None
    wait_paths(1)
    rc, out = login("vs-a", PORT2)
    assert rc == 0, out
    wait_luns(IQN_A, PORT2, {4})
    wait_paths(2)
    fio_ok(job, daemon, timeout=400)


def test_a_p_vol_and_a_shadow_set_served_over_iscsi_keep_their_copies_identical(
    daemon: Daemon, here: Path
) -> None:
    """The pair and shadow-set machinery under a LUN that a remote host reaches over iSCSI:
    mapped at run time, written with fio --verify, every copy byte for byte the same."""
    op(daemon, "pair_create", name="ipv-isv", pvol="ipv", svol="isv", mu=0)
    wait_idle(daemon)
    b2 = luns(IQN_B, PORT1)[2][0]
    unit_attentions(b2)
    op(daemon, "lun_map", port="CL1-A", name="hostb", lun=3, volume="ipv")
    op(daemon, "lun_map", port="CL1-A", name="hostb", lun=5, volume="dsa9")
    unit_attentions(b2)
    sid = logged_in(IQN_B, PORT1).name.removeprefix("session")
    run("iscsiadm", "-m", "session", "-r", sid, "--rescan")
    found = wait_luns(IQN_B, PORT1, {2, 3, 5})
    pv, dsa = found[3][1], found[5][1]
    (info,) = json.loads(run(VSCSI, "inq", "--json", pv))
    assert info["mu"][0]["role"] == "P-VOL" and info["mu"][0]["status"] == "PAIR", info
    jobs = [fio(pv, size="4M"), fio(dsa, size="4M")]
    for job in jobs:
        fio_ok(job, daemon)
    wait_idle(daemon)
    run("cmp", str(here / "ipv.img"), str(here / "isv.img"))
    run("cmp", "-n", str(8 << 20), str(here / "im1.img"), str(here / "im2.img"))
    for lun in (3, 5):
        op(daemon, "lun_unmap", port="CL1-A", name="hostb", lun=lun)
        remove_device(IQN_B, PORT1, lun)
    wait_luns(IQN_B, PORT1, {2})


def test_persistent_reservations_between_two_initiators(daemon: Daemon) -> None:
    """Two hosts on one volume through their own host groups, as a cluster fences: both
    register, A holds a Write Exclusive - Registrants Only reservation, B (registered) may
    write; once A preempts B's key, B's writes get RESERVATION CONFLICT while A's succeed."""
    op(daemon, "lun_map", port="CL1-A", name="hostb", lun=6, volume="hg0")
    b2 = luns(IQN_B, PORT1)[2][0]
    unit_attentions(b2)
    sid = logged_in(IQN_B, PORT1).name.removeprefix("session")
    run("iscsiadm", "-m", "session", "-r", sid, "--rescan")
    a_sg, a_sd = luns(IQN_A, PORT1)[0]
    b_sg, b_sd = wait_luns(IQN_B, PORT1, {2, 6})[6]
    unit_attentions(a_sg)
    unit_attentions(b_sg)

    def pr(sg: str, *args: str) -> str:
        return run("sg_persist", "-n", *args, sg)

    def write(sd: str) -> tuple[int, str]:
        return run_rc("dd", "if=/dev/zero", f"of={sd}", "bs=4096", "count=1", "seek=100",
                      "oflag=direct", "conv=notrunc")  # fmt: skip

    pr(a_sg, "--out", "--register", "--param-sark=0xa1")
    pr(b_sg, "--out", "--register", "--param-sark=0xb2")
    pr(a_sg, "--out", "--reserve", "--param-rk=0xa1", "--prout-type=5")
    keys = pr(b_sg, "--in", "--read-keys")
    assert "2 registered reservation keys follow" in keys and "0xb2" in keys, keys
    res = pr(b_sg, "--in", "--read-reservation")
    assert "Key=0xa1" in res and "Write Exclusive, registrants only" in res, res
    assert write(b_sd)[0] == 0  # a registrant may write
    pr(a_sg, "--out", "--preempt", "--param-rk=0xa1", "--param-sark=0xb2", "--prout-type=5")
    rc, out = write(b_sd)
    assert rc != 0, out
    rc, out = run_rc("sg_raw", "-s", "512", "-i", "/dev/zero", b_sg,
                     "2a", "00", "00", "00", "00", "64", "00", "00", "01", "00")  # fmt: skip
    assert "reservation conflict" in out.lower(), out
    assert write(a_sd)[0] == 0
    pr(a_sg, "--out", "--clear", "--param-rk=0xa1")
    assert "NO registered reservation keys" in pr(b_sg, "--in", "--read-keys")
    op(daemon, "lun_unmap", port="CL1-A", name="hostb", lun=6)
    remove_device(IQN_B, PORT1, 6)
    wait_luns(IQN_B, PORT1, {2})
