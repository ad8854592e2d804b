"""A peer array over the TLS link: the `Peer` the pair layer calls, for a daemon with
`[[remote]]` peers."""

from __future__ import annotations

from typing import Any

from vscsi.config import RemoteConfig
from vscsi.link.replica import RemoteReplica
from vscsi.link.session import LinkSession, RemoteError
from vscsi.pair.replica import Replica
from vscsi.pair.states import PairError


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
