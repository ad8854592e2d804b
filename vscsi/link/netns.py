"""Putting a link's sockets in a named network namespace (`[daemon] link_netns`).

The daemon itself stays in the initial namespace: TCMU's generic netlink family exists only
there, so its LUNs could not be served from another one. Only the threads that own link sockets
enter the namespace (setns(2) changes the calling thread), so the replication link can run on
its own network, as an array's remote-copy ports do.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

RUN_NETNS = Path("/run/netns")  # where `ip netns add` names namespaces
CLONE_NEWNET = 0x40000000  # setns(2) refuses an fd that is not a network namespace's


def path_of(name: str) -> Path:
    """The bind mount `ip netns add NAME` made; a name, never a path the user did not give."""
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"{name!r} is not a namespace name (as `ip netns list` shows them)")
    return RUN_NETNS / name


def enter(name: str) -> None:
    """Move the calling thread into namespace `name`; OSError when it does not exist.

    setns(2) through libc (os.setns is Python 3.12's). pyroute2.netns would make the same call,
    but importing it imports all of pyroute2: 3.8 s of the link's start in the emulated VM."""
    path = path_of(name)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)
