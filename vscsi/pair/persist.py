"""Durable pair records: one JSON file per pair, replaced atomically (write, fsync, rename,
fsync the directory) so a crash leaves either the old or the new record, never a torn one.

The change maps and the remaining-to-copy map travel inside the record (DirtyMap.to_bytes,
base64), so a record is always a consistent snapshot: status, copy fence and maps together.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

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
    fence: int = 0  # the copy claims from here on; below it this pass is done
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


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` durably: fsync the file, rename, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PairStore:
    """The state directory: `pairs/<name>.json`, `volumes.json` (per-volume notes), and the
    write-intent logs `wil/<volume>.wil` the engine keeps there."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.root = Path(state_dir)
        self.pairs_dir = self.root / "pairs"
        self.wil_dir = self.root / "wil"
        for d in (self.root, self.pairs_dir, self.wil_dir):
            d.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str) -> Path:
        return self.pairs_dir / f"{name}.json"

    def save(self, rec: PairRecord) -> None:
        atomic_write(self._path(rec.name), json.dumps(rec.to_json()).encode())

    def load_all(self) -> list[PairRecord]:
        return [
            PairRecord.from_json(json.loads(p.read_bytes()))
            for p in sorted(self.pairs_dir.glob("*.json"))
        ]

    def remove(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)
        _fsync_dir(self.pairs_dir)

    def wil_path(self, volume: str) -> str:
        return str(self.wil_dir / f"{volume}.wil")

    def notes(self) -> dict[str, dict[str, Any]]:
        """Per-volume notes that outlive a pair (e.g. S-VOL content undefined after delete)."""
        path = self.root / "volumes.json"
        return json.loads(path.read_bytes()) if path.exists() else {}

    def set_note(self, volume: str, note: dict[str, Any] | None) -> None:
        notes = self.notes()
        if note is None:
            if notes.pop(volume, None) is None:
                return
        else:
            notes[volume] = note
        atomic_write(self.root / "volumes.json", json.dumps(notes).encode())
