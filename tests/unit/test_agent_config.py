"""agent.toml: the keys, their defaults, and each mistake as one line naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from vscsi.agent.config import load
from vscsi.cli import main
from vscsi.config import ConfigError

SITES = """
[[site]]
name = "siteA"
socket = "/run/vscsi/a.sock"
heartbeat_file = "/run/siteA.alive"
heartbeat_max_age = 10
heartbeat_command = ["true"]
[[site]]
name = "siteB"
socket = "/run/vscsi/b.sock"
"""
GOOD = f"""
[agent]
poll = 2.0
down_after = 3
dry_run = false
changeover_timeout = 120
{SITES}
[[pair]]
name = "tc"
[host]
socket = "/run/vscsi/host.sock"
filesystems = ["fs1"]
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(text)
    return p


def test_a_full_config(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, GOOD))
    assert (cfg.poll, cfg.down_after, cfg.dry_run, cfg.changeover_timeout) == (2.0, 3, False, 120)
    a, b = cfg.sites
    assert (a.name, a.socket, a.heartbeat_file, a.heartbeat_command) == (
        "siteA",
        "/run/vscsi/a.sock",
        "/run/siteA.alive",
        ("true",),
    )
    assert (b.heartbeat_file, b.heartbeat_command) == (None, None)
    assert cfg.pairs == ("tc",)
    assert (cfg.host.socket, cfg.host.filesystems) == ("/run/vscsi/host.sock", ("fs1",))


def test_defaults(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, SITES + '[[pair]]\nname = "tc"\n'))
    assert (cfg.poll, cfg.down_after, cfg.dry_run, cfg.changeover_timeout, cfg.timeout) == (
        2.0,
        3,
        False,
        120.0,
        5.0,
    )
    assert cfg.host.socket is None and cfg.host.filesystems == ()


@pytest.mark.parametrize(("change", "message"), [
    (("poll = 2.0", "poll = 0"), "agent.poll: must be a positive number of seconds, got 0"),
    (("down_after = 3", "down_after = 0"), "agent.down_after: must be a whole number of checks"),
    (("down_after = 3", "down_after = 1.5"), "agent.down_after: must be a whole number"),
    (("dry_run = false", 'dry_run = "no"'), "agent.dry_run: must be true or false, got 'no'"),
    (("changeover_timeout = 120", "changeover_timeout = -1"), "agent.changeover_timeout: must"),
    (("poll = 2.0", "pol = 2.0"), "agent.pol: unknown key (known: changeover_timeout, "),
    (('socket = "/run/vscsi/b.sock"', ""), "site[1].socket: required"),
    (('name = "siteB"', 'name = "siteA"'), "site[1].name: 'siteA' is already site[0]'s name"),
    (('name = "siteB"', 'name = "site B"'), "site[1].name: 'site B' must be 1-32 of"),
    (('heartbeat_command = ["true"]', 'heartbeat_command = "true"'),
     "site[0].heartbeat_command: must be a non-empty list of strings"),
    (("heartbeat_max_age = 10", "heartbeat_max_age = 0"), "site[0].heartbeat_max_age: must"),
    (('name = "tc"', 'name = "tc"\n[[pair]]\nname = "tc"'), "pair[1].name: pair 'tc' is listed"),
    (('[[pair]]\nname = "tc"', ""), "pair: no [[pair]] table; name the remote pairs to watch"),
    (('filesystems = ["fs1"]', 'filesystems = "fs1"'), "host.filesystems: must be a list"),
    (('filesystems = ["fs1"]', ""), "host.filesystems: required with host.socket"),
    (('socket = "/run/vscsi/host.sock"', ""), "host.socket: required with host.filesystems"),
    (("[agent]", "[agnet]"), "agnet: unknown key (known: agent, host, pair, site)"),
])  # fmt: skip
def test_each_mistake_names_its_field(tmp_path: Path, change: tuple[str, str],
                                      message: str) -> None:  # fmt: skip
    text = GOOD.replace(*change, 1)
    assert text != GOOD
    with pytest.raises(ConfigError) as e:
        load(write(tmp_path, text))
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_two_sites_exactly(tmp_path: Path) -> None:
    third = '[[site]]\nname = "siteC"\nsocket = "/c.sock"\n'
    with pytest.raises(ConfigError, match=r"^site: 3 \[\[site\]\] tables; the agent watches "):
        load(write(tmp_path, GOOD + third))


def test_the_command_line_reports_a_mistake_in_one_line_with_status_2(tmp_path: Path) -> None:
    p = write(tmp_path, GOOD.replace("poll = 2.0", "poll = -2"))
    for args in (["agent", "-c", str(p)], ["agent", "check", "-c", str(p)]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2
        assert r.output == "vscsi agent: agent.poll: must be a positive number of seconds, " \
                           "got -2\n"  # fmt: skip
    r = CliRunner().invoke(main, ["agent", "-c", str(tmp_path / "nope.toml")])
    assert r.exit_code == 2 and "nope.toml: cannot read config" in r.output
