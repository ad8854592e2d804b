"""Durable pair records and per-volume notes, through the state directory's committer.

A record is a snapshot: status, copy fence and maps together (DirtyMap.to_bytes, base64).
Every snapshot is stamped by the committer while the pair's lock is held, so an older snapshot
(a slow checkpoint) can never land over a newer one (a split), and a deleted pair's tombstone
stops any late checkpoint from bringing it back. On disk: `pairs/<name>.json` and
`notes/<volume>.json` (see vscsi/durable/committer.py); a `volumes.json` of an older release
is migrated into `notes/` on start.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from vscsi.durable.committer import Committer, fsync_dir
from vscsi.pair.states import Status
from vscsi.tracker import DirtyMap

RECORD_VERSION = 1


@dataclass(slots=True)
class PairRecord:
    """Everything a restart needs to find a pair exactly where it was (or safely behind)."""

    name: str
    pvol: str
    svol: str
    mu: int
    status: Status
    generation: int = 1
    split_read_only: bool = False
    fence: int = 0  # the copy works from here on; below it this pass is done
    copy_total: int = 0  # bytes to copy when the current copy started (for progress)
    pending: DirtyMap | None = None  # grains still to copy (COPY/RCPY)
    pdiff: DirtyMap | None = None  # P-VOL changes since split/suspend
    sdiff: DirtyMap | None = None  # S-VOL changes since split
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["version"] = RECORD_VERSION
        d["status"] = self.status.value
        for key in ("pending", "pdiff", "sdiff"):
            m: DirtyMap | None = getattr(self, key)
            d[key] = None if m is None else base64.b64encode(m.to_bytes()).decode()
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PairRecord:
        if d.get("version") != RECORD_VERSION:
            raise ValueError(f"pair record version {d.get('version')} is not {RECORD_VERSION}")
        maps = {
            key: None if d[key] is None else DirtyMap.from_bytes(base64.b64decode(d[key]))
            for key in ("pending", "pdiff", "sdiff")
        }
        plain = {k: v for k, v in d.items() if k not in maps and k not in ("version", "status")}
        return cls(status=Status(d["status"]), **plain, **maps)


class PairStore:
    """Pair records (kind `pairs`) and volume notes (kind `notes`) in the committer of the
    state directory, and the write-intent logs `wil/<volume>.wil` the engine keeps there."""

    def __init__(
        self, state_dir: str | os.PathLike[str], committer: Committer | None = None
    ) -> None:
        self.root = Path(state_dir)
        self.wil_dir = self.root / "wil"
        self.wil_dir.mkdir(parents=True, exist_ok=True)
        self.committer = committer if committer is not None else Committer(self.root)
        self._migrate_notes()

    def stamp(self) -> int:
        """A generation for a snapshot about to be taken: call it holding the pair's lock."""
        return self.committer.stamp()

    def abandon(self, generation: int) -> None:
        self.committer.abandon(generation)

    def commit(self, rec: PairRecord, generation: int, *, create: bool = False) -> bool:
        """Make the snapshot `rec` stamped `generation` durable; False when a newer snapshot
        (or the pair's tombstone) already is."""
        return self.committer.commit("pairs", rec.name, rec.to_json(), generation, create=create)

    def delete(self, name: str, generation: int) -> None:
        """The pair's tombstone: no later checkpoint of the deleted pair can bring it back."""
        self.committer.delete("pairs", name, generation)

    def load_all(self) -> list[PairRecord]:
        return [PairRecord.from_json(d) for d in self.committer.items("pairs").values()]

    def wil_path(self, volume: str) -> str:
        return str(self.wil_dir / f"{volume}.wil")

    def notes(self) -> dict[str, dict[str, Any]]:
        """Per-volume notes that outlive a pair (e.g. S-VOL content undefined after delete)."""
        return self.committer.items("notes")

    def set_note(self, volume: str, note: dict[str, Any] | None) -> None:
        """Each volume's note is its own key: no read-modify-write shared between volumes."""
        if note is None:
            if self.committer.load("notes", volume) is not None:
                self.committer.delete("notes", volume)
        else:
            self.committer.save("notes", volume, note, create=True)

    def _migrate_notes(self) -> None:
        """`volumes.json` (one file for every volume's note) -> one `notes` key per volume;
        the old file goes only once every note in it is durable in its new place."""
        legacy = self.root / "volumes.json"
        if not legacy.exists():
            return
        for volume, note in json.loads(legacy.read_bytes()).items():
            if self.committer.get("notes", volume) is None:
                self.committer.save("notes", volume, note, create=True)
        legacy.unlink()
        fsync_dir(self.root)
