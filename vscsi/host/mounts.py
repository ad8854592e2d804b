"""mount, umount and fsck for the follower, and what the kernel has mounted where.

Each runs as the system's own tool with a deadline: an unmount on a dead LUN can hang in the
kernel, and the follower must report that and go on rather than wait with it.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Sequence

MOUNTINFO = "/proc/self/mountinfo"
TOOL_TIMEOUT = 60.0  # seconds for one mount, umount or fsck
FSCK_OK = (0, 1)  # clean, or errors corrected (fsck(8)); anything else: do not mount
_OCTAL = re.compile(r"\\([0-7]{3})")


class MountError(Exception):
    """A mount, unmount or check that failed: one line with the tool's own reason."""


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as \\ooo octal."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def mounted_at(mountpoint: str, mountinfo: str = MOUNTINFO) -> int | None:
    """The device number of what is mounted on `mountpoint` (the topmost mount), or None."""
    target = os.path.realpath(mountpoint)
    found = None
    with open(mountinfo) as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and _unescape(fields[4]) == target:
                major, minor = fields[2].split(":")
                found = os.makedev(int(major), int(minor))
    return found


def run_tool(argv: Sequence[str], timeout: float = TOOL_TIMEOUT) -> int:
    """Run `argv`; its exit status, or MountError when it cannot start or does not finish.
    A tool stuck in the kernel is killed and left to be reaped: never waited for."""
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
    except OSError as e:
        raise MountError(f"{argv[0]}: cannot run ({e.strerror})") from None
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise MountError(f"{argv[0]} did not finish within {timeout:g} s") from None
    if proc.returncode not in (FSCK_OK if argv[0] == "fsck" else (0,)):
        lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
        detail = lines[-1] if lines else "no message"
        raise MountError(f"{argv[0]} exited {proc.returncode}: {detail}")
    return proc.returncode


class SystemMounter:
    """The follower's mounter on a real host: mount(8), umount(8), fsck(8), mountinfo."""

    def __init__(self, timeout: float = TOOL_TIMEOUT, mountinfo: str = MOUNTINFO,
                 sysfs: str = "/sys") -> None:  # fmt: skip
        self.timeout = timeout
        self.mountinfo = mountinfo
        self.sysfs = sysfs

    def revalidate(self, device: str, read_only: bool = False) -> None:
        """Have sd re-read the disk (capacity, write protection) before mounting it: an S-VOL
        just taken over was write protected when the kernel last looked, and mount would
        silently fall back to a read-only mount. Still read-only after that: refuse."""
        block = f"{self.sysfs}/class/block/{os.path.basename(os.path.realpath(device))}"
        try:
            with open(f"{block}/device/rescan", "w") as f:
                f.write("1")
            with open(f"{block}/ro") as f:
                ro = f.read().strip() == "1"
        except OSError as e:
            raise MountError(f"{device}: cannot rescan it ({e.strerror})") from None
        if ro and not read_only:
            raise MountError(f"{device} is write protected (read-only to the kernel)")

    def current(self, mountpoint: str) -> int | None:
        return mounted_at(mountpoint, self.mountinfo)

    def mount(self, device: str, mountpoint: str, fstype: str | None, options: str) -> None:
        self.revalidate(device, read_only="ro" in options.split(","))
        argv = ["mount"]
        if fstype:
            argv += ["-t", fstype]
        if options:
            argv += ["-o", options]
        run_tool([*argv, device, mountpoint], self.timeout)

    def unmount(self, mountpoint: str) -> None:
        run_tool(["umount", mountpoint], self.timeout)

    def check(self, device: str, fstype: str | None) -> None:
        """`fsck -p`: repairs what is safe to repair; anything more stops the mount."""
        self.revalidate(device)  # fsck needs the disk writable too
        run_tool(["fsck", *(["-t", fstype] if fstype else []), "-p", device], self.timeout)
