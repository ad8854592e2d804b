"""How this array reaches a peer array: control calls for pair state and the S-VOL as a
`Replica`. The TLS link implements it between daemons; tests join two managers in one
process."""

from __future__ import annotations

from typing import Any, Protocol

from vscsi.config import RemoteConfig
from vscsi.link.replica import RemoteReplica
from vscsi.link.session import LinkDown, LinkSession, RemoteError
from vscsi.pair.replica import Replica
from vscsi.pair.states import PairError

__all__ = ["LinkDown", "LinkPeer", "Peer"]


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


class LinkPeer:
    """A peer array over the TLS link (`vscsi.link`): control calls are CONTROL frames,
    ordered after the update copies sent before them."""

    def __init__(self, session: LinkSession, remote: RemoteConfig) -> None:
        self.session = session
        self.remote = remote

    @property
    def name(self) -> str:
        return self.remote.name

    @property
    def serial(self) -> int:
        return self.remote.serial

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        try:
            return self.session.control({"op": op, **args})
        except RemoteError as e:  # the peer's pair layer refused: its reason, one line
            raise PairError(f"array {self.name}: {e}") from None

    def replica(self, volume: str) -> Replica:
        return RemoteReplica(self.session, volume)
