"""A shadow set never loses an acknowledged write to a stale member: a mount from stale
members alone is refused against the generation recorded in the state directory (a crash
between the members and the record refuses nothing it should accept), a member holding writes
the set never saw is not copied over, and minicopy bitmaps are kept by the committer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vscsi.config import ConfigError, parse
from vscsi.durable import faults
from vscsi.durable.committer import Committer
from vscsi.shadow import ShadowSet
from vscsi.shadow.assemble import Assembly
from vscsi.shadow.control import read_block
from vscsi.shadow.set import KIND, MAP_KIND, default_committer
from vscsi.shadow.states import ShadowError

from .test_shadow_support import (
    GRAIN,
    TUNING,
    crash,
    create,
    data_of,
    members,
    open_set,
    read,
    reopen,
    write,
)


def _member(s: ShadowSet, name: str) -> dict[str, object]:
    return next(m for m in s.show()["members"] if m["name"] == name)


def _split(tmp_path: Path) -> None:
    """b fails and leaves; an acknowledged write lands on a alone; the daemon dies."""
    a, b = members(tmp_path, "a", "b")
    s = create(tmp_path, [a, b])
    b.bad_write.append((0, 1 << 30))
    write(s, 5 * GRAIN, b"NEW!" * 1024)
    crash(s)


def test_mount_from_the_stale_member_alone_is_refused(tmp_path: Path) -> None:
    _split(tmp_path)
    stale = reopen(tmp_path, "b")
    with pytest.raises(ShadowError) as e:
        open_set(tmp_path, stale)
    stale[0].close()  # a refused open leaves the volumes to the caller, who holds their claims
    assert "shadow set 'dsa1': the members given carry generation" in str(e.value)
    assert "a newer member is missing; give it, or mount with force" in str(e.value)
    assert "\n" not in str(e.value)
    s = open_set(tmp_path, reopen(tmp_path, "a", "b"))  # with the newer member: fine
    assert read(s, 5 * GRAIN, 4096) == b"NEW!" * 1024
    s.close()


def test_forced_mount_of_the_stale_member_continues_above_the_record(tmp_path: Path) -> None:
    _split(tmp_path)
    committer = default_committer(tmp_path / "state")
    recorded = committer.load(KIND, _set_id(tmp_path, "a"))["generation"]
    (b,) = reopen(tmp_path, "b")
    s = ShadowSet.open("dsa1", [b], state_dir=tmp_path / "state", tuning=TUNING, force=True)
    assert s.generation > recorded
    (a,) = reopen(tmp_path, "a")
    s.add(a)  # the operator chose b: a is copied over, as forced
    assert s.wait(10)
    assert data_of(tmp_path, "a") == data_of(tmp_path, "b")
    s.close()


def test_add_of_a_member_with_writes_the_set_never_saw_is_refused(tmp_path: Path) -> None:
    _split(tmp_path)
    # the state directory is lost: nothing recorded, so b alone mounts
    s = ShadowSet.open("dsa1", reopen(tmp_path, "b"), state_dir=tmp_path / "other",
                       tuning=TUNING)  # fmt: skip
    (a,) = reopen(tmp_path, "a")
    with pytest.raises(ShadowError) as e:
        s.add(a)
    assert str(e.value).startswith("a.img carries generation ")
    assert str(e.value).endswith(
        "it holds writes the set never saw; dismount the set and mount it with this member"
    )
    a.close()
    s.close()
    assert (tmp_path / "a.img").read_bytes()[5 * GRAIN : 5 * GRAIN + 4] == b"NEW!"


def test_member_removed_by_this_mount_comes_back(tmp_path: Path) -> None:
    s = create(tmp_path, members(tmp_path, "a", "b"))
    (b,) = [v for v in s._volumes() if v.name == "b.img"]
    s.remove("b.img", minicopy=True)
    write(s, 0, b"n" * 4096)
    s.add(b)  # b's generation is this mount's own: no refusal
    assert s.wait(10)
    assert data_of(tmp_path, "a") == data_of(tmp_path, "b")
    s.close()


def _set_id(tmp_path: Path, name: str) -> str:
    return _ids(tmp_path, name)[0]


def _ids(tmp_path: Path, name: str) -> tuple[str, str]:
    """(set id, member id) from a member's control block."""
    (v,) = reopen(tmp_path, name)
    try:
        blk, self_id = read_block(v)
        return blk.set_id.hex(), self_id.hex()
    finally:
        v.close()


@pytest.mark.parametrize("point", ["shadow.record.before", "shadow.block.written"])
def test_crash_between_members_and_record_never_refuses_the_newest(
    tmp_path: Path, point: str
) -> None:
    s = create(tmp_path, members(tmp_path, "a", "b"))

    def die(name: str) -> None:
        if name == point:
            raise faults.Crash(name)

    with faults.installed(die), pytest.raises(faults.Crash):
        s.remove("b.img", minicopy=True)  # a gets the next generation, then the crash
    crash(s)
    s = open_set(tmp_path, reopen(tmp_path, "a"))  # the newest member alone mounts
    s.close()


def test_crash_after_the_record_refuses_the_member_that_left(tmp_path: Path) -> None:
    s = create(tmp_path, members(tmp_path, "a", "b"))

    def die(name: str) -> None:
        if name == "shadow.record.after":
            raise faults.Crash(name)

    with faults.installed(die), pytest.raises(faults.Crash):
        s.remove("b.img", minicopy=True)
    crash(s)
    with pytest.raises(ShadowError, match="a newer member is missing"):
        open_set(tmp_path, reopen(tmp_path, "b"))


def test_minicopy_bitmap_is_kept_by_the_committer_and_used_once(tmp_path: Path) -> None:
    s = create(tmp_path, members(tmp_path, "a", "b"))
    s.remove("b.img", minicopy=True)
    write(s, 0, b"m" * 4096)
    s.close()
    committer = default_committer(tmp_path / "state")
    key = f"{_set_id(tmp_path, 'a')}.{_ids(tmp_path, 'b')[1]}"
    assert committer.load(MAP_KIND, key) is not None
    assert not list((tmp_path / "state").rglob("*.map"))
    s = open_set(tmp_path, reopen(tmp_path, "a", "b"))
    assert committer.load(MAP_KIND, key) is None  # read once: a crash now must not reuse it
    assert _member(s, "b.img")["display"] == f"Removed, {GRAIN} bytes changed since"
    s.close()


def test_assembly_refuses_the_stale_member_alone_unless_forced(tmp_path: Path) -> None:
    def assembly(*names: str) -> Assembly:
        shadow = {"name": "dsa1", "members": [f"{n}.img" for n in names], "size": "4MiB",
                  "create": True, "identity": {"serial": 410003, "volume_id": 0x300}}  # fmt: skip
        cfg = parse({"daemon": {"socket": str(tmp_path / "ctl.sock"), "state_dir": "state"},
                     "shadow_set": [shadow]}, base=tmp_path)  # fmt: skip
        state = str(tmp_path / "state")
        return Assembly(cfg.shadow_sets[0], state, Committer.at(state))

    s = assembly("m0", "m1").open()
    assert s.wait(10)
    s.close()
    assembly("m0").open().close()  # m1 is missing: the set goes on without it
    with pytest.raises(ConfigError) as e:
        assembly("m1").open()
    assert str(e.value).startswith("shadow_set[0]: shadow set 'dsa1': the members given carry")
    assert "\n" not in str(e.value)
    s = assembly("m1").open(force=True)
    full = [m["name"] for m in s.show()["members"] if m["state"] == "ShadowSetMember"]
    assert full == [str(tmp_path / "m1.img")]
    s.close()


def test_members_added_at_run_time_are_committed_and_an_old_list_adopted(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "shadow").mkdir(parents=True)
    (state / "shadow" / "dsa1.members.json").write_text(json.dumps(["/srv/old.img"]))
    shadow = {"name": "dsa1", "members": ["m0.img"], "size": "4MiB", "create": True,
              "identity": {"serial": 410003, "volume_id": 0x300}}  # fmt: skip
    cfg = parse({"daemon": {"socket": str(tmp_path / "ctl.sock"), "state_dir": "state"},
                 "shadow_set": [shadow]}, base=tmp_path).shadow_sets[0]  # fmt: skip
    committer = Committer.at(state)
    a = Assembly(cfg, str(state), committer)
    assert a.added() == ["/srv/old.img"]  # adopted from the file an older version wrote
    assert not (state / "shadow" / "dsa1.members.json").exists()
    a.remember("/srv/new.img")
    a.remember("/srv/new.img")
    a.remember(str(tmp_path / "m0.img"))  # in the config: not an addition
    assert Committer(state).load("members", "dsa1") == ["/srv/old.img", "/srv/new.img"]


def test_force_mount_of_a_set_the_config_lacks_is_one_line(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from vscsi.cli import main

    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[daemon]\nsocket = "{tmp_path}/s.sock"\nstate_dir = "{tmp_path}/st"\n'
        f'[[volume]]\nname = "v"\npath = "{tmp_path}/v.img"\nsize = "1MiB"\n'
        "create = true\n"
    )
    r = CliRunner().invoke(main, ["up", "-c", str(cfg), "--force-mount", "dsa9"])
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == [
        f"vscsi: --force-mount dsa9: {cfg} has no shadow set of that name"
    ]
