"""The link's errors, apart from the sessions: the pair layer catches them on every array,
and only a daemon with `[[remote]]` peers imports the sessions (TLS, cryptography)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vscsi.store.base import VolumeError

if TYPE_CHECKING:
    from vscsi.link.frames import Status


class LinkError(VolumeError):
    """A request to a peer array that did not complete: the pair layer applies its fence."""


class LinkDown(LinkError):
    """No working connection to the peer: not yet up, refused, lost, or the peer went silent.
    A request in flight when the link went down may or may not have been applied."""


class RemoteError(LinkError):
    """The peer answered, and the request failed there (`status` says how)."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status
