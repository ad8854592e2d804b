"""From a `[[shadow_set]]` table to a mounted `ShadowSet`: open the members, assemble the set
from their control blocks (or create it when none carries one), and remember members added at
run time so a restart gives them back to the set.

Member volumes are named by their absolute path: `vscsi shadow remove NAME PATH` uses it.
Each member's store stays claimed (see `vscsi.store.claim`) until the set is closed, removed
members included, so adding one back reuses the volume already open on it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vscsi.config import ConfigError, ShadowSetConfig
from vscsi.durable.committer import Committer, fsync_dir
from vscsi.shadow.control import AREA, ControlBlockError, read_block
from vscsi.shadow.set import ShadowSet, Tuning
from vscsi.shadow.states import ShadowError
from vscsi.store.base import Volume
from vscsi.store.claim import store_key
from vscsi.store.file import FileVolume, StoreConfigError

log = logging.getLogger(__name__)

MEMBERS = "members"  # committer kind: members added at run time, keyed by set name


def open_member(path: str, size: int | None = None, block_size: int | None = None,
                create: bool = False, follow_symlinks: bool = False) -> FileVolume:  # fmt: skip
    """A member file or block device; `size` is the set's, so a new file gets room for the
    control block too."""
    path = os.path.abspath(path)
    new = create and not os.path.lexists(path)
    return FileVolume(
        path,
        path,
        size=(size + AREA) if new and size is not None else None,
        block_size=block_size,
        create=new,
        follow_symlinks=follow_symlinks,
    )


class Assembly:
    """One configured set: its member stores, and the members added at run time (committer
    kind `members`, keyed by set name; a `shadow/<name>.members.json` of an older version is
    adopted)."""

    def __init__(
        self, cfg: ShadowSetConfig, state_dir: str, committer: Committer, copy_rate: int = 0
    ) -> None:
        self.cfg = cfg
        self.copy_rate = copy_rate  # the daemon's copy_rate: copies are paced like pair copies
        self.dir = Path(state_dir) / "shadow"
        self.committer = committer
        self._lock = threading.Lock()  # one read-modify-write of the members list at a time
        self._adopt_legacy()
        self.opened: dict[object, FileVolume] = {}  # store_key -> every member volume opened

    def member(self, path: str) -> tuple[FileVolume, bool]:
        """The volume for a member being added: (volume, True) when the set still holds it
        open (a member removed earlier), else a newly opened and claimed one."""
        key = store_key(path)
        if key in self.opened:
            return self.opened[key], True
        return self._open_member(path), False

    def _open_member(self, path: str, **kw: Any) -> FileVolume:
        """follow_symlinks covers the members the config names, not those added at run time."""
        follow = self.cfg.follow_symlinks and path in self.cfg.members
        vol = open_member(path, follow_symlinks=follow, **kw)
        self.opened[store_key(f"/proc/self/fd/{vol.fileno()}")] = vol
        return vol

    def added(self) -> list[str]:
        """Members added at run time (they are not in the config file)."""
        return list(self.committer.load(MEMBERS, self.cfg.name) or [])

    def remember(self, path: str) -> None:
        with self._lock:
            paths = self.added()
            if path not in paths and path not in self.cfg.members:
                self.committer.save(MEMBERS, self.cfg.name, [*paths, path], create=True)

    def _adopt_legacy(self) -> None:
        legacy = self.dir / f"{self.cfg.name}.members.json"
        if legacy.exists() and self.committer.get(MEMBERS, self.cfg.name) is None:
            paths = [str(p) for p in json.loads(legacy.read_text())]
            self.committer.save(MEMBERS, self.cfg.name, paths, create=True)
            legacy.unlink()
            fsync_dir(self.dir)

    def open(self, force: bool = False) -> ShadowSet:
        """Mount the set. A config error names the member; a refusal of the set is one line.
        `force` mounts below the generation the state directory recorded (`vscsi up
        --force-mount`): the writes only a missing member holds are given up."""
        cfg = self.cfg
        vols: list[Volume] = []
        try:
            for i, path in enumerate(cfg.members):
                try:
                    vols.append(
                        self._open_member(
                            path, size=cfg.size, block_size=cfg.block_size, create=cfg.create
                        )
                    )
                except StoreConfigError as e:
                    raise ConfigError(f"{cfg.where}.members[{i}]: {e}") from None
            vols += self._added_members()
            return self._mount(vols, force)
        except ShadowError as e:
            _close(vols)
            raise ConfigError(f"{cfg.where}: {e}") from None
        except BaseException:
            _close(vols)
            raise

    def _added_members(self) -> list[Volume]:
        found: list[Volume] = []
        for path in self.added():
            try:
                found.append(self._open_member(path))
            except StoreConfigError as e:  # gone: the set carries on without it
                log.warning("shadow set %s: member %s added earlier is missing: %s",
                            self.cfg.name, path, e)  # fmt: skip
        return found

    def _mount(self, vols: Sequence[Volume], force: bool) -> ShadowSet:
        cfg = self.cfg
        kw = {"state_dir": self.dir, "wil": cfg.write_intent_log, "read_policy": cfg.read_policy,
              "committer": self.committer, "tuning": Tuning(copy_rate=self.copy_rate)}  # fmt: skip
        if any(_has_block(v) for v in vols):
            return ShadowSet.open(cfg.name, vols, force=force, **kw)  # type: ignore[arg-type]
        return ShadowSet.create(cfg.name, vols, block_size=cfg.block_size, **kw)  # type: ignore[arg-type]


def _has_block(volume: Volume) -> bool:
    try:
        read_block(volume)
    except ControlBlockError:
        return False
    return True


def _close(vols: Sequence[Volume]) -> None:
    for v in vols:
        v.close()
