"""`vscsi shadow add` opens only what the config allows and nothing another user holds."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_shadow_cli import Running, config
from vscsi.control import ControlError, request
from vscsi.shadow import AREA

MIB = 1 << 20


def member(path: Path) -> Path:
    path.write_bytes(bytes(4 * MIB + AREA))
    return path


@pytest.fixture
def allowed(tmp_path: Path) -> Iterator[tuple[Running, Path]]:
    """A daemon that may add members from tmp_path/pool/."""
    pool = tmp_path / "pool"
    pool.mkdir()
    cfg = config(tmp_path)
    cfg["daemon"]["shadow_add_paths"] = [f"{pool}/"]  # type: ignore[index]
    r = Running(tmp_path, cfg)
    r.cli("shadow", "wait", "dsa1", "--timeout", "30")
    yield r, pool
    r.close()


def test_nothing_outside_the_config_by_default(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    del cfg["daemon"]["shadow_add_paths"]  # type: ignore[attr-defined]
    r = Running(tmp_path, cfg)
    try:
        r.cli("shadow", "wait", "dsa1", "--timeout", "30")
        extra = member(tmp_path / "m9.img")
        rc, out = r.cli("shadow", "add", "dsa1", str(extra))
        assert rc == 1 and out == (
            f"vscsi: {extra} is not a member of shadow set 'dsa1' and not under "
            "daemon.shadow_add_paths (none); add its directory there first\n"
        )
        m1 = str(tmp_path / "m1.img")  # a member named in the config may always come back
        assert r.cli("shadow", "remove", "dsa1", m1)[0] == 0
        rc, out = r.cli("shadow", "add", "dsa1", m1, "--wait", "30")
        assert rc == 0 and out.splitlines()[-1] == "dsa1: Steady State", out
    finally:
        r.close()


def test_outside_the_allowed_directories_is_refused(allowed: tuple[Running, Path],
                                                    tmp_path: Path) -> None:  # fmt: skip
    r, pool = allowed
    for path in (str(member(tmp_path / "m9.img")), f"{pool}/../m9.img"):
        rc, out = r.cli("shadow", "add", "dsa1", path)
        assert rc == 1 and "not under daemon.shadow_add_paths" in out, out
    with pytest.raises(ControlError, match="give an absolute path"):
        request(r.daemon.config.socket, "shadow_add", name="dsa1", member="pool/m9.img")


def test_another_volumes_store_is_refused(allowed: tuple[Running, Path],
                                          tmp_path: Path) -> None:  # fmt: skip
    r, pool = allowed
    (pool / "v0.img").hardlink_to(tmp_path / "v0.img")
    rc, out = r.cli("shadow", "add", "dsa1", str(pool / "v0.img"))
    assert rc == 1 and out == f"vscsi: {pool}/v0.img is already the store of volume 'v0'\n"


def test_a_store_held_elsewhere_is_refused(allowed: tuple[Running, Path]) -> None:
    r, pool = allowed
    path = member(pool / "m9.img")
    with path.open("rb") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # as another vscsi daemon serving it holds it
        rc, out = r.cli("shadow", "add", "dsa1", str(path))
    assert (
        rc == 1
        and out
        == f"vscsi: {path} is held by another process (another vscsi daemon, or a second volume)\n"
    )
    rc, out = r.cli("shadow", "add", "dsa1", str(path), "--wait", "30")
    assert rc == 0 and out.splitlines()[-1] == "dsa1: Steady State", out


def test_a_symlink_in_the_allowed_directory_is_refused(allowed: tuple[Running, Path],
                                                       tmp_path: Path) -> None:  # fmt: skip
    r, pool = allowed
    (pool / "m9.img").symlink_to(member(tmp_path / "victim.img"))
    rc, out = r.cli("shadow", "add", "dsa1", str(pool / "m9.img"))
    assert rc == 1 and "m9.img is a symbolic link not owned by root" in out, out


def test_follow_symlinks_covers_only_the_members_the_config_names(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    pool.mkdir()
    (tmp_path / "m0.img").symlink_to(member(tmp_path / "real0.img"))
    (pool / "m9.img").symlink_to(member(tmp_path / "real9.img"))
    cfg = config(tmp_path, follow_symlinks=True)
    cfg["daemon"]["shadow_add_paths"] = [f"{pool}/"]  # type: ignore[index]
    r = Running(tmp_path, cfg)  # m0.img, a link the config names, is followed
    try:
        r.cli("shadow", "wait", "dsa1", "--timeout", "30")
        rc, out = r.cli("shadow", "add", "dsa1", str(pool / "m9.img"))
        assert rc == 1 and "m9.img is a symbolic link not owned by root" in out, out
    finally:
        r.close()
