"""Config validation: every mistake is one line naming the field, and nothing is created."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vscsi.config import ConfigError, load, open_volumes, parse, parse_size


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "vscsi.toml"
    p.write_text(text)
    return p


def test_good_config_resolves_paths_and_defaults(tmp_path: Path) -> None:
    (tmp_path / "a.img").write_bytes(bytes(1 << 20))
    cfg = load(
        write(
            tmp_path,
            """
[[volume]]
name = "a"
path = "a.img"
[volume.identity]
serial = 410001
volume_id = 0x10
vendor = "HITACHI"
product = "OPEN-V"

[[volume]]
name = "b"
path = "b.img"
size = "8MiB"
create = true
block_size = 4096
write_cache = false
""",
        )
    )
    a, b = cfg.volumes
    assert a.path == str(tmp_path / "a.img")
    assert a.identity.volume_id == 0x10 and a.identity.vendor == "HITACHI"
    assert a.write_cache is True and a.export == ("loop",)
    assert cfg.state_dir == "/var/lib/vscsi" and cfg.copy_rate == 0
    assert b.size == 8 << 20 and b.block_size == 4096 and b.write_cache is False
    vols = open_volumes(cfg)
    assert vols["a"].size == 1 << 20 and vols["b"].size == 8 << 20
    assert os.path.getsize(tmp_path / "b.img") == 8 << 20
    for v in vols.values():
        v.close()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('[[volume]]\npath = "x"', "volume[0].name"),
        ('[[volume]]\nname = "a"', "volume[0].path"),
        ('[[volume]]\nname = "a"\npath = "x"\nsize = "ten"', "volume[0].size"),
        ('[[volume]]\nname = "a"\npath = "x"\nblock_size = 1000', "volume[0].block_size"),
        ('[[volume]]\nname = "a"\npath = "x"\nexport = "fc"', "volume[0].export"),
        ('[[volume]]\nname = "a"\npath = "x"\nwrite_cache = 1', "volume[0].write_cache"),
        ('[[volume]]\nname = "a"\npath = "x"\ncolour = 1', "volume[0].colour"),
        (
            '[[volume]]\nname = "a"\npath = "x"\n[volume.identity]\nvendor = "TOO-LONG-VENDOR"',
            "volume[0].identity.vendor",
        ),
        (
            '[[volume]]\nname = "a"\npath = "x"\n[[volume]]\nname = "a"\npath = "y"',
            "volume[1].name",
        ),
        (
            '[[volume]]\nname = "a"\npath = "x"\n[[volume]]\nname = "b"\npath = "x"',
            "volume[1].path",
        ),
        (
            '[[volume]]\nname = "a"\npath = "x"\n[volume.identity]\nvolume_id = 1\n'
            '[[volume]]\nname = "b"\npath = "y"\n[volume.identity]\nvolume_id = 1',
            "volume[1].identity.volume_id",
        ),
        ("[disk]\n", "disk"),
        ("[[pair]]\n", "pair"),
        ('[daemon]\ncopy_rate = "fast"\n[[volume]]\nname = "a"\npath = "x"', "daemon.copy_rate"),
        ('[daemon]\nstate_dir = 1\n[[volume]]\nname = "a"\npath = "x"', "daemon.state_dir"),
        ('[daemon]\nsockets = "x"\n[[volume]]\nname = "a"\npath = "x"', "daemon.sockets"),
        (
            '[daemon]\ncommand_timeout = -1\n[[volume]]\nname = "a"\npath = "x"',
            "daemon.command_timeout",
        ),
        ('[daemon]\nio_workers = 65\n[[volume]]\nname = "a"\npath = "x"', "daemon.io_workers"),
        ('[daemon]\nio_workers = "8"\n[[volume]]\nname = "a"\npath = "x"', "daemon.io_workers"),
        ('[daemon]\nfast_path = 1\n[[volume]]\nname = "a"\npath = "x"', "daemon.fast_path"),
        ("", "volume"),
    ],
)
def test_bad_config_names_the_field(tmp_path: Path, body: str, field: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(write(tmp_path, body))
    msg = str(e.value)
    assert msg.startswith(field + ":") or msg.startswith(field + "."), msg
    assert "\n" not in msg


def test_missing_file_is_reported_and_nothing_is_created(tmp_path: Path) -> None:
    cfg = load(
        write(
            tmp_path,
            '[[volume]]\nname = "a"\npath = "a.img"\nsize = "1MiB"\ncreate = true\n'
            '[[volume]]\nname = "b"\npath = "missing.img"\n',
        )
    )
    with pytest.raises(ConfigError, match=r"^volume\[1\]\.path: .*missing.img does not exist"):
        open_volumes(cfg)
    # The first volume's file was created sparse, but nothing was left open or served.
    assert (tmp_path / "a.img").exists()


def test_size_mismatch_names_size(tmp_path: Path) -> None:
    (tmp_path / "a.img").write_bytes(bytes(4096))
    cfg = load(write(tmp_path, '[[volume]]\nname = "a"\npath = "a.img"\nsize = 8192\n'))
    with pytest.raises(ConfigError, match=r"^volume\[0\]\.size: .*4096 bytes but size = 8192"):
        open_volumes(cfg)


def test_unreadable_and_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(write(tmp_path, "[[volume]\n"))


@pytest.mark.parametrize(
    ("text", "n"), [(4096, 4096), ("64MiB", 64 << 20), ("1G", 1 << 30), ("2 TiB", 2 << 40)]
)
def test_parse_size(text: object, n: int) -> None:
    assert parse_size(text, "x") == n


def test_parse_requires_volumes() -> None:
    with pytest.raises(ConfigError, match=r"^volume: at least one"):
        parse({"daemon": {}})


def test_daemon_state_dir_is_relative_to_the_config_and_copy_rate_a_size(tmp_path: Path) -> None:
    body = '[daemon]\nstate_dir = "st"\ncopy_rate = "16MiB"\n[[volume]]\nname = "a"\npath = "x"'
    cfg = load(write(tmp_path, body))
    assert cfg.state_dir == str(tmp_path / "st") and cfg.copy_rate == 16 << 20


@pytest.mark.parametrize(
    ("daemon", "error"),
    [
        ({"socket_group": "no-such-group-here"},
         "daemon.socket_group: no group 'no-such-group-here' on this host"),
        ({"socket_group": 0}, "daemon.socket_group: expected str, got 0"),
        ({"shadow_add_paths": "/srv"},
         "daemon.shadow_add_paths: expected a list of absolute directories"),
        ({"shadow_add_paths": ["/srv/vscsi", "pool"]},
         "daemon.shadow_add_paths[1]: 'pool' must be an absolute directory"),
    ],
)  # fmt: skip
def test_socket_group_and_shadow_add_paths_errors(daemon: dict[str, object], error: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse({"daemon": daemon, "volume": [{"name": "a", "path": "/x"}]})
    assert str(e.value) == error


def test_shadow_add_paths_are_directories(tmp_path: Path) -> None:
    daemon = {"shadow_add_paths": ["/dev/disk/by-id", "/srv/vscsi/"], "socket_group": "root"}
    cfg = parse({"daemon": daemon, "volume": [{"name": "a", "path": "/x"}]})
    assert cfg.shadow_add_paths == ["/dev/disk/by-id/", "/srv/vscsi/"]
    assert cfg.socket_group == "root"


def test_fast_path_is_on_unless_switched_off(tmp_path: Path) -> None:
    assert load(write(tmp_path, '[[volume]]\nname = "a"\npath = "x"')).fast_path is True
    body = '[daemon]\nfast_path = false\n[[volume]]\nname = "a"\npath = "x"'
    assert load(write(tmp_path, body)).fast_path is False


def test_io_workers_default_and_in_order(tmp_path: Path) -> None:
    assert load(write(tmp_path, '[[volume]]\nname = "a"\npath = "x"')).io_workers == 8
    body = '[daemon]\nio_workers = 0\n[[volume]]\nname = "a"\npath = "x"'
    assert load(write(tmp_path, body)).io_workers == 0
