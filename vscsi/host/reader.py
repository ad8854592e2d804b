"""Reading each candidate device's role for the follower: bounded, so a dead LUN costs one poll
a second at most and never stops it.

Per device and poll: one standard INQUIRY and page 0xC0, with a short SG_IO timeout, in a thread
of its own. A device that has not answered by the deadline counts as unreachable; while its
thread is still stuck in the kernel the device is not asked again, so threads never pile up.
"""

from __future__ import annotations

import glob
import os
import stat
import threading
import time
from collections.abc import Sequence

from construct import ConstructError

from vscsi.host import sgio
from vscsi.host.follow import Reading
from vscsi.host.inq import STD_INQUIRY_LEN
from vscsi.pair.states import Role
from vscsi.pair.vpd import FLAG_FENCED, FORMAT_VERSION, PAGE_CODE, parse_page
from vscsi.scsi.sense import ILLEGAL_REQUEST

GRACE = 0.5  # seconds past the SG_IO timeout before a thread's device counts as hung
DISK = 0x00  # peripheral qualifier 0 (connected), device type 0 (direct access)


def candidates(patterns: Sequence[str]) -> list[str]:
    """Whole-disk block devices matching `patterns`, each once: a partition answers INQUIRY
    for its disk, and the filesystem is on the disk."""
    out: dict[str, str] = {}
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)):
            try:
                st = os.stat(path)
            except OSError:
                continue
            if not stat.S_ISBLK(st.st_mode) or _is_partition(st.st_rdev):
                continue
            out.setdefault(os.path.realpath(path), path)
    return sorted(out.values())


def _is_partition(rdev: int) -> bool:
    return os.path.exists(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/partition")


def read_device(path: str, timeout_ms: int) -> Reading:
    """One device's identity and HORC role; every failure is an unreachable reading."""
    try:
        rdev = os.stat(path).st_rdev
        with sgio.device(path) as fd:
            return _read(fd, path, rdev, timeout_ms)
    except OSError as e:
        return Reading(path, error=f"cannot stat: {e.strerror}")
    except sgio.SgIoError as e:
        return Reading(path, error=str(e))


def _read(fd: int, path: str, rdev: int, timeout_ms: int) -> Reading:
    std = sgio.inquiry(fd, alloc=STD_INQUIRY_LEN, timeout_ms=timeout_ms)
    if not std or std[0] != DISK:
        return Reading(path, rdev)
    try:
        data = sgio.inquiry(fd, PAGE_CODE, timeout_ms=timeout_ms)
    except sgio.CheckCondition as e:
        if e.sense is not None and e.sense.key == ILLEGAL_REQUEST:
            return Reading(path, rdev)  # no page 0xC0: not a vscsi volume
        raise
    if len(data) < 5 or data[4] != FORMAT_VERSION:
        return Reading(path, rdev)
    try:
        body = parse_page(data).body
    except ConstructError:
        return Reading(path, rdev)
    horc = body.slots[0]
    partner = (horc.partner_serial, horc.partner_volume_id) if horc.partner_serial else None
    return Reading(
        path, rdev, (body.serial, body.volume_id), horc.role.value, horc.status.value, partner,
        si_svol=any(s.role is Role.SVOL for s in body.slots[1:]),
        fenced=bool(horc.flags & FLAG_FENCED),
    )  # fmt: skip


class SgReader:
    """Reads devices in parallel threads, each bounded by `timeout` seconds."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._stuck: dict[str, threading.Thread] = {}

    def read(self, paths: Sequence[str]) -> list[Reading]:
        boxes: dict[str, list[Reading]] = {}
        threads: dict[str, threading.Thread] = {}
        ms = max(1, int(self.timeout * 1000))
        for path in paths:
            if path in self._stuck and self._stuck[path].is_alive():
                continue
            self._stuck.pop(path, None)
            box = boxes[path] = []
            threads[path] = threading.Thread(
                target=lambda p=path, b=box: b.append(read_device(p, ms)),
                name=f"inquiry {path}", daemon=True,
            )  # fmt: skip
            threads[path].start()
        deadline = time.monotonic() + self.timeout + GRACE
        for path, thread in threads.items():
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                self._stuck[path] = thread
        return [self._result(p, boxes.get(p)) for p in paths]

    def _result(self, path: str, box: list[Reading] | None) -> Reading:
        if box:
            return box[0]
        if box is None:
            return Reading(path, error="an earlier INQUIRY has not returned (device hung)")
        return Reading(path, error=f"no answer within {self.timeout:g} s")
