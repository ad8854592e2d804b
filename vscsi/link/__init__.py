"""The link between two arrays: frames, key material, sessions and the remote `Replica`."""

from vscsi.link.replica import RemoteReplica
from vscsi.link.session import LinkDown, LinkError, LinkServer, LinkSession, RemoteError

__all__ = ["LinkDown", "LinkError", "LinkServer", "LinkSession", "RemoteError", "RemoteReplica"]
