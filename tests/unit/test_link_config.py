"""`vscsi link keys` and the link parts of the config: [[remote]] tables and [daemon] link_*."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from vscsi.cli import main
from vscsi.config import DEFAULT_LINK_TIMEOUT, ConfigError, load

VOLUME = '[[volume]]\nname = "v"\npath = "v.img"\n'


def keys_command(d: Path, name: str, serial: int) -> Result:
    return CliRunner().invoke(
        main, ["link", "keys", "--dir", str(d), "--name", name, "--serial", str(serial)]
    )


def make_keys(d: Path, name: str, serial: int) -> Result:
    r = keys_command(d, name, serial)
    assert r.exit_code == 0, r.output
    return r


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A directory with A's keys (serial 1001) and B's certificate (serial 2002)."""
    make_keys(tmp_path / "a", "siteA", 1001)
    make_keys(tmp_path / "b", "siteB", 2002)
    return tmp_path


def config(site: Path, daemon: str, remote: str = "") -> Path:
    p = site / "vscsi.toml"
    p.write_text(f"[daemon]\n{daemon}\n{VOLUME}{remote}")
    return p


DAEMON = 'link_cert = "a/siteA.crt"\nlink_key = "a/siteA.key"\n'
REMOTE = """[[remote]]
name = "siteB"
address = "192.0.2.7:7001"
serial = 2002
peer_cert = "b/siteB.crt"
"""


def test_keys_are_made_private_and_explained(tmp_path: Path) -> None:
    r = make_keys(tmp_path / "k", "siteA", 410001)
    key, cert = tmp_path / "k" / "siteA.key", tmp_path / "k" / "siteA.crt"
    assert os.stat(key).st_mode & 0o777 == 0o600
    assert b"BEGIN CERTIFICATE" in cert.read_bytes()
    assert f'link_key = "{key}"' in r.output and "serial = 410001" in r.output
    assert '[[remote]]\n  name = "siteA"' in r.output


def test_keys_are_never_overwritten(tmp_path: Path) -> None:
    make_keys(tmp_path, "siteA", 1)
    before = (tmp_path / "siteA.key").read_bytes()
    r = keys_command(tmp_path, "siteA", 1)
    assert r.exit_code == 2 and "siteA.key: already exists" in r.output
    assert (tmp_path / "siteA.key").read_bytes() == before


def test_keys_need_a_valid_array_name(tmp_path: Path) -> None:
    r = keys_command(tmp_path, "a b", 1)
    assert r.exit_code == 2 and "--name 'a b'" in r.output and not list(tmp_path.iterdir())


def test_a_linked_config_resolves_paths_and_reads_the_identity(site: Path) -> None:
    cfg = load(config(site, DAEMON + 'link_listen = "[::]:7001"\nlink_timeout = 2.5', REMOTE))
    assert cfg.link is not None
    assert (cfg.link.name, cfg.link.serial, cfg.link.listen) == ("siteA", 1001, ("::", 7001))
    assert cfg.link.timeout == 2.5 and cfg.link.cert == str(site / "a" / "siteA.crt")
    (r,) = cfg.remotes
    assert (r.name, r.host, r.port, r.serial) == ("siteB", "192.0.2.7", 7001, 2002)
    assert r.peer_cert == str(site / "b" / "siteB.crt")


def test_a_config_without_links_has_none(site: Path) -> None:
    cfg = load(config(site, ""))
    assert cfg.link is None and cfg.remotes == [] and DEFAULT_LINK_TIMEOUT == 10


@pytest.mark.parametrize(
    ("daemon", "remote", "message"),
    [
        ("", REMOTE, "daemon.link_cert: required for links (make it with `vscsi link keys`)"),
        ('link_cert = "a/siteA.crt"', REMOTE, "daemon.link_key: required"),
        ('link_listen = "0.0.0.0:7001"', "", "daemon.link_cert: required"),
        (DAEMON + 'link_listen = "7001"', "", "daemon.link_listen: '7001' must be \"host:port\""),
        (DAEMON + 'link_listen = "h:0"', "", "'h:0' must be \"host:port\" with a port of 1-65535"),
        (DAEMON + "link_timeout = 0", "", "daemon.link_timeout: 0 must be 0.1 to 600 seconds"),
        (DAEMON + 'link_timeout = "5"', "", "daemon.link_timeout: expected int or float"),
        ('link_cert = "b/siteB.crt"\nlink_key = "a/siteA.key"', "", "is not the key of"),
        ('link_cert = "a/nope.crt"\nlink_key = "a/siteA.key"', "", "daemon.link_cert: "),
        (DAEMON, REMOTE.replace("2002", "2003"), "remote[0].serial: 2003, but "),
        (DAEMON, REMOTE.replace('peer_cert = "b/siteB.crt"\n', ""), "peer_cert: required"),
        (DAEMON, REMOTE.replace("siteB.crt", "siteB.key"), "not a PEM certificate"),
        (DAEMON, REMOTE.replace("192.0.2.7:7001", "192.0.2.7"), "remote[0].address:"),
        (DAEMON, REMOTE + "fence = 1\n", "remote[0].fence: unknown key"),
        (DAEMON, REMOTE + REMOTE, "remote[1].name: 'siteB' is already used by remote[0]"),
        (DAEMON, REMOTE.replace('"siteB"', '"b/"'), "remote[0].name:"),
        (
            DAEMON + 'link_netns = "vscsi-no-such-ns"',
            REMOTE,
            "daemon.link_netns: no network namespace vscsi-no-such-ns (ip netns add vscsi-no-",
        ),
        (
            DAEMON + 'link_netns = "../../proc/1/ns/net"',
            REMOTE,
            "daemon.link_netns: '../../proc/1/ns/net' is not a namespace name",
        ),
    ],
)
def test_link_mistakes_are_one_line_naming_the_field(
    site: Path, daemon: str, remote: str, message: str
) -> None:
    with pytest.raises(ConfigError) as e:
        load(config(site, daemon, remote))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_peer_with_this_arrays_serial_is_refused(site: Path) -> None:
    make_keys(site / "twin", "twin", 1001)
    remote = REMOTE.replace("b/siteB.crt", "twin/twin.crt").replace("2002", "1001")
    with pytest.raises(ConfigError, match=r"remote\[0\].serial: 1001 is this array's own serial"):
        load(config(site, DAEMON, remote))


def test_two_peers_with_one_serial_are_refused(site: Path) -> None:
    second = REMOTE.replace('"siteB"', '"siteB2"', 1)
    with pytest.raises(ConfigError, match=r"remote\[1\].serial: 2002 is already used by rem"):
        load(config(site, DAEMON, REMOTE + second))


def test_a_key_open_to_others_is_refused(site: Path) -> None:
    os.chmod(site / "a" / "siteA.key", 0o640)
    with pytest.raises(ConfigError, match=r"link_key: .*siteA.key is open to group or others"):
        load(config(site, DAEMON, REMOTE))
