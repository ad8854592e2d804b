"""The one committer of durable state: every persistent object in `state_dir` (pair records,
volume notes, shadow-set member lists and generations, minicopy maps) is written here.

Why one place: a record is a snapshot of in-memory state, and several threads take snapshots
(an operator command, the copier's checkpoint, the write-intent log's cleaner). Written
naively, a slow writer puts an older snapshot over a newer one, two writers tear a shared
temp file, and a checkpoint brings a deleted object back. The rules here make that impossible:

- every snapshot is stamped from one monotonic counter *while the object's lock is held*, so
  stamp order is snapshot order;
- writers are serialised per key, and a commit whose stamp is not newer than what is already
  durable for that key is dropped (it was superseded: the newer snapshot is already on disk);
- a delete is a tombstone, itself stamped; nothing but an explicit `create` commit passes a
  tombstone, so a late checkpoint of a deleted object cannot resurrect it;
- each write goes to a unique temp file, is fsync-ed, renamed over the key, and the directory
  is fsync-ed: after a crash a key holds either its old or its new content, never a torn one;
- `durable()` tells up to which stamp every commit has finished (or was abandoned), which is
  what the write-intent log needs before it may forget a region.

On disk: `<root>/<kind>/<name>.json` holding ``{"generation": N, "deleted": bool,
"payload": ...}``. The generation is the stamp; it is global, so a restart resumes the counter
above the highest one found.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from vscsi.durable.faults import fault_point

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@+-]{0,127}$")
_KIND = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_TMP = ".tmp"


class CommitError(Exception):
    """A key or payload the committer cannot store (a programming error, not a crash)."""


@dataclass(frozen=True, slots=True)
class Entry:
    """What is durable for one key: its generation and payload (None for a tombstone)."""

    generation: int
    payload: Any

    @property
    def deleted(self) -> bool:
        return self.payload is None


class Committer:
    """All durable objects under `root`. Thread-safe; one instance per directory in a process
    (`Committer.at`): two would keep separate counters and remove each other's temp files."""

    _instances: ClassVar[dict[Path, Committer]] = {}
    _instances_lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def at(cls, root: str | os.PathLike[str]) -> Committer:
        """The committer of `root` in this process, made on first use."""
        path = Path(root).resolve()
        with cls._instances_lock:
            if path not in cls._instances:
                cls._instances[path] = cls(path)
            return cls._instances[path]

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # the counter, the key table, outstanding stamps
        self._key_locks: dict[tuple[str, str], threading.Lock] = {}
        self._durable: dict[tuple[str, str], Entry] = {}
        self._outstanding: set[int] = set()
        self._next = 1
        self._scan()

    # -- start-up -------------------------------------------------------------------------------

    def _scan(self) -> None:
        """Adopt every key on disk; drop temp files a crash left; resume the counter."""
        top = 0
        for kind_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if not _KIND.match(kind_dir.name):
                continue
            for path in sorted(kind_dir.iterdir()):
                if path.name.endswith(_TMP):
                    path.unlink(missing_ok=True)
                    continue
                if path.suffix != ".json":
                    continue
                entry = _read(path)
                self._durable[(kind_dir.name, path.stem)] = entry
                top = max(top, entry.generation)
        self._next = top + 1

    # -- stamping -------------------------------------------------------------------------------

    def stamp(self) -> int:
        """The next generation. Take it while holding the lock of the object you are about to
        snapshot, then `commit` (or `abandon`) it."""
        with self._lock:
            gen = self._next
            self._next += 1
            self._outstanding.add(gen)
            return gen

    def abandon(self, generation: int) -> None:
        """A stamped snapshot that will not be committed (e.g. its data flush failed)."""
        with self._lock:
            self._outstanding.discard(generation)

    def durable(self) -> int:
        """Every commit stamped at or below this generation has finished or was abandoned."""
        with self._lock:
            return (min(self._outstanding) if self._outstanding else self._next) - 1

    # -- committing -----------------------------------------------------------------------------

    def commit(
        self, kind: str, name: str, payload: Any, generation: int, *, create: bool = False
    ) -> bool:
        """Make `payload` (JSON-serialisable; None = delete) durable for `kind/name` unless a
        snapshot stamped later is already durable there, or the key is deleted and this is not a
        `create`. True when written, False when dropped. On an exception nothing changed."""
        try:
            key = _key(kind, name)
            data = _encode(kind, name, generation, payload)
            with self._key_lock(key):
                old = self._durable.get(key)
                if old is not None and (
                    old.generation >= generation or (old.deleted and not create)
                ):
                    return False
                self._write(key, data)
                self._durable[key] = Entry(generation, payload)
                return True
        finally:
            self.abandon(generation)

    def save(self, kind: str, name: str, payload: Any, *, create: bool = False) -> bool:
        """Stamp and commit in one step: for state that has no concurrent snapshotters (the
        caller already serialises every change of this key)."""
        return self.commit(kind, name, payload, self.stamp(), create=create)

    def delete(self, kind: str, name: str, generation: int | None = None) -> bool:
        """Leave a tombstone: the object stays deleted across restarts and late snapshots."""
        gen = self.stamp() if generation is None else generation
        return self.commit(kind, name, None, gen)

    # -- reading --------------------------------------------------------------------------------

    def get(self, kind: str, name: str) -> Entry | None:
        """The durable entry of a key (tombstones included), or None if it never existed."""
        with self._lock:
            return self._durable.get(_key(kind, name))

    def load(self, kind: str, name: str) -> Any:
        """The live payload of a key, or None (absent or deleted)."""
        entry = self.get(kind, name)
        return None if entry is None else entry.payload

    def items(self, kind: str) -> dict[str, Any]:
        """Every live object of a kind, by name (tombstones left out)."""
        _key(kind, "x")
        with self._lock:
            return {
                n: e.payload for (k, n), e in sorted(self._durable.items())
                if k == kind and not e.deleted
            }  # fmt: skip

    # -- files ----------------------------------------------------------------------------------

    @contextmanager
    def _key_lock(self, key: tuple[str, str]) -> Iterator[None]:
        with self._lock:
            lock = self._key_locks.setdefault(key, threading.Lock())
        with lock:
            yield

    def _write(self, key: tuple[str, str], data: bytes) -> None:
        kind, name = key
        directory = self.root / kind
        new_dir = not directory.exists()
        directory.mkdir(mode=0o700, exist_ok=True)
        if new_dir:
            fsync_dir(self.root)
        fd, tmp = _mkstemp(directory, name)
        try:
            try:
                os.write(fd, data)
                fault_point("commit.written")
                os.fsync(fd)
            finally:
                os.close(fd)
            fault_point("commit.synced")
            os.replace(tmp, directory / f"{name}.json")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fault_point("commit.renamed")
        fsync_dir(directory)


def _key(kind: str, name: str) -> tuple[str, str]:
    if not _KIND.match(kind) or not _NAME.match(name):
        raise CommitError(f"invalid durable key {kind!r}/{name!r}")
    return kind, name


def _encode(kind: str, name: str, generation: int, payload: Any) -> bytes:
    record = {"generation": generation, "deleted": payload is None, "payload": payload}
    try:
        return json.dumps(record, separators=(",", ":")).encode()
    except (TypeError, ValueError) as e:
        raise CommitError(f"{kind}/{name}: payload is not JSON: {e}") from None


def _mkstemp(directory: Path, name: str) -> tuple[int, str]:
    """A temp file no other writer shares (O_EXCL on a random name)."""
    while True:
        tmp = directory / f".{name}.{os.urandom(6).hex()}{_TMP}"
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            return os.open(tmp, flags, 0o600), str(tmp)
        except FileExistsError:
            continue


def _read(path: Path) -> Entry:
    try:
        d = json.loads(path.read_bytes())
        if not isinstance(d, dict) or set(d) != {"generation", "deleted", "payload"}:
            return Entry(0, d)  # written before the committer existed: older than any stamp
        gen, deleted = int(d["generation"]), bool(d["deleted"])
        return Entry(gen, None if deleted else d["payload"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CommitError(f"{path}: unreadable durable record: {e}") from None


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
