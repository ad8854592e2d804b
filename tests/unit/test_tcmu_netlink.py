"""The TCM-USER netlink listener answers its own devices' events, and only those: the kernel
takes the first reply to an event as the answer, and several vscsi daemons (two arrays on one
host) all hear every event of subtype vscsi."""

from __future__ import annotations

from typing import Any

import pytest

from vscsi.tcmu import netlink
from vscsi.tcmu.netlink import CMD_ADDED_DEVICE, CMD_RECONFIG_DEVICE, NetlinkListener, TcmuMsg


def event(cmd: int, volume: str, dev_id: int = 7, subtype: str = "vscsi") -> TcmuMsg:
    msg = TcmuMsg()
    msg["cmd"] = cmd
    msg["version"] = netlink.VERSION
    msg["attrs"] = [("TCMU_ATTR_DEVICE", f"tcm-user/1/vscsi-{volume}/{subtype}/{volume}"),
                    ("TCMU_ATTR_DEVICE_ID", dev_id), ("TCMU_ATTR_MINOR", 0)]  # fmt: skip
    msg.encode()
    (decoded,) = netlink.split_messages(bytes(msg.data))
    return decoded


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
