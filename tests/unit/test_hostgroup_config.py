"""`[[port]]` and `[[host_group]]` tables: every mistake is one line naming the field, and CHAP
secrets come only from private files and are never shown."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vscsi.config import ConfigError, load

VOLUMES = """
[[volume]]
name = "ldev0"
path = "a.img"
export = ["loop", "iscsi"]
[[volume]]
name = "ldev1"
path = "b.img"
export = "iscsi"
[[volume]]
name = "local"
path = "c.img"
[[port]]
name = "CL1-A"
iqn = "iqn.2026-01.com.example:cl1-a"
portals = ["192.0.2.10:3260", "[2001:db8::1]:3260"]
[[port]]
name = "CL2-A"
iqn = "iqn.2026-01.com.example:cl2-a"
portals = ["192.0.2.11:3260"]
"""
GROUP = """
[[host_group]]
port = "CL1-A"
name = "db"
initiators = ["iqn.2026-01.com.example:db1", "iqn.2026-01.com.example:db2"]
luns = {0 = "ldev0", 5 = "ldev1"}
"""
SECRET = "s3cret-twelve+"
MUTUAL = "other-secret-16c"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "vscsi.toml"
    p.write_text(text)
    return p


def secret_file(tmp_path: Path, name: str, text: str, mode: int = 0o600) -> Path:
    p = tmp_path / name
    p.write_text(text + "\n")
    p.chmod(mode)
    return p


def test_ports_and_host_groups_parse(tmp_path: Path) -> None:
    secret_file(tmp_path, "chap", SECRET)
    secret_file(tmp_path, "mutual", MUTUAL)
    chap = 'chap_user = "db"\nchap_secret_file = "chap"\nmutual_user = "array"\n'
    cfg = load(write(tmp_path, VOLUMES + GROUP + chap + 'mutual_secret_file = "mutual"\n'))
    a, b = cfg.ports
    assert a.name == "CL1-A" and a.portals == (("192.0.2.10", 3260), ("2001:db8::1", 3260))
    assert b.iqn == "iqn.2026-01.com.example:cl2-a"
    (g,) = cfg.host_groups
    assert (g.port, g.name, g.luns) == ("CL1-A", "db", {0: "ldev0", 5: "ldev1"})
    assert g.initiators == ("iqn.2026-01.com.example:db1", "iqn.2026-01.com.example:db2")
    assert g.chap is not None and g.chap.user == "db" and str(g.chap.secret) == SECRET
    assert g.chap.mutual_user == "array" and str(g.chap.mutual_secret) == MUTUAL
    assert SECRET not in repr(cfg) and MUTUAL not in repr(cfg)
    assert SECRET not in f"{g.chap.secret}"
    assert [v.export for v in cfg.volumes] == [("loop", "iscsi"), ("iscsi",), ("loop",)]


def test_export_none_is_empty(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, '[[volume]]\nname = "a"\npath = "x"\nexport = "none"\n'))
    assert cfg.volumes[0].export == ()


BAD = [
    ('export = ["loop", "fc"]', "volume[0].export"),
    ('export = ["loop", "loop"]', "volume[0].export"),
    ('export = ["none", "iscsi"]', "volume[0].export"),
    ("export = []", "volume[0].export"),
]


@pytest.mark.parametrize(("line", "field"), BAD)
def test_bad_export(tmp_path: Path, line: str, field: str) -> None:
    check_bad(tmp_path, f'[[volume]]\nname = "a"\npath = "x"\n{line}\n', field)


PORT = '[[volume]]\nname = "a"\npath = "x"\n[[port]]\n'
BAD_PORTS = [
    ('name = "port1"\niqn = "iqn.2026-01.x:y"\nportals = ["1.2.3.4:3260"]', "port[0].name"),
    ('name = "CL1-A"\niqn = "IQN.2026-01.X:Y"\nportals = ["1.2.3.4:3260"]', "port[0].iqn"),
    ('name = "CL1-A"\nportals = ["1.2.3.4:3260"]', "port[0].iqn"),
    ('name = "CL1-A"\niqn = "iqn.2026-01.x:y"\nportals = []', "port[0].portals"),
    ('name = "CL1-A"\niqn = "iqn.2026-01.x:y"\nportals = ["1.2.3.4"]', "port[0].portals[0]"),
    ('name = "CL1-A"\niqn = "iqn.2026-01.x:y"\nportals = ["a:1"]\ncolour = 1', "port[0].colour"),
    ('name = "CL1-A"\niqn = "iqn.2026-01.x:y"\nportals = ["a:1"]\n[[port]]\nname = "CL1-A"\n'
     'iqn = "iqn.2026-01.x:z"\nportals = ["b:1"]', "port[1].name"),
    ('name = "CL1-A"\niqn = "iqn.2026-01.x:y"\nportals = ["a:1"]\n[[port]]\nname = "CL1-B"\n'
     'iqn = "iqn.2026-01.x:y"\nportals = ["b:1"]', "port[1].iqn"),
    ('name = "CL1-A"\niqn = "iqn.2026-01.x:y"\nportals = ["a:1"]\n[[port]]\nname = "CL1-B"\n'
     'iqn = "iqn.2026-01.x:z"\nportals = ["a:1"]', "port[1].portals"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "field"), BAD_PORTS)
def test_bad_port(tmp_path: Path, body: str, field: str) -> None:
    check_bad(tmp_path, PORT + body + "\n", field)


BAD_GROUPS = [
    ('port = "CL9-A"\nname = "g"', "host_group[0].port"),
    ('port = "CL1-A"\nname = "g g"', "host_group[0].name"),
    ('port = "CL1-A"\nname = "g"\ninitiators = "iqn.2026-01.x:y"', "host_group[0].initiators"),
    ('port = "CL1-A"\nname = "g"\ninitiators = ["host1"]', "host_group[0].initiators[0]"),
    ('port = "CL1-A"\nname = "g"\ninitiators = ["iqn.2026-01.x:y", "iqn.2026-01.x:y"]',
     "host_group[0].initiators"),
    ('port = "CL1-A"\nname = "g"\nluns = {2048 = "ldev0"}', "host_group[0].luns.2048"),
    ('port = "CL1-A"\nname = "g"\nluns = {x = "ldev0"}', "host_group[0].luns.x"),
    ('port = "CL1-A"\nname = "g"\nluns = {0 = "nope"}', "host_group[0].luns.0"),
    ('port = "CL1-A"\nname = "g"\nluns = {0 = "local"}', "host_group[0].luns.0"),
    ('port = "CL1-A"\nname = "g"\nluns = ["ldev0"]', "host_group[0].luns"),
    ('port = "CL1-A"\nname = "g"\nchap_user = "u"', "host_group[0].chap_secret_file"),
    ('port = "CL1-A"\nname = "g"\nchap_secret_file = "chap"', "host_group[0].chap_user"),
    ('port = "CL1-A"\nname = "g"\nchap_user = "u"\nchap_secret_file = "chap"\nmutual_user = "m"',
     "host_group[0].mutual_secret_file"),
    ('port = "CL1-A"\nname = "g"\nchap_user = "u"\nchap_secret_file = "chap"\n'
     'mutual_user = "m"\nmutual_secret_file = "chap"', "host_group[0].mutual_secret_file"),
    ('port = "CL1-A"\nname = "g"\nchap_user = "u"\nchap_secret_file = "missing"',
     "host_group[0].chap_secret_file"),
    ('port = "CL1-A"\nname = "g"\nchap_user = "u"\nchap_secret_file = "open"',
     "host_group[0].chap_secret_file"),
    ('port = "CL1-A"\nname = "g"\nchap_user = "u"\nchap_secret_file = "short"',
     "host_group[0].chap_secret_file"),
    ('port = "CL1-A"\nname = "g"\nwwns = []', "host_group[0].wwns"),
    ('port = "CL1-A"\nname = "g"\n[[host_group]]\nport = "CL1-A"\nname = "g"',
     "host_group[1].name"),
    ('port = "CL1-A"\nname = "g"\ninitiators = ["iqn.2026-01.x:y"]\n[[host_group]]\n'
     'port = "CL1-A"\nname = "h"\ninitiators = ["iqn.2026-01.x:y"]', "host_group[1].initiators[0]"),
    ('port = "CL1-A"\nname = "g"\nchap_user = "u"\nchap_secret_file = "chap"\n[[host_group]]\n'
     'port = "CL1-A"\nname = "h"', "host_group[1].chap_user"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "field"), BAD_GROUPS)
def test_bad_host_group(tmp_path: Path, body: str, field: str) -> None:
    secret_file(tmp_path, "chap", SECRET)
    secret_file(tmp_path, "open", SECRET, 0o640)
    secret_file(tmp_path, "short", "short")
    msg = check_bad(tmp_path, VOLUMES + "[[host_group]]\n" + body + "\n", field)
    assert SECRET not in msg


def test_the_same_initiator_may_be_in_a_group_on_each_port(tmp_path: Path) -> None:
    body = VOLUMES + GROUP + GROUP.replace("CL1-A", "CL2-A")
    cfg = load(write(tmp_path, body))
    assert [g.port for g in cfg.host_groups] == ["CL1-A", "CL2-A"]


def test_a_secret_file_owned_by_someone_else_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = secret_file(tmp_path, "chap", SECRET)
    if os.geteuid() == 0:
        os.chown(path, 4242, -1)
    else:
        monkeypatch.setattr(os, "geteuid", lambda: os.getuid() + 1)
    body = VOLUMES + GROUP + 'chap_user = "u"\nchap_secret_file = "chap"\n'
    msg = check_bad(tmp_path, body, "host_group[0].chap_secret_file")
    assert "owned by root" in msg


def check_bad(tmp_path: Path, body: str, field: str) -> str:
    with pytest.raises(ConfigError) as e:
        load(write(tmp_path, body))
    msg = str(e.value)
    assert msg.startswith(field + ":"), msg
    assert "\n" not in msg
    return msg
