"""Two sites in one VM: network namespaces `vscsi-siteA` and `vscsi-siteB` joined by a veth
pair (vA 10.77.0.1 -- vB 10.77.0.2), and one daemon (array) per site whose link lives in its
site's namespace (`link_netns`). The daemons themselves stay in the initial namespace: TCMU's
generic netlink family exists only there.

The two arrays serve their LUNs on different transports (TRANSPORT): vscsi's own ring at site A,
Debian's libtcmu at site B. Every remote test and drill step thus runs both at once, and the
takeovers and swaps put the P-VOL (with its peer-bound writes) and the S-VOL on each."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.integration.conftest import VSCSI, Daemon, run, run_rc

NS = {"siteA": "vscsi-siteA", "siteB": "vscsi-siteB"}
ADDR = {"siteA": "10.77.0.1", "siteB": "10.77.0.2"}
DEV = {"siteA": "vA", "siteB": "vB"}
PORT = {"siteA": 7101, "siteB": 7102}
SERIAL = {"siteA": 410011, "siteB": 410012, "siteC": 410013}
TRANSPORT = {"siteA": "native", "siteB": "libtcmu"}


def volume(workdir: Path, name: str, serial: int, volume_id: int, size: str = "16MiB",
           extra: str = "") -> str:  # fmt: skip
    """A [[volume]] table on a file in `workdir`, made at first start."""
    return (f'[[volume]]\nname = "{name}"\npath = "{workdir}/{name}.img"\nsize = "{size}"\n'
            f'create = true\n{extra}[volume.identity]\nserial = {serial}\n'
            f'volume_id = {volume_id:#x}\n')  # fmt: skip


def array(workdir: Path, name: str, peer: str, volumes: str, tag: str, keys: str = "linkkeys",
          accept: bool = True, daemon: str = "") -> Daemon:  # fmt: skip
    """A daemon with array `name`'s key material from `keys`, its link in `name`'s network
    (accepting peers there unless told not to), linked to `peer`, serving `volumes`."""
    listen = f'link_listen = "{ADDR[name]}:{PORT[name]}"\n' if accept else ""
    return Daemon(workdir, (
        f'transport = "{TRANSPORT[name]}"\nstate_dir = "{workdir}/{tag}-state"\n{daemon}'
        f'link_cert = "{workdir}/{keys}/{name}.crt"\nlink_key = "{workdir}/{keys}/{name}.key"\n'
        f'{listen}link_timeout = 3.0\nlink_netns = "{NS[name]}"\n'
        f'[[remote]]\nname = "{peer}"\naddress = "{ADDR[peer]}:{PORT[peer]}"\n'
        f'serial = {SERIAL[peer]}\npeer_cert = "{workdir}/linkkeys/{peer}.crt"\n{volumes}'
    ), tag)  # fmt: skip


def make_keys(workdir: Path, into: str = "linkkeys", *names: str) -> None:
    """Each site's key and certificate (once per session: `vscsi link keys` never overwrites)."""
    for site in names or ("siteA", "siteB"):
        if (workdir / into / f"{site}.crt").exists():
            continue
        run(VSCSI, "link", "keys", "--dir", str(workdir / into), "--name", site,
            "--serial", str(SERIAL[site]))  # fmt: skip


@contextmanager
def network() -> Iterator[None]:
    """The two site namespaces and the veth pair between them, removed afterwards."""
    try:
        for ns in NS.values():
            run("ip", "netns", "add", ns)
        run("ip", "link", "add", "vA", "netns", NS["siteA"], "type", "veth",
            "peer", "name", "vB", "netns", NS["siteB"])  # fmt: skip
        for site, ns in NS.items():
            run("ip", "-n", ns, "addr", "add", f"{ADDR[site]}/24", "dev", DEV[site])
            run("ip", "-n", ns, "link", "set", DEV[site], "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
        yield
    finally:
        for ns in NS.values():
            run_rc("ip", "netns", "del", ns)


def cut(how: str) -> None:
    """Lose every packet between the sites: the veth down, or netem dropping all of them."""
    if how == "down":
        run("ip", "-n", NS["siteA"], "link", "set", "vA", "down")
    else:
        run("ip", "netns", "exec", NS["siteA"], "tc", "qdisc", "add", "dev", "vA", "root",
            "netem", "loss", "100%")  # fmt: skip


def mend(how: str) -> None:
    if how == "down":
        run("ip", "-n", NS["siteA"], "link", "set", "vA", "up")
    else:
        run("ip", "netns", "exec", NS["siteA"], "tc", "qdisc", "del", "dev", "vA", "root")
