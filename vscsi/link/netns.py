"""Putting a link's sockets in a named network namespace (`[daemon] link_netns`).

The daemon itself stays in the initial namespace: TCMU's generic netlink family exists only
there, so its LUNs could not be served from another one. Only the threads that own link sockets
enter the namespace (setns(2) changes the calling thread), so the replication link can run on
its own network, as an array's remote-copy ports do.
"""

from __future__ import annotations

import os
from pathlib import Path

RUN_NETNS = Path("/run/netns")  # where `ip netns add` names namespaces


def path_of(name: str) -> Path:
    """The bind mount `ip netns add NAME` made; a name, never a path the user did not give."""
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"{name!r} is not a namespace name (as `ip netns list` shows them)")
    return RUN_NETNS / name


def enter(name: str) -> None:
    """Move the calling thread into namespace `name`; OSError when it does not exist."""
    from pyroute2 import netns  # only in the link's threads: the CLI does not pay for it

    fd = os.open(path_of(name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        netns.setns(fd, flags=0)  # an fd: pyroute2 neither creates nor looks up anything
    finally:
        os.close(fd)
