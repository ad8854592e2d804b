"""`[[shadow_set]]` and `vscsi shadow …` through a daemon's control socket (everything but the
kernel): assembly from the config, SHOW SHADOW output, add/remove with minicopy, members added
at run time coming back after a restart, and a shadow set as a pair's P-VOL."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.unit.scsi_harness import good, run
from vscsi.cli import main
from vscsi.config import ConfigError, parse
from vscsi.control import ControlServer
from vscsi.daemon import Daemon
from vscsi.shadow import AREA

MIB = 1 << 20


def config(tmp_path: Path, members: int = 2, **extra: object) -> dict[str, object]:
    shadow = {
        "name": "dsa1", "members": [f"m{i}.img" for i in range(members)], "size": "4MiB",
        "create": True, "identity": {"serial": 410003, "volume_id": 0x300}, **extra,
    }  # fmt: skip
    vol = {"name": "v0", "path": "v0.img", "size": "4MiB", "create": True,
           "identity": {"serial": 410003, "volume_id": 0x301}}  # fmt: skip
    daemon = {"socket": str(tmp_path / "ctl.sock"), "state_dir": "state",
              "shadow_add_paths": [str(tmp_path)]}  # fmt: skip
    return {"daemon": daemon, "volume": [vol], "shadow_set": [shadow]}


class Running:
    """A daemon opened below the kernel, with its control socket."""

    def __init__(self, tmp_path: Path, cfg: dict[str, object]) -> None:
        self.daemon = Daemon(parse(cfg, base=tmp_path))
        self.daemon.open()
        self.server = ControlServer(self.daemon.config.socket, self.daemon.handlers())
        self.server.start()

    def cli(self, *args: str) -> tuple[int, str]:
        r = CliRunner().invoke(main, [*args, "--socket", self.daemon.config.socket])
        return r.exit_code, r.output

    def close(self) -> None:
        self.server.close()
        self.daemon.stop()  # no kernel objects were made: dismounts the sets, frees the lock


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    r = Running(tmp_path, config(tmp_path))
    yield r
    r.close()


def write(r: Running, lba: int, data: bytes) -> None:
    """WRITE(10) through the set's LUN."""
    cdb = struct.pack(">BBIBHB", 0x2A, 0, lba, 0, len(data) // 512, 0)
    good(r.daemon.served["dsa1"].lun, cdb, data)


def test_config_builds_the_set_and_show_reads_like_show_shadow(
    running: Running, tmp_path: Path
) -> None:
    rc, out = running.cli("shadow", "wait", "dsa1", "--timeout", "30")
    assert (rc, out) == (0, "dsa1: Steady State\n")
    assert (tmp_path / "m0.img").stat().st_size == 4 * MIB + AREA
    assert running.daemon.served["dsa1"].volume.size == 4 * MIB
    rc, out = running.cli("shadow", "show")
    lines = out.splitlines()
    assert lines[0].startswith("dsa1: shadow set ")
    assert lines[1] == "  Virtual Unit State:   Steady State"
    assert lines[4].split() == ["MEMBER", "STATE"]
    assert [ln.split()[1] for ln in lines[5:7]] == ["ShadowSetMember"] * 2
    assert lines[5].split()[0] == str(tmp_path / "m0.img")
    status = json.loads(running.cli("status", "--json")[1])
    (dsa1,) = [v for v in status["volumes"] if v["name"] == "dsa1"]
    assert dsa1["path"].startswith("shadow:") and dsa1["serial"] == 410003


def test_remove_with_minicopy_then_add_copies_only_what_changed(
    running: Running, tmp_path: Path
) -> None:
    running.cli("shadow", "wait", "dsa1", "--timeout", "30")
    m1 = str(tmp_path / "m1.img")
    rc, out = running.cli("shadow", "remove", "dsa1", m1, "--minicopy")
    assert rc == 0 and out.startswith(f"dsa1: {m1} removed")
    write(running, 8, b"x" * 4096)
    (s,) = json.loads(running.cli("shadow", "show", "dsa1", "--json")[1])
    assert [m["display"] for m in s["members"]][1].startswith("Removed, 65536 bytes changed")
    moved = s["stats"]["copied"] + s["stats"]["copy_skipped"]
    rc, out = running.cli("shadow", "add", "dsa1", m1, "--wait", "30")
    assert rc == 0 and out.splitlines()[-1] == "dsa1: Steady State", out
    (s,) = json.loads(running.cli("shadow", "show", "dsa1", "--json")[1])
    assert s["stats"]["copied"] + s["stats"]["copy_skipped"] - moved == 65536  # one grain
    a, b = (tmp_path / "m0.img").read_bytes(), (tmp_path / "m1.img").read_bytes()
    assert a[: 4 * MIB] == b[: 4 * MIB]


def test_refusals_are_one_line(running: Running, tmp_path: Path) -> None:
    running.cli("shadow", "wait", "dsa1", "--timeout", "30")
    rc, out = running.cli("shadow", "show", "nope")
    assert rc == 1 and out == "vscsi: no shadow set 'nope' (known: dsa1)\n"
    rc, out = running.cli("shadow", "add", "dsa1", str(tmp_path / "missing.img"))
    assert rc == 1 and out.startswith(f"vscsi: {tmp_path / 'missing.img'} does not exist")
    small = tmp_path / "small.img"
    small.write_bytes(bytes(MIB))
    rc, out = running.cli("shadow", "add", "dsa1", str(small))
    assert rc == 1 and "cannot hold shadow set 'dsa1'" in out
    running.cli("shadow", "remove", "dsa1", str(tmp_path / "m1.img"))
    rc, out = running.cli("shadow", "remove", "dsa1", str(tmp_path / "m0.img"))
    assert rc == 1 and "\n" not in out.rstrip("\n")


def test_member_added_at_run_time_is_back_after_a_restart(tmp_path: Path) -> None:
    r = Running(tmp_path, config(tmp_path))
    extra = tmp_path / "m9.img"
    extra.write_bytes(bytes(4 * MIB + AREA))
    assert r.cli("shadow", "add", "dsa1", str(extra), "--wait", "30")[0] == 0
    write(r, 0, b"y" * 512)
    r.close()
    r = Running(tmp_path, config(tmp_path))
    try:
        (s,) = json.loads(r.cli("shadow", "show", "dsa1", "--json")[1])
        assert s["state"] == "Steady State"
        assert sorted(m["name"] for m in s["members"]) == sorted(
            str(tmp_path / n) for n in ("m0.img", "m1.img", "m9.img")
        )
        assert extra.read_bytes()[:512] == b"y" * 512
    finally:
        r.close()


def test_a_shadow_set_can_be_a_pair_pvol(running: Running, tmp_path: Path) -> None:
    running.cli("shadow", "wait", "dsa1", "--timeout", "30")
    write(running, 100, b"z" * 1024)
    rc, out = running.cli("pair", "create", "dsa1", "v0", "--mu", "0", "--wait", "30")
    assert rc == 0, out
    assert (tmp_path / "v0.img").read_bytes() == (tmp_path / "m0.img").read_bytes()[: 4 * MIB]
    _, page = run(running.daemon.served["dsa1"].lun, bytes([0x12, 1, 0xC0, 1, 0, 0]), size=256)
    assert page[1] == 0xC0


def test_bad_shadow_config_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^shadow_set\[0\]\.read_policy: 'fastest'"):
        parse(config(tmp_path, read_policy="fastest"), base=tmp_path)
    cfg = config(tmp_path)
    cfg["shadow_set"][0]["members"] = ["v0.img"]  # type: ignore[index]
    with pytest.raises(ConfigError, match=r"^shadow_set\[0\]\.members\[0\]: .* of volume 'v0'$"):
        parse(cfg, base=tmp_path)
    cfg = config(tmp_path)
    cfg["shadow_set"][0]["create"] = False  # type: ignore[index]
    d = Daemon(parse(cfg, base=tmp_path))
    with pytest.raises(ConfigError, match=r"^shadow_set\[0\]\.members\[0\]: "):
        d.open()


def test_pairs_and_shadow_sets_commit_through_the_daemons_one_committer(
    running: Running, tmp_path: Path
) -> None:
    """One committer per state directory: one generation counter over every record, and no
    second instance removing the first one's temp files."""
    d = running.daemon
    assert d.pairs is not None
    shadow = d.shadow_sets["dsa1"][1]
    assert d.pairs.store.committer is shadow._committer
    assert shadow._committer.root == (tmp_path / "state").resolve()
    assert (tmp_path / "state" / "shadow-set").is_dir()  # the set's generation, recorded there
