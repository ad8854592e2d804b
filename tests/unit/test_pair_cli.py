"""`vscsi pair …` through the control socket into a daemon's pair manager (everything but the
kernel): the operator's view, the refusals, and what the LUNs tell the host after a change."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.unit.scsi_harness import Sense, run
from vscsi.cli import main
from vscsi.config import ConfigError, parse
from vscsi.control import ControlServer
from vscsi.daemon import Daemon, DaemonError
from vscsi.pair.vpd import parse_page
from vscsi.scsi.result import GOOD
from vscsi.tcmu import configfs

MIB = 1 << 20
TUR = bytes(6)
VPD_C0 = bytes([0x12, 0x01, 0xC0, 0x01, 0x00, 0x00])


def config(tmp_path: Path, **daemon: object) -> dict[str, object]:
    extra = {"socket": str(tmp_path / "ctl.sock"), "state_dir": "state", **daemon}
    vols = [
        {"name": f"v{i}", "path": f"v{i}.img", "size": "4MiB", "create": True,
         "identity": {"serial": 410001, "volume_id": 0x100 + i, "port": "CL1-A"}}
        for i in range(4)
    ]  # fmt: skip
    return {"daemon": extra, "volume": vols}


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(parse(config(tmp_path), base=tmp_path))
    d.open()
    srv = ControlServer(d.config.socket, d.handlers())
    srv.start()
    yield d
    srv.close()
    assert d.pairs is not None
    d.pairs.close()


def cli(d: Daemon, *args: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, [*args, "--socket", d.config.socket])
    return r.exit_code, r.output


def tur(d: Daemon, volume: str) -> Sense | None:
    """TEST UNIT READY on the volume's LUN: None when GOOD, else the sense."""
    return Sense.of(run(d.served[volume].lun, TUR)[0])


def clear_ua(d: Daemon, volume: str) -> list[tuple[int, int, int]]:
    """Every pending unit attention of the volume's LUN, as TUR reports them."""
    seen = []
    while (s := tur(d, volume)) is not None and s.key == 6:
        seen.append(s.code)
    return seen


def test_create_wait_display_and_unit_attention(daemon: Daemon) -> None:
    rc, out = cli(daemon, "pair", "create", "v0", "v1", "--mu", "0", "--name", "db", "--wait", "30")
    assert rc == 0, out
    assert out.splitlines() == ["pair db: COPY (MU#0 v0 -> v1)", "pair db: PAIR"]
    assert (6, 0x3F, 0x03) in clear_ua(daemon, "v0")
    assert (6, 0x3F, 0x03) in clear_ua(daemon, "v1")
    assert (
        Path(daemon.config.volumes[0].path).read_bytes()
        == Path(daemon.config.volumes[1].path).read_bytes()
    )
    rc, out = cli(daemon, "pairdisplay", "db")
    lines = out.splitlines()
    assert lines[0].split() == ["PAIR", "MU", "VOLUME(L/R)", "PORT", "SERIAL", "LDEV", "P/S",
                                "STATUS", "%", "CHANGED", "P-LDEV", "ACCESS"]  # fmt: skip
    assert lines[1].split()[:9] == ["db", "0", "v0(L)", "CL1-A", "410001", "0100", "P-VOL",
                                    "PAIR", "100"]  # fmt: skip
    assert lines[2].split()[2:8] == ["v1(R)", "CL1-A", "410001", "0101", "S-VOL", "PAIR"]
    assert lines[2].endswith("read only")
    r, page = run(daemon.served["v1"].lun, VPD_C0, size=256)
    slot = parse_page(page).body.slots[1]
    assert r.status == GOOD and (slot.role.value, slot.status.value) == ("S-VOL", "PAIR")
    assert slot.partner_volume_id == 0x100


def test_refusals_are_one_line(daemon: Daemon) -> None:
    assert cli(daemon, "pair", "create", "v0", "v1", "--mu", "0", "--wait", "30")[0] == 0
    rc, out = cli(daemon, "pair", "split", "nope")
    assert rc == 247 and out == "vscsi: no pair 'nope': see pair display\n"
    rc, out = cli(daemon, "pair", "restore", "v0-v1")
    assert rc == 228  # EX_INVSTP
    assert out == "vscsi: cannot restore pair 'v0-v1': it is PAIR, restore needs PSUS\n"
    rc, out = cli(daemon, "pair", "create", "v0", "v2", "--mu", "0")
    assert rc == 222 and out == "vscsi: MU#0 of 'v0' is in use: pick a free MU\n"
    rc, out = cli(daemon, "pair", "create", "v2", "v1", "--mu", "1")
    assert rc == 222 and "'v1' is not simplex" in out  # EX_INVVOL
    rc, out = cli(daemon, "pair", "create", "v0", "v3", "--mu", "3")
    assert rc == 2 and "3 is not in the range 0<=x<=2" in out
    rc, out = cli(daemon, "pair", "create", "v0", "v3", "--mu", "1", "--name", "a/b")
    assert rc == 221 and "pair name 'a/b' must be" in out  # EX_CMDRJE
    rc, out = cli(daemon, "pair", "display", "zz")
    assert rc == 247 and out == "vscsi: no pair or volume 'zz': see 'vscsi pair display'\n"


def test_split_resync_restore_delete_through_the_cli(daemon: Daemon) -> None:
    assert cli(daemon, "pair", "create", "v0", "v1", "--mu", "0", "--wait", "30")[0] == 0
    clear_ua(daemon, "v1")
    rc, out = cli(daemon, "pair", "split", "v0-v1", "--read-only")
    assert (rc, out) == (0, "pair v0-v1: PSUS (S-VOL read only)\n")
    assert clear_ua(daemon, "v1") == [(6, 0x3F, 0x03)]
    shown = json.loads(cli(daemon, "pair", "display", "v0-v1", "--json")[1])
    (p,) = shown["pairs"]
    assert (p["status"], p["split_read_only"], p["svol"]["access"]) == ("PSUS", True, "read only")
    assert cli(daemon, "pair", "resync", "v0-v1", "--wait", "30")[1].endswith("pair v0-v1: PAIR\n")
    assert cli(daemon, "pair", "split", "v0-v1")[0] == 0
    rc, out = cli(daemon, "pair", "restore", "v0-v1", "--wait", "30")
    assert (rc, out.splitlines()[-1]) == (0, "pair v0-v1: PSUS")
    rc, out = cli(daemon, "pair", "delete", "v0-v1")
    assert (rc, out) == (0, "pair v0-v1: deleted, both volumes SMPL\n")
    assert cli(daemon, "pairdisplay")[1] == "no pairs\n"


def test_delete_during_copy_says_content_undefined(tmp_path: Path) -> None:
    (tmp_path / "v0.img").write_bytes(b"\x5a" * (4 * MIB))  # data: a copy skips holes
    d = Daemon(parse(config(tmp_path, copy_rate="64KiB"), base=tmp_path))
    d.open()
    srv = ControlServer(d.config.socket, d.handlers())
    srv.start()
    try:
        assert cli(d, "pair", "create", "v0", "v2", "--mu", "1")[0] == 0
        rc, out = cli(d, "pair", "wait", "v0-v2", "--timeout", "0.3")
        assert rc == 233 and out.startswith("vscsi: pair v0-v2: still COPY (")  # EX_EWSTOT
        assert cli(d, "pair", "delete", "v0-v2")[0] == 0
        assert (
            cli(d, "pairdisplay")[1] == "no pairs\nv2: SMPL, content undefined (copy abandoned)\n"
        )
        assert cli(d, "status", "--json")[0] == 0
    finally:
        srv.close()
        assert d.pairs is not None
        d.pairs.close()


def test_suspended_svol_is_not_ready_to_tur(daemon: Daemon) -> None:
    assert cli(daemon, "pair", "create", "v0", "v1", "--mu", "0", "--wait", "30")[0] == 0
    assert daemon.pairs is not None
    daemon.pairs.pair("v0-v1").suspend(0, 0, OSError("link down"))
    clear_ua(daemon, "v1")
    s = tur(daemon, "v1")
    assert s is not None and s.code == (2, 0x04, 0x03)
    clear_ua(daemon, "v0")
    assert tur(daemon, "v0") is None


def test_second_daemon_on_the_same_state_dir_is_refused(daemon: Daemon, tmp_path: Path) -> None:
    cfg = config(tmp_path)
    for v in cfg["volume"]:  # type: ignore[union-attr]
        v["path"] = "other-" + v["path"]  # type: ignore[index]
    other = Daemon(parse(cfg, base=tmp_path))
    with pytest.raises(DaemonError, match="in use by another vscsi daemon"):
        other.open()
    cfg = config(tmp_path)
    cfg["volume"][0]["path"] = "absent.img"  # type: ignore[index]
    cfg["volume"][0]["create"] = False  # type: ignore[index]
    with pytest.raises(ConfigError, match=r"^volume\[0\]\.path: "):  # the config's error first
        Daemon(parse(cfg, base=tmp_path)).open()


def test_the_daemon_answers_only_what_the_kernel_waits_for(daemon: Daemon) -> None:
    """Its own backstores tell the kernel to wait for no reply (so tcmu-runner's -ENOENT for
    a subtype it does not know cannot fail them): no answer. A re-attached one that could not
    be told gets answers; another vscsi daemon's device never does (its owner answers)."""
    mine, other = "tcm-user/1/vscsi-v0/vscsi/v0", "tcm-user/1/vscsi-rb/vscsi/rb"
    assert daemon._on_added(mine, 0, 1) is None and daemon._on_added(other, 0, 2) is None
    assert daemon._on_removed(mine, 0, 1) is None
    assert daemon._on_reconfig(mine, 0, 1, write_cache=0) is None
    assert daemon.served["v0"].volume.write_cache is False  # still followed
    daemon.served["v0"].replies = True  # an old backstore the kernel still waits on
    assert daemon._on_reconfig(mine, 0, 1, size=1) == -22  # resizing is refused
    assert daemon._on_reconfig(mine, 0, 1, write_cache=1) == 0
    assert daemon._on_removed(mine, 0, 1) == 0
    assert daemon._on_reconfig(other, 0, 2, size=1) is None
    assert daemon._on_removed(other, 0, 2) is None


def test_new_backstores_ask_the_kernel_for_no_netlink_replies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: dict[str, str] = {}

    class SO:
        def __init__(self, name: str, **kw: str) -> None:
            seen.update(kw)

        def set_attribute(self, *_: str) -> None: ...

    monkeypatch.setattr(configfs.rtslib_fb, "UserBackedStorageObject", SO)
    monkeypatch.setattr(configfs, "_check_aptpl_file", lambda _v: None)
    monkeypatch.setattr(configfs, "_force_aptpl", lambda _so: None)
    configfs.create_backstore("v0", 1 << 20, 512)
    assert seen["control"] == "hw_block_size=512,nl_reply_supported=-1,data_pages_per_blk=16"


def test_a_backstore_the_kernel_cannot_be_told_keeps_getting_answers() -> None:
    """An old kernel without the nl_reply_supported attribute: the daemon must go on
    answering that backstore's events, or its removal would wait for ever."""

    class SO:
        def set_attribute(self, name: str, value: str) -> None:
            raise OSError(2, "No such file or directory")

    assert configfs.opt_out_of_replies(configfs.Backstore("v0", SO())) is False  # type: ignore[arg-type]
