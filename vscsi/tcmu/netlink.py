"""The kernel's TCM-USER generic netlink family: device added / removed / reconfigured.

When the kernel waits for our reply (target_core_user.c, Linux 6.1): `SET_FEATURES` with
`SUPP_KERN_CMD_REPLY=1` sets one module-wide flag, `tcmu_kern_cmd_reply_supported`. A device
copies it into its own `nl_reply_supported` when it is enabled (unless its control string said
`nl_reply_supported=-1`). For such a device every ADDED / REMOVED / RECONFIG event is followed
by `wait_for_completion()` — uninterruptible, no timeout — until a *_DONE reply carrying its
DEVICE_ID arrives; the configfs write (enable, rmdir, dev_config, dev_size) blocks meanwhile and
fails with the CMD_STATUS we send. REMOVED and RECONFIG do not wait when nobody is subscribed
to the `config` group (-ESRCH); ADDED waits even then ("the listener may not be up yet").

So a dead daemon can hang configfs: the flag outlives us. And the kernel takes the first reply
as the answer, whoever sends it: tcmu-runner (libtcmu) answers -ENOENT for a subtype it has no
handler for, which failed a vscsi backstore's enable whenever its reply came first (seen in the
VM, tests/integration/test_coexist.py). A vscsi backstore therefore says
`nl_reply_supported=-1` when it is created (and a re-attached one is told so through its
attribute), and the kernel waits for no reply about it; the daemon's callbacks answer only a
backstore the kernel still waits on. We still subscribe before touching configfs, never answer
another handler's devices, and send `SUPP_KERN_CMD_REPLY=0` on a clean stop. After a SIGKILL
the flag stays on until the next `vscsi up` subscribes; a stuck waiter is released by writing 1 to
/sys/module/target_core_user/parameters/reset_netlink (it fails pending events with -EINTR),
and block_netlink=1 there fails new events at once.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import select
import socket
import threading
from collections.abc import Callable
from typing import Any

from construct import (
    Aligned,
    Construct,
    ConstructError,
    Container,
    CString,
    GreedyBytes,
    GreedyRange,
    Int8ul,
    Int16ul,
    Int32sl,
    Int32ul,
    Int64ul,
    Padding,
    Prefixed,
    Struct,
    Switch,
    this,
)

log = logging.getLogger(__name__)

NETLINK_GENERIC = 16
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
FAMILY = "TCM-USER"
GROUP = "config"
VERSION = 2

CMD_ADDED_DEVICE = 1
CMD_REMOVED_DEVICE = 2
CMD_RECONFIG_DEVICE = 3
CMD_ADDED_DEVICE_DONE = 4
CMD_REMOVED_DEVICE_DONE = 5
CMD_RECONFIG_DEVICE_DONE = 6
CMD_SET_FEATURES = 7
_DONE = {
    CMD_ADDED_DEVICE: CMD_ADDED_DEVICE_DONE,
    CMD_REMOVED_DEVICE: CMD_REMOVED_DEVICE_DONE,
    CMD_RECONFIG_DEVICE: CMD_RECONFIG_DEVICE_DONE,
}

# enum tcmu_genl_attr (include/uapi/linux/target_core_user.h)
ATTR_DEVICE = 1
ATTR_MINOR = 2
ATTR_DEV_CFG = 4
ATTR_DEV_SIZE = 5
ATTR_WRITECACHE = 6
ATTR_CMD_STATUS = 7
ATTR_DEVICE_ID = 8
ATTR_SUPP_KERN_CMD_REPLY = 9

# The generic netlink controller (include/uapi/linux/genetlink.h) and netlink framing
# (include/uapi/linux/netlink.h).
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
CTRL_ATTR_MCAST_GROUPS = 7
CTRL_ATTR_MCAST_GRP_NAME = 1
CTRL_ATTR_MCAST_GRP_ID = 2


# -- the wire, declared once ---------------------------------------------------------------------
# pyroute2 would give the same framing, but `import pyroute2.netlink` runs the package's
# __init__, which imports the whole library (IPDB, NDB with sqlite, nftables, plan9, asyncio):
# some 220 more modules and 10 MB more memory in the daemon, 0.35 s of its start on a host and
# 3.8 s in the emulated VM, for one controller query and ten attributes. The unit tests check
# these declarations against pyroute2's.


def attributes(values: dict[int, Construct], default: Construct = GreedyBytes) -> Construct:
    """A run of `struct nlattr`: length (header included, padding not), type, value, padded to
    4 bytes; a value of a type not in `values` stays bytes."""
    nlattr = Struct("type" / Int16ul, "value" / Switch(this.type & NLA_TYPE_MASK, values, default))
    return GreedyRange(Aligned(4, Prefixed(Int16ul, nlattr, includelength=True)))


def genl(values: dict[int, Construct]) -> Construct:
    """A generic netlink payload: `struct genlmsghdr`, then attributes."""
    return Struct("cmd" / Int8ul, "version" / Int8ul, Padding(2), "attrs" / attributes(values))


# struct nlmsghdr; `length` counts the header
Message = Aligned(
    4,
    Prefixed(
        Int32ul,
        Struct(
            "type" / Int16ul,
            "flags" / Int16ul,
            "seq" / Int32ul,
            "pid" / Int32ul,
            "payload" / GreedyBytes,
        ),
        includelength=True,
    ),
)
Messages = GreedyRange(Message)
Error = Struct("error" / Int32sl, "request" / GreedyBytes)  # struct nlmsgerr

TcmuPayload = genl(
    {
        ATTR_DEVICE: CString("utf8"),
        ATTR_MINOR: Int32ul,
        ATTR_DEV_CFG: CString("utf8"),
        ATTR_DEV_SIZE: Int64ul,
        ATTR_WRITECACHE: Int8ul,
        ATTR_CMD_STATUS: Int32sl,
        ATTR_DEVICE_ID: Int32ul,
        ATTR_SUPP_KERN_CMD_REPLY: Int8ul,
    }
)
McastGroup = attributes(
    {CTRL_ATTR_MCAST_GRP_NAME: CString("utf8"), CTRL_ATTR_MCAST_GRP_ID: Int32ul}
)
CtrlPayload = genl(
    {
        CTRL_ATTR_FAMILY_ID: Int16ul,
        CTRL_ATTR_FAMILY_NAME: CString("utf8"),
        CTRL_ATTR_MCAST_GROUPS: attributes({}, default=McastGroup),
    }
)


def encode(
    family: int,
    cmd: int,
    attrs: list[tuple[int, Any]],
    *,
    seq: int = 0,
    flags: int = NLM_F_REQUEST | NLM_F_ACK,
    version: int = VERSION,
    payload: Construct = TcmuPayload,
) -> bytes:
    body = payload.build(
        {"cmd": cmd, "version": version, "attrs": [{"type": t, "value": v} for t, v in attrs]}
    )
    return Message.build(
        {"type": family, "flags": flags, "seq": seq, "pid": os.getpid(), "payload": body}
    )


def attrs_of(run: list[Container]) -> dict[int, Any]:
    """A run of decoded attributes by type."""
    return {a.type & NLA_TYPE_MASK: a.value for a in run}


Callback = Callable[..., int | None]  # the reply's status; None: not ours, no reply


class NetlinkError(Exception):
    """The TCM-USER family is not available (target_core_user not loaded?)."""


class NetlinkListener:
    """Receives TCM-USER events in a thread and answers those of subtype `vscsi` that a
    callback claims. Several vscsi daemons share the kernel's one multicast group, and the
    kernel takes the first reply to an event as the answer: a daemon answering another one's
    device (even with "not mine") would decide that device's fate, so it stays silent."""

    def __init__(
        self,
        on_added: Callback,
        on_removed: Callback,
        on_reconfig: Callback,
        subtype: str = "vscsi",
    ) -> None:
        self.callbacks = {
            CMD_ADDED_DEVICE: on_added,
            CMD_REMOVED_DEVICE: on_removed,
            CMD_RECONFIG_DEVICE: on_reconfig,
        }
        self.subtype = subtype
        self.events: list[tuple[int, str, int]] = []
        self._stop = threading.Event()
        self._seq = itertools.count(1)
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        self._thread = threading.Thread(target=self._loop, name="tcmu-netlink", daemon=True)
        self.family_id = 0

    def start(self) -> None:
        """Resolve the family, then listen on a blocking socket that only this thread reads."""
        family, group = resolve_family()
        self.family_id = family
        self._sock.bind((0, 0))
        self._sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
        self._thread.start()
        self.set_reply_supported(True)

    def set_reply_supported(self, on: bool) -> None:
        self._send(CMD_SET_FEATURES, [(ATTR_SUPP_KERN_CMD_REPLY, int(on))])

    def _send(self, cmd: int, attrs: list[tuple[int, Any]]) -> None:
        self._sock.sendto(encode(self.family_id, cmd, attrs, seq=next(self._seq)), (0, 0))

    def _loop(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._sock], [], [], 0.5)
            if not ready:
                continue
            try:
                data = self._sock.recv(65536)
            except OSError as e:
                if not self._stop.is_set():
                    log.warning("netlink: %s", e)
                return
            self._datagram(data)

    def _datagram(self, data: bytes) -> None:
        """Every event in one datagram. One that does not decode is logged and skipped: the
        kernel would wait forever on a reply this thread could no longer give."""
        for msg in Messages.parse(data):
            if msg.type != self.family_id:
                continue  # the ACKs (NLMSG_ERROR) of our own replies
            try:
                event = TcmuPayload.parse(msg.payload)
            except ConstructError as e:
                log.warning("netlink: a TCM-USER message that does not decode, ignored: %s", e)
                continue
            self._handle(event)

    def _handle(self, event: Container) -> None:
        cmd = event.cmd
        if cmd not in self.callbacks:
            return
        attrs = attrs_of(event.attrs)
        name = attrs.get(ATTR_DEVICE) or ""
        dev_id = attrs.get(ATTR_DEVICE_ID) or 0
        minor = attrs.get(ATTR_MINOR) or 0
        parts = name.split("/")
        if len(parts) < 4 or parts[3] != self.subtype:
            return  # another handler's device (tcmu-runner's): its reply is not ours to give
        changes = {}
        if cmd == CMD_RECONFIG_DEVICE:
            for attr, key in (
                (ATTR_DEV_CFG, "config"),
                (ATTR_DEV_SIZE, "size"),
                (ATTR_WRITECACHE, "write_cache"),
            ):
                if attr in attrs:
                    changes[key] = attrs[attr]
        try:
            status = self.callbacks[cmd](name, minor, dev_id, **changes)
        except Exception:
            log.exception("netlink event %d for %s", cmd, name)
            status = -5  # -EIO
        if status is None:
            return  # another vscsi daemon's device: its owner answers
        self.events.append((cmd, name, status))
        self._reply(cmd, dev_id, status)

    def _reply(self, cmd: int, dev_id: int, status: int) -> None:
        try:
            self._send(_DONE[cmd], [(ATTR_CMD_STATUS, status), (ATTR_DEVICE_ID, dev_id)])
        except Exception as e:
            log.warning("netlink reply %d for device %d: %s", _DONE[cmd], dev_id, e)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.set_reply_supported(False)
        self._stop.set()
        self._thread.join(5)
        with contextlib.suppress(Exception):
            self._sock.close()


def resolve_family(family: str = FAMILY, group: str = GROUP) -> tuple[int, int]:
    """A family's id and the id of one of its multicast groups, asked of the controller."""
    request = encode(
        GENL_ID_CTRL,
        CTRL_CMD_GETFAMILY,
        [(CTRL_ATTR_FAMILY_NAME, family)],
        flags=NLM_F_REQUEST,
        version=1,
        payload=CtrlPayload,
    )
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC) as sock:
        sock.settimeout(5)
        try:
            sock.bind((0, 0))
            sock.send(request)
            while True:
                for msg in Messages.parse(sock.recv(65536)):
                    if msg.type == NLMSG_ERROR:
                        error = os.strerror(-Error.parse(msg.payload).error)
                        raise NetlinkError(f"generic netlink family {family}: {error}")
                    if msg.type == GENL_ID_CTRL:
                        return family_and_group(CtrlPayload.parse(msg.payload), family, group)
        except OSError as e:
            raise NetlinkError(f"generic netlink family {family}: {e}") from None


def family_and_group(reply: Container, family: str, group: str) -> tuple[int, int]:
    attrs = attrs_of(reply.attrs)
    groups: dict[str, int] = {}
    for entry in attrs.get(CTRL_ATTR_MCAST_GROUPS, []):  # one nested run per group
        g = attrs_of(entry.value)
        groups[g.get(CTRL_ATTR_MCAST_GRP_NAME)] = g.get(CTRL_ATTR_MCAST_GRP_ID)
    if CTRL_ATTR_FAMILY_ID not in attrs or group not in groups:
        raise NetlinkError(f"generic netlink family {family} has no {group!r} group")
    return attrs[CTRL_ATTR_FAMILY_ID], groups[group]
