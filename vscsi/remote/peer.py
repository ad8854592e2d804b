"""How this array reaches a peer array: control calls for pair state and the S-VOL as a
`Replica`. The TLS link implements it between daemons (`vscsi.link.peer`); tests join two
managers in one process."""

from __future__ import annotations

from typing import Any, Protocol

from vscsi.link.errors import LinkDown
from vscsi.pair.replica import Replica

__all__ = ["LinkDown", "Peer"]


class Peer(Protocol):
    @property
    def name(self) -> str:
        """The peer's name in `[[remote]]` (the REMOTE of `REMOTE:VOLUME`)."""
        ...

    @property
    def serial(self) -> int: ...

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """A control request answered by the peer's pair manager; LinkDown when unreachable,
        PairError with the peer's one-line reason when it refused."""
        ...

    def replica(self, volume: str) -> Replica:
        """The peer's volume as an S-VOL written by this array."""
        ...
