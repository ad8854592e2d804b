"""The TCM-USER netlink listener answers its own devices' events, and only those: the kernel
takes the first reply to an event as the answer, and several vscsi daemons (two arrays on one
host) all hear every event of subtype vscsi."""

from __future__ import annotations

from typing import Any

import pytest
from construct import Container
from pyroute2.netlink import ctrlmsg, genlmsg
from pyroute2.netlink.generic import GenericNetlinkSocket

from vscsi.tcmu import netlink
from vscsi.tcmu.netlink import CMD_ADDED_DEVICE, CMD_RECONFIG_DEVICE, NetlinkListener

FAMILY_ID = 0x1D


class PyrouteTcmuMsg(genlmsg):
    """The same message declared with pyroute2, the reference our declaration is checked against."""

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


def pyroute_encoded(cmd: int, attrs: list[tuple[str, object]]) -> bytes:
    msg = PyrouteTcmuMsg()
    msg["cmd"] = cmd
    msg["version"] = netlink.VERSION
    msg["attrs"] = attrs
    msg["header"]["type"] = FAMILY_ID
    msg.encode()
    return bytes(msg.data)


def received(data: bytes) -> Container:
    """What the listener's thread makes of one datagram from the kernel."""
    (msg,) = netlink.Messages.parse(data)
    assert msg.type == FAMILY_ID
    return netlink.TcmuPayload.parse(msg.payload)


def event(cmd: int, volume: str, dev_id: int = 7, subtype: str = "vscsi") -> Container:
    return received(pyroute_encoded(cmd, [
        ("TCMU_ATTR_DEVICE", f"tcm-user/1/vscsi-{volume}/{subtype}/{volume}"),
        ("TCMU_ATTR_DEVICE_ID", dev_id), ("TCMU_ATTR_MINOR", 0)]))  # fmt: skip


def test_an_event_decodes_as_pyroute2_encodes_it() -> None:
    cfg = "vscsi/vol0"
    data = pyroute_encoded(CMD_RECONFIG_DEVICE, [
        ("TCMU_ATTR_DEVICE", "tcm-user/3/vscsi-vol0/vscsi/vol0"), ("TCMU_ATTR_MINOR", 3),
        ("TCMU_ATTR_DEV_CFG", cfg), ("TCMU_ATTR_DEV_SIZE", 1 << 40), ("TCMU_ATTR_WRITECACHE", 1),
        ("TCMU_ATTR_DEVICE_ID", 0xFFFF_FFF0)])  # fmt: skip
    payload = received(data)
    assert payload.cmd == CMD_RECONFIG_DEVICE and payload.version == netlink.VERSION
    assert netlink.attrs_of(payload.attrs) == {
        netlink.ATTR_DEVICE: "tcm-user/3/vscsi-vol0/vscsi/vol0", netlink.ATTR_MINOR: 3,
        netlink.ATTR_DEV_CFG: cfg, netlink.ATTR_DEV_SIZE: 1 << 40, netlink.ATTR_WRITECACHE: 1,
        netlink.ATTR_DEVICE_ID: 0xFFFF_FFF0}  # fmt: skip


def test_a_reply_is_what_pyroute2_would_send() -> None:
    status = [(netlink.ATTR_CMD_STATUS, -2), (netlink.ATTR_DEVICE_ID, 9)]
    ours = netlink.encode(FAMILY_ID, netlink.CMD_ADDED_DEVICE_DONE, status, seq=5)
    theirs = PyrouteTcmuMsg(ours)
    theirs.decode()
    assert theirs["header"]["length"] == len(ours) and theirs["header"]["sequence_number"] == 5
    assert theirs["header"]["flags"] == netlink.NLM_F_REQUEST | netlink.NLM_F_ACK
    assert theirs["cmd"] == netlink.CMD_ADDED_DEVICE_DONE
    assert theirs.get_attr("TCMU_ATTR_CMD_STATUS") == -2
    assert theirs.get_attr("TCMU_ATTR_DEVICE_ID") == 9


def test_the_controller_answers_as_it_answers_pyroute2() -> None:
    """Asked of this machine's kernel: the controller's own family (always there) and its
    `notify` group; a missing family is a clear error."""
    gen = GenericNetlinkSocket()
    try:
        gen.bind("nlctrl", ctrlmsg)
        expected = (gen.prid, gen.mcast_groups["notify"])
    finally:
        gen.close()
    assert netlink.resolve_family("nlctrl", "notify") == expected
    with pytest.raises(netlink.NetlinkError, match="no 'config' group"):
        netlink.resolve_family("nlctrl", "config")
    with pytest.raises(netlink.NetlinkError, match="family NO-SUCH: No such file"):
        netlink.resolve_family("NO-SUCH")


@pytest.fixture
def listener(monkeypatch: pytest.MonkeyPatch) -> tuple[NetlinkListener, list[Any]]:
    """A listener serving volume "ra" (as daemon A's), its replies recorded, not sent."""
    mine = {"ra"}

    def added(name: str, minor: int, dev_id: int) -> int | None:
        return 0 if name.rsplit("/", 1)[-1] in mine else None

    lst = NetlinkListener(added, lambda *a: 0, lambda *a, **k: added(*a))
    replies: list[Any] = []
    monkeypatch.setattr(
        lst, "_reply", lambda cmd, dev_id, status: replies.append((cmd, dev_id, status))
    )
    yield lst, replies
    lst._sock.close()


@pytest.mark.parametrize("cmd", [CMD_ADDED_DEVICE, CMD_RECONFIG_DEVICE])
def test_another_vscsi_daemons_device_gets_no_reply_from_us(listener, cmd) -> None:  # type: ignore[no-untyped-def]
    lst, replies = listener
    lst._handle(event(cmd, "rb"))  # daemon B's volume: B answers it, we must not
    assert replies == []
    lst._handle(event(cmd, "ra", dev_id=9))
    assert replies == [(cmd, 9, 0)]


def test_another_handlers_subtype_is_ignored(listener) -> None:  # type: ignore[no-untyped-def]
    lst, replies = listener
    lst._handle(event(CMD_ADDED_DEVICE, "ra", subtype="qcow"))  # tcmu-runner's
    assert replies == []


def test_a_message_that_does_not_decode_is_skipped_and_the_next_one_answered(listener) -> None:  # type: ignore[no-untyped-def]
    """The listener's thread must outlive it: the kernel waits on the replies it gives."""
    lst, replies = listener
    lst.family_id = FAMILY_ID
    truncated = netlink.Message.build(
        {"type": FAMILY_ID, "flags": 0, "seq": 1, "pid": 0, "payload": b"\x01"}
    )
    device = ("TCMU_ATTR_DEVICE", "tcm-user/1/vscsi-ra/vscsi/ra")
    good = pyroute_encoded(CMD_ADDED_DEVICE, [device, ("TCMU_ATTR_DEVICE_ID", 4)])
    lst._datagram(truncated + good)
    assert replies == [(CMD_ADDED_DEVICE, 4, 0)]
