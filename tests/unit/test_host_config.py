"""`host.toml`: every mistake is one line naming the field, through `vscsi host run -c`."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from vscsi.cli import main
from vscsi.host.hostconfig import DEFAULT_HOST_SOCKET, load

GOOD = """
[host]
socket = "/run/vscsi/h.sock"
poll = 0.5
devices = ["/dev/disk/by-vscsi/*"]

[[filesystem]]
name = "fs1"
volume = "410011:0x0600"
mountpoint = "/mnt/fs1/"
fstype = "ext4"
options = "noatime,nodev"

[[filesystem]]
name = "fs2"
volume = "410011:701"
mountpoint = "/mnt/fs2"
fsck = true
"""

FS = '[[filesystem]]\nname = "fs1"\nvolume = "410011:0x0600"\nmountpoint = "/mnt/fs1"\n'


def test_a_full_config(tmp_path: Path) -> None:
    p = tmp_path / "host.toml"
    p.write_text(GOOD)
    c = load(p)
    assert (c.socket, c.poll, c.devices, c.timeout) == (
        "/run/vscsi/h.sock", 0.5, ("/dev/disk/by-vscsi/*",), 1.0)  # fmt: skip
    fs1, fs2 = c.filesystems
    assert (fs1.volume, fs1.mountpoint, fs1.fstype, fs1.options, fs1.fsck) == (
        (410011, 0x600), "/mnt/fs1", "ext4", "noatime,nodev", False)  # fmt: skip
    assert (fs2.volume, fs2.fstype, fs2.options, fs2.fsck) == ((410011, 0x701), None, "", True)


def test_defaults(tmp_path: Path) -> None:
    p = tmp_path / "host.toml"
    p.write_text(FS)
    c = load(p)
    assert (c.socket, c.poll, c.devices) == (DEFAULT_HOST_SOCKET, 2.0, ("/dev/sd*",))


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", "filesystem: at least one [[filesystem]] table is required"),
        ("[daemon]\n" + FS, "daemon: unknown table (known: host, filesystem)"),
        ("[host]\npool = 2\n" + FS, "host.pool: unknown key"),
        ("[host]\npoll = 0\n" + FS, "host.poll: 0 must be more than 0 and at most 3600 s"),
        ("[host]\npoll = true\n" + FS, "host.poll: expected int or float, got True"),
        ("[host]\ntimeout = 90\n" + FS, "host.timeout: 90 must be more than 0 and at most 60 s"),
        ('[host]\nsocket = "h.sock"\n' + FS, "host.socket: 'h.sock' must be an absolute path"),
        ("[host]\ndevices = []\n" + FS, "host.devices: expected a list of globs"),
        ('[host]\ndevices = ["sd*"]\n' + FS, "host.devices[0]: 'sd*' must be an absolute path"),
        (FS.replace('volume = "410011:0x0600"\n', ""), "filesystem[0].volume: required"),
        (FS.replace("410011:0x0600", "0600"),
         "filesystem[0].volume: '0600' must be \"SERIAL:LDEV\", like \"410011:0x0600\""),
        (FS.replace("410011:0x0600", "410011:0x10000"), "filesystem[0].volume: '410011:0x10000'"),
        (FS.replace("410011:", "0:"), "filesystem[0].volume: serial 0 must be between 1 and"),
        (FS.replace('"/mnt/fs1"', '"mnt"'), "filesystem[0].mountpoint: 'mnt' must be an absolute"),
        (FS.replace('"/mnt/fs1"', '"/"'), "filesystem[0].mountpoint: '/' must be an absolute"),
        (FS.replace('name = "fs1"\n', ""), "filesystem[0].name: None must be 1-32 of"),
        (FS + 'fstype = "ext 4"\n', "filesystem[0].fstype: 'ext 4' is not a filesystem type"),
        (FS + 'options = "ro, noatime"\n', "filesystem[0].options: 'ro, noatime' must be"),
        (FS + 'fsck = "yes"\n', "filesystem[0].fsck: expected bool, got 'yes'"),
        (FS + 'mount = "/x"\n', "filesystem[0].mount: unknown key"),
        (FS + FS.replace("/mnt/fs1", "/mnt/x").replace("0x0600", "0x0601"),
         "filesystem[1].name: fs1 is already used by filesystem[0]"),
        (FS + FS.replace('"fs1"', '"fs2"').replace("/mnt/fs1", "/mnt/x"),
         "filesystem[1].volume: 410011:0600 is already used by filesystem[0]"),
        (FS + FS.replace('"fs1"', '"fs2"').replace("0x0600", "0x0601"),
         "filesystem[1].mountpoint: /mnt/fs1 is already used by filesystem[0]"),
        ("[[filesystem", "not valid TOML"),
    ],
)  # fmt: skip
def test_mistakes_are_one_line_naming_the_field(tmp_path: Path, text: str, error: str) -> None:
    p = tmp_path / "host.toml"
    p.write_text(text)
    result = CliRunner().invoke(main, ["host", "run", "-c", str(p)])
    assert result.exit_code == 2
    assert result.output.startswith("vscsi: ") and result.output.count("\n") == 1
    assert error in result.output


def test_a_missing_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["host", "scan", "-c", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2
    assert "nope.toml: cannot read config (No such file or directory)" in result.output
