"""Two daemons as two arrays on this host, joined by the real TLS link, driven through the CLI
an operator (or a failover script) uses: a remote pair created, mirrored and refused on its
S-VOL; the link cut under fence data; takeover with CCI's exit codes; resync --swaps; the old
primary fenced after a restart without its peer."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.unit.scsi_harness import Sense, run
from vscsi.cli import main
from vscsi.config import load
from vscsi.control import ControlServer
from vscsi.daemon import Daemon

MIB = 1 << 20
WRITE10 = bytes([0x2A, 0, 0, 0, 0, 8, 0, 0, 1, 0])  # LBA 8, one block


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports: each bound while the next is picked, so no two are the same."""
    with contextlib.ExitStack() as held:
        socks = [held.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


class Array:
    def __init__(self, root: Path, name: str, serial: int, peer: str, peer_serial: int,
                 port: int, peer_port: int) -> None:  # fmt: skip
        self.root, self.name = root / name, name
        self.root.mkdir(parents=True, exist_ok=True)
        r = CliRunner().invoke(main, ["link", "keys", "--dir", str(root / "keys"),
                                      "--name", name, "--serial", str(serial)])  # fmt: skip
        assert r.exit_code == 0, r.output
        keys = root / "keys"
        (self.root / "vscsi.toml").write_text(
            f'[daemon]\nsocket = "{self.root}/ctl.sock"\nstate_dir = "state"\n'
            f'link_cert = "{keys}/{name}.crt"\nlink_key = "{keys}/{name}.key"\n'
            f'link_listen = "127.0.0.1:{port}"\nlink_timeout = 2.0\n'
            f'[[remote]]\nname = "{peer}"\naddress = "127.0.0.1:{peer_port}"\n'
            f'serial = {peer_serial}\npeer_cert = "{keys}/{peer}.crt"\n'
            f'[[volume]]\nname = "{name}v"\npath = "v.img"\nsize = "4MiB"\ncreate = true\n'
            f"[volume.identity]\nserial = {serial}\nvolume_id = 0x100\n"
        )
        self.d: Daemon | None = None
        self.srv: ControlServer | None = None

    def start(self) -> Daemon:
        self.d = Daemon(load(str(self.root / "vscsi.toml")))
        self.d.open()
        self.srv = ControlServer(self.d.config.socket, self.d.handlers())
        self.srv.start()
        return self.d

    def linked(self, timeout: float = 15) -> bool:
        """Whether this array's link to its peer is up (its sessions back off while the peer
        is away, so a test waits for the reconnect before it relies on it)."""
        assert self.d is not None
        return all(s.wait_connected(timeout) for s in self.d._sessions)

    def stop(self) -> None:
        if self.srv is not None:
            self.srv.close()
        if self.d is not None:
            self.d.stop()
        self.d = self.srv = None

    def cli(self, *args: str) -> tuple[int, str]:
        r = CliRunner().invoke(main, [*args, "--socket", str(self.root / "ctl.sock")])
        return r.exit_code, r.output

    def lun_write(self, data: bytes = b"h" * 512) -> Sense | None:
        """WRITE(10) of one block on this array's volume, after the pending unit attentions
        (each state change queues 3F/03) are taken by TEST UNIT READY."""
        assert self.d is not None
        lun = self.d.served[f"{self.name}v"].lun
        for _ in range(8):
            if Sense.of(run(lun, bytes(6))[0]) is None:
                break
        return Sense.of(run(lun, WRITE10, data)[0])

    def image(self) -> bytes:
        return (self.root / "v.img").read_bytes()


@contextlib.contextmanager
def linked_arrays(tmp_path: Path) -> Iterator[tuple[Array, Array]]:
    """siteA (with data on its volume) and siteB, both up and linked; stopped afterwards."""
    pa, pb = free_ports(2)
    (tmp_path / "keys").mkdir()
    a = Array(tmp_path, "siteA", 410001, "siteB", 410002, pa, pb)
    b = Array(tmp_path, "siteB", 410002, "siteA", 410001, pb, pa)
    (a.root / "v.img").write_bytes(os.urandom(4 * MIB))
    b.start()
    a.start()
    try:
        assert a.linked() and b.linked()
        yield a, b
    finally:
        a.stop()
        b.stop()


@pytest.fixture
def arrays(tmp_path: Path) -> Iterator[tuple[Array, Array]]:
    with linked_arrays(tmp_path) as both:
        yield both


def test_remote_pair_through_the_cli_and_the_tls_link(arrays: tuple[Array, Array]) -> None:
    a, b = arrays
    rc, out = a.cli("pair", "create", "siteAv", "siteB:siteBv", "--fence", "data",
                    "--name", "tc", "--wait", "30")  # fmt: skip
    assert rc == 0 and out.splitlines()[-1] == "pair tc: PAIR", out
    assert a.image() == b.image()
    rc, out = a.cli("status", "--json")
    assert json.loads(out)["links"] == [{"remote": "siteB", "serial": 410002, "up": True}]
    assert a.lun_write() is None and a.image() == b.image()  # mirrored before the answer
    sense = b.lun_write()
    assert sense is not None and (sense.key, sense.asc, sense.ascq) == (0x7, 0x27, 0x00)
    assert b.cli("pair", "check", "tc") == (
        0,
        "pairvolchk : Volstat is S-VOL.[status = PAIR fence = DATA ]\n",
    )
    rc, out = b.cli("takeover", "tc")
    assert (rc, out) == (1, "pair tc: swap\n")  # both up and PAIR: swap-takeover
    assert b.lun_write() is None and a.image() == b.image()  # now B -> A
    assert a.cli("pair", "check", "tc")[1].startswith("pairvolchk : Volstat is S-VOL.")


def test_the_link_cut_under_fence_data_and_an_svol_takeover(
    arrays: tuple[Array, Array],
) -> None:
    a, b = arrays
    assert a.cli("pair", "create", "siteAv", "siteB:siteBv", "--fence", "data", "--name", "tc",
                 "--wait", "30")[0] == 0  # fmt: skip
    a.stop()  # the P site goes away
    rc, out = b.cli("takeover", "tc")
    assert (rc, out) == (225, "pair tc: svol_e\n")  # SSWS, the P side unknown: EX_VOLCUR
    assert b.lun_write(b"S" * 512) is None
    a.start()  # the old primary comes back: demoted (its peer took over), refuses writes
    assert a.linked() and b.linked()
    sense = a.lun_write()
    assert sense is not None and (sense.key, sense.asc) == (0x7, 0x27)
    rc, out = b.cli("pair", "resync", "tc", "--swaps", "--wait", "30")
    assert rc == 0 and out.splitlines()[-1] == "pair tc: PAIR", out
    assert a.image() == b.image()


def test_a_peer_is_answered_while_an_operation_here_waits_on_it(
    arrays: tuple[Array, Array],
) -> None:
    """An operation waits on its peer's answers; the peer's own requests must not wait
    behind it, or two arrays each waiting for the other stall until the link times out and
    drop it (a resync or takeover then finds its peer "unreachable"). Forced: siteA's split
    is held inside its request to siteB while siteB asks siteA for its side."""
    a, b = arrays
    assert a.cli("pair", "create", "siteAv", "siteB:siteBv", "--name", "tc",
                 "--wait", "30")[0] == 0  # fmt: skip
    assert a.d is not None and a.d.pairs is not None
    assert b.d is not None and b.d.pairs is not None
    remote_a, remote_b = a.d.pairs.remote, b.d.pairs.remote
    peer = remote_a.peers["siteB"]
    inside, release = threading.Event(), threading.Event()
    real = peer.call

    def held(op: str, **args: object) -> dict[str, object]:
        inside.set()
        release.wait(30)
        return real(op, **args)

    peer.call = held  # type: ignore[method-assign]
    split = threading.Thread(target=remote_a.split, args=("tc",))
    split.start()
    try:
        assert inside.wait(10)
        theirs = remote_b.pair("tc").exchange()
        up = b.linked(0)
    finally:
        release.set()
        split.join()
    assert theirs is not None and up  # answered, and the link never dropped
    out = a.cli("pair", "check", "tc")[1]  # and the split held back went through
    assert out.startswith("pairvolchk : Volstat is P-VOL.[status = PSUS"), out


def test_a_write_at_the_old_primary_while_resync_swaps_runs_is_copied_over(
    arrays: tuple[Array, Array],
) -> None:
    """After a split the P-VOL takes writes; `resync --swaps` at the S side copies the new
    P side's data over every grain the old primary changed, including one written between
    the new P side reading its changes and the old primary recording the swap. Forced:
    siteB's swap request to siteA is held while the host writes siteA's volume."""
    a, b = arrays
    assert a.cli("pair", "create", "siteAv", "siteB:siteBv", "--name", "tc",
                 "--wait", "30")[0] == 0  # fmt: skip
    assert a.cli("pair", "split", "tc")[0] == 0
    assert b.d is not None and b.d.pairs is not None
    peer = b.d.pairs.remote.peers["siteA"]
    real = peer.call
    written: list[Sense | None] = []

    def late(op: str, **args: object) -> dict[str, object]:
        if op == "event" and not written:
            written.append(a.lun_write(b"late" * 128))  # the old primary, still PSUS
        return real(op, **args)

    peer.call = late  # type: ignore[method-assign]
    rc, out = b.cli("pair", "resync", "tc", "--swaps", "--wait", "30")
    assert rc == 0 and out.splitlines()[-1] == "pair tc: PAIR", out
    assert written == [None]  # the host's write was acknowledged
    assert a.image() == b.image()  # and then copied over: both copies identical


def test_only_changes_to_a_remote_p_vol_leave_the_ring_thread(
    arrays: tuple[Array, Array],
) -> None:
    """The ring runs a command on a worker only when it may wait for the peer array: a write
    or flush of a remote pair's P-VOL. Reads, the S side, and simplex volumes run at once."""
    a, b = arrays
    assert a.d is not None and b.d is not None
    pvol, svol = a.d.served["siteAv"].lun, b.d.served["siteBv"].lun
    read10, sync10 = bytes([0x28]) + bytes(9), bytes([0x35]) + bytes(9)
    assert not pvol.waits(WRITE10)  # simplex
    assert a.cli("pair", "create", "siteAv", "siteB:siteBv", "--fence", "never",
                 "--name", "tc", "--wait", "30")[0] == 0  # fmt: skip
    assert pvol.waits(WRITE10) and pvol.waits(sync10) and not pvol.waits(read10)
    assert not svol.waits(WRITE10)
