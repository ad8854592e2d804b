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

from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST, NLMSG_ERROR, genlmsg
from pyroute2.netlink.generic import GenericNetlinkSocket

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


class TcmuMsg(genlmsg):
    """One TCM-USER message (include/uapi/linux/target_core_user.h, enum tcmu_genl_attr)."""

    nla_map = (
        ("TCMU_ATTR_UNSPEC", "none"),
        ("TCMU_ATTR_DEVICE", "asciiz"),
        ("TCMU_ATTR_MINOR", "uint32"),
        ("TCMU_ATTR_PAD", "none"),
        ("TCMU_ATTR_DEV_CFG", "asciiz"),
        ("TCMU_ATTR_DEV_SIZE", "uint64"),
        ("TCMU_ATTR_WRITECACHE", "uint8"),
        ("TCMU_ATTR_CMD_STATUS", "int32"),
        ("TCMU_ATTR_DEVICE_ID", "uint32"),
        ("TCMU_ATTR_SUPP_KERN_CMD_REPLY", "uint8"),
    )


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
        """Resolve the family with pyroute2, then listen on a plain blocking socket that only
        this thread reads (pyroute2's own socket reads through an asyncio loop)."""
        family, group = resolve_family()
        self.family_id = family
        self._sock.bind((0, 0))
        self._sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
        self._thread.start()
        self.set_reply_supported(True)

    def set_reply_supported(self, on: bool) -> None:
        msg = TcmuMsg()
        msg["cmd"] = CMD_SET_FEATURES
        msg["version"] = VERSION
        msg["attrs"] = [("TCMU_ATTR_SUPP_KERN_CMD_REPLY", int(on))]
        self._send(msg)

    def _send(self, msg: TcmuMsg) -> None:
        msg["header"]["type"] = self.family_id
        msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK
        msg["header"]["sequence_number"] = next(self._seq)
        msg["header"]["pid"] = os.getpid()
        msg.encode()
        self._sock.sendto(msg.data, (0, 0))

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
            for msg in split_messages(data):
                self._handle(msg)

    def _handle(self, msg: genlmsg) -> None:
        if msg["header"]["type"] == NLMSG_ERROR:
            return  # the ACKs of our own replies
        cmd = msg.get("cmd")
        if cmd not in self.callbacks:
            return
        name = msg.get_attr("TCMU_ATTR_DEVICE") or ""
        dev_id = msg.get_attr("TCMU_ATTR_DEVICE_ID") or 0
        minor = msg.get_attr("TCMU_ATTR_MINOR") or 0
        parts = name.split("/")
        if len(parts) < 4 or parts[3] != self.subtype:
            return  # another handler's device (tcmu-runner's): its reply is not ours to give
        changes = {}
        if cmd == CMD_RECONFIG_DEVICE:
            for attr, key in (
                ("TCMU_ATTR_DEV_CFG", "config"),
                ("TCMU_ATTR_DEV_SIZE", "size"),
                ("TCMU_ATTR_WRITECACHE", "write_cache"),
            ):
                value = msg.get_attr(attr)
                if value is not None:
                    changes[key] = value
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
        reply = TcmuMsg()
        reply["cmd"] = _DONE[cmd]
        reply["version"] = VERSION
        reply["attrs"] = [("TCMU_ATTR_CMD_STATUS", status), ("TCMU_ATTR_DEVICE_ID", dev_id)]
        try:
            self._send(reply)
        except Exception as e:
            log.warning("netlink reply %d for device %d: %s", _DONE[cmd], dev_id, e)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.set_reply_supported(False)
        self._stop.set()
        self._thread.join(5)
        with contextlib.suppress(Exception):
            self._sock.close()


def resolve_family() -> tuple[int, int]:
    """The TCM-USER family id and its `config` multicast group id."""
    gen = GenericNetlinkSocket()
    try:
        gen.bind(FAMILY, TcmuMsg)
        return gen.prid, gen.mcast_groups[GROUP]
    except Exception as e:
        raise NetlinkError(f"generic netlink family {FAMILY}: {e}") from None
    finally:
        gen.close()


def split_messages(data: bytes) -> list[TcmuMsg]:
    """Decode every netlink message in one datagram."""
    out = []
    pos = 0
    while pos + 16 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "little")
        if length < 16:
            break
        msg = TcmuMsg(data[pos : pos + length])
        msg.decode()
        out.append(msg)
        pos += (length + 3) & ~3
    return out
