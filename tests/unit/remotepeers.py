"""Two pair managers as two arrays in one process: a `LoopPeer` carries control calls (through
JSON, as the link does) and update copies to the other manager, and can be cut like a link."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.unit.memvolume import MemVolume
from vscsi.pair.manager import PairManager
from vscsi.remote.peer import LinkDown
from vscsi.scsi.identity import Identity
from vscsi.store.base import Extent

MIB = 1 << 20
SIZE = 4 * MIB


class Link:
    """The wire between the arrays: `up` False cuts it both ways."""

    def __init__(self) -> None:
        self.up = True

    def check(self) -> None:
        if not self.up:
            raise LinkDown("link down")


class LoopPeer:
    def __init__(self, name: str, serial: int, link: Link, me: int) -> None:
        self.name, self.serial, self.link, self.me = name, serial, link, me
        self.target: PairManager | None = None  # the peer array's manager (set once built)

    def _m(self) -> PairManager:
        self.link.check()
        if self.target is None:
            raise LinkDown(f"array {self.serial} is down")
        return self.target

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        wire = json.loads(json.dumps(args))
        return json.loads(json.dumps(self._m().remote.handle(op, wire, self.me)))

    def replica(self, volume: str) -> LoopReplica:
        return LoopReplica(self, volume)


class LoopReplica:
    def __init__(self, peer: LoopPeer, volume: str) -> None:
        self.peer, self.volume = peer, volume

    def _target(self):  # type: ignore[no-untyped-def]
        return self.peer._m().remote.replica_target(self.volume, self.peer.me)

    @property
    def size(self) -> int:
        return int(self._target().size)

    def readinto(self, offset: int, bufs: Sequence[memoryview]) -> None:
        self._target().readinto(offset, bufs)

    def write(self, offset: int, bufs: Sequence[memoryview], fua: bool = False) -> None:
        self._target().write(offset, bufs, fua)

    def flush(self) -> None:
        self._target().flush()

    def unmap(self, offset: int, length: int) -> None:
        self._target().unmap(offset, length)

    def extent_at(self, offset: int) -> Extent:
        return self._target().extent_at(offset)  # type: ignore[no-any-return]


class Site:
    """One array: its volumes (kept across restarts) and its current manager."""

    def __init__(self, root: Path, name: str, serial: int, link: Link, peer: Site | None) -> None:
        self.root, self.name, self.serial, self.link = root, name, serial, link
        self.vols = {f"{name}v{i}": MemVolume(SIZE, name=f"{name}v{i}") for i in range(2)}
        self.peer_site = peer
        self.m: PairManager | None = None

    def start(self, other: Site, copy_rate: int = 0) -> PairManager:
        peer = LoopPeer(other.name, other.serial, self.link, self.serial)
        ids = {n: Identity(serial=self.serial, volume_id=0x100 + i) for i, n in
               enumerate(self.vols)}  # fmt: skip
        self.m = PairManager(str(self.root / self.name), self.vols, ids, serial=self.serial,
                             peers={other.name: peer}, wil_idle=3600,
                             copy_rate=copy_rate)  # fmt: skip
        self.peer = peer
        if other.m is not None:
            peer.target = other.m
            other.peer.target = self.m
        return self.m

    def crash(self) -> None:
        """The daemon is gone (no close): its logs keep their marks."""
        assert self.m is not None
        for pair in self.m.mirrors():
            pair.stop_copier()
        for pv in self.m.volumes.values():
            pv.wil._stop.set()
        self.peer_of_other_down()
        self.m = None

    def peer_of_other_down(self) -> None:
        if self.peer_site is not None and self.peer_site.m is not None:
            self.peer_site.peer.target = None


def two_sites(tmp_path: Path) -> tuple[Site, Site, Link]:
    link = Link()
    a = Site(tmp_path, "A", 410001, link, None)
    b = Site(tmp_path, "B", 410002, link, a)
    a.peer_site = b
    a.start(b)
    b.start(a)
    return a, b, link
