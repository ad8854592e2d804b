"""Backing stores are opened without following anyone's symlinks and claimed exclusively for as
long as a volume has them open."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vscsi.config import ConfigError, open_volumes, parse
from vscsi.store import claim
from vscsi.store.claim import open_store
from vscsi.store.file import FileVolume, StoreConfigError

MIB = 1 << 20


def image(path: Path, size: int = MIB) -> str:
    with path.open("wb") as f:
        f.truncate(size)
    return str(path)


def test_a_second_volume_on_a_claimed_file_is_refused_until_the_first_closes(
    tmp_path: Path,
) -> None:
    path = image(tmp_path / "a.img")
    first = FileVolume("a", path)
    with pytest.raises(StoreConfigError, match=r"a\.img is held by another process"):
        FileVolume("b", path)
    first.close()
    FileVolume("b", path).close()  # the claim ends with the volume


def test_a_file_claimed_by_another_process_is_refused(tmp_path: Path) -> None:
    path = image(tmp_path / "a.img")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from vscsi.store.file import FileVolume; v = FileVolume('x', sys.argv[1]);"
         " print('held', flush=True); sys.stdin.read()", path],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(StoreConfigError, match="held by another process"):
            FileVolume("a", path)
    finally:
        holder.communicate("")
    FileVolume("a", path).close()


def test_a_symlink_to_a_store_is_refused_unless_allowed(tmp_path: Path) -> None:
    victim = image(tmp_path / "victim.img")
    (tmp_path / "link.img").symlink_to(victim)
    with pytest.raises(StoreConfigError, match=r"link\.img is a symbolic link not owned by root"):
        FileVolume("v", str(tmp_path / "link.img"))
    v = FileVolume("v", str(tmp_path / "link.img"), follow_symlinks=True)
    v.write(0, [memoryview(b"L" * 512)])
    v.close()
    assert Path(victim).read_bytes()[:512] == b"L" * 512


def test_a_symlinked_directory_on_the_way_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    image(tmp_path / "real" / "a.img")
    (tmp_path / "dir").symlink_to(tmp_path / "real")
    with pytest.raises(StoreConfigError, match="dir is a symbolic link"):
        FileVolume("v", str(tmp_path / "dir" / "a.img"))
    FileVolume("v", str(tmp_path / "dir" / "a.img"), follow_symlinks=True).close()


def test_a_planted_link_where_a_store_is_to_be_created_is_not_followed(tmp_path: Path) -> None:
    """The /tmp attack: a user pre-creates the demo's image as a link to a disk."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "ldev0100.img").symlink_to(victim)
    with pytest.raises(StoreConfigError, match="symbolic link"):
        FileVolume("v", str(tmp_path / "demo" / "ldev0100.img"), size=MIB, create=True)
    assert victim.read_bytes() == b"precious"


def test_a_root_link_in_root_only_directories_is_followed() -> None:
    """Like /dev/disk/by-id: root made the link and nobody else can change the directories."""
    link = Path("/etc/os-release")
    if not link.is_symlink() or link.lstat().st_uid != 0:
        pytest.skip("needs /etc/os-release as root's symlink")
    fd, created = open_store(str(link), writable=False)
    try:
        assert not created and os.fstat(fd).st_ino == link.stat().st_ino
    finally:
        os.close(fd)


def test_create_makes_missing_parent_directories_0700(tmp_path: Path) -> None:
    v = FileVolume("v", str(tmp_path / "a" / "b" / "v.img"), size=MIB, create=True)
    v.close()
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "a" / "b").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "a" / "b" / "v.img").stat().st_size == MIB
    with pytest.raises(StoreConfigError, match=r"c/v\.img does not exist"):
        FileVolume("w", str(tmp_path / "c" / "v.img"))  # no create: nothing is made
    assert not (tmp_path / "c").exists()


def test_a_file_that_backs_a_loop_device_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = image(tmp_path / "a.img")
    sysfs = tmp_path / "sys" / "loop7" / "loop"
    sysfs.mkdir(parents=True)
    (sysfs / "backing_file").write_text(path + "\n")
    monkeypatch.setattr(claim, "LOOP_BACKING", str(tmp_path / "sys/loop*/loop/backing_file"))
    with pytest.raises(StoreConfigError, match=r"a\.img backs /dev/loop7 \(detach it"):
        FileVolume("v", path)
    FileVolume("v", image(tmp_path / "b.img")).close()


def test_one_store_under_two_names_in_a_config_names_both_volumes(tmp_path: Path) -> None:
    image(tmp_path / "a.img")
    os.link(tmp_path / "a.img", tmp_path / "b.img")
    vols = [{"name": "ldev0100", "path": "a.img", "identity": {"volume_id": 1}},
            {"name": "ldev0101", "path": "b.img", "identity": {"volume_id": 2}}]  # fmt: skip
    with pytest.raises(ConfigError) as e:
        parse({"volume": vols}, base=tmp_path)
    assert str(e.value) == (
        f"volume[1].path: {tmp_path}/b.img is already the store of volume 'ldev0100'"
    )


def test_follow_symlinks_in_the_config(tmp_path: Path) -> None:
    image(tmp_path / "real.img")
    (tmp_path / "link.img").symlink_to(tmp_path / "real.img")
    vol = {"name": "v", "path": "link.img"}
    with pytest.raises(ConfigError, match=r"^volume\[0\]\.path: .*link\.img is a symbolic link"):
        open_volumes(parse({"volume": [vol]}, base=tmp_path))
    opened = open_volumes(parse({"volume": [{**vol, "follow_symlinks": True}]}, base=tmp_path))
    opened["v"].close()
    with pytest.raises(ConfigError, match=r"^volume\[0\]\.follow_symlinks: expected bool"):
        parse({"volume": [{**vol, "follow_symlinks": "yes"}]}, base=tmp_path)
