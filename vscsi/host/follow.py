"""The storage server's follower: mount each filesystem on whichever side of its mirror is primary.

The seed's storage server "automatically starts accessing the new primary" once a failover is
initiated, unmounts while "I/O is impossible", and must never "see two different primary
volumes for the same data". `decide` is that rule as a pure function of one poll's readings;
`Follower` polls, applies the rule through a mounter, measures each changeover, and serves the
`status` and `remount` control commands. See docs/failover.md.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from vscsi.control import ControlError
from vscsi.host.hostconfig import FilesystemConfig, HostConfig, Ident, ident_text
from vscsi.host.mounts import MountError

log = logging.getLogger(__name__)

PRIMARY_STATUSES = ("COPY", "PAIR", "PSUS", "PSUE")  # a P-VOL the host may write (docs/remote.md)
REMOUNT_TIMEOUT = 20  # seconds; below the control client's 30 s, so the reason gets back
MOUNTED, UNMOUNTED, CHANGEOVER, REFUSED = "mounted", "unmounted", "changeover", "refused"


@dataclass(frozen=True)
class Reading:
    """One candidate device as one poll saw it. `ident` None: not a vscsi volume (or never
    read); `error` set: unreachable now, claiming nothing (`ident` is then the last one known)."""

    device: str
    rdev: int = 0
    ident: Ident | None = None
    role: str = "SMPL"
    status: str = "SMPL"
    partner: Ident | None = None
    si_svol: bool = False  # the S-VOL of a ShadowImage pair: a copy, never the primary
    error: str | None = None
    fenced: bool = False  # a P-VOL its array keeps read only (fenced, or demoted: page flag)

    def describe(self) -> str:
        """`/dev/sdb (410011:0600 P-VOL PSUE)`, as the refusal names each claimant."""
        ident = ident_text(self.ident) if self.ident else "unidentified"
        if self.error:
            return f"{self.device} ({ident} unreachable: {self.error})"
        fenced = " fenced" if self.fenced else ""
        return f"{self.device} ({ident} {self.role} {self.status}{fenced})"


@dataclass(frozen=True)
class Mounted:
    """What the kernel has at a filesystem's mountpoint: `device` None when it is nothing this
    follower can name; `ours` when this follower mounted it (even if unreachable now)."""

    device: str | None
    rdev: int
    ours: bool = False


@dataclass(frozen=True)
class Plan:
    """What one poll decided for one filesystem: unmount first, then mount `mount` if set."""

    state: str
    reason: str
    claims: tuple[Reading, ...] = ()
    unmount: bool = False
    mount: str | None = None


def is_primary(r: Reading, volume: Ident) -> bool:
    """The host may write it: a P-VOL in COPY/PAIR/PSUS/PSUE that its array does not fence (an
    old primary whose peer took over is fenced: demoted, not a second primary), an S-VOL taken
    over (SSWS), or the configured volume itself while unmirrored (SMPL)."""
    if r.error is not None or r.ident is None or r.si_svol:
        return False
    if r.role == "P-VOL":
        return r.status in PRIMARY_STATUSES and not r.fenced
    if r.role == "S-VOL":
        return r.status == "SSWS"
    return r.role == "SMPL" and r.ident == volume


def members(volume: Ident, readings: Sequence[Reading]) -> list[Reading]:
    """The devices of `volume`'s mirror: itself, its HORC partner, and whatever names it as
    partner (so the S-VOL is still found when the P-VOL's array is gone)."""
    partners = {r.partner for r in readings if r.ident == volume and r.partner}
    related = {volume, *partners}
    return sorted(
        (r for r in readings if r.ident in related or (r.ident and r.partner == volume)),
        key=lambda r: r.device,
    )


def decide(
    name: str, volume: Ident, readings: Sequence[Reading], mounted: Mounted | None,
    changeover: bool = False,
) -> Plan:  # fmt: skip
    """The primary rule for one filesystem. `changeover`: an unmount already began one."""
    claims = tuple(members(volume, readings))
    devices = {r.device for r in claims}
    if mounted is not None and not mounted.ours and mounted.device not in devices:
        what = mounted.device or f"device {os.major(mounted.rdev)}:{os.minor(mounted.rdev)}"
        reason = f"the mountpoint of {name} holds {what}, not a volume of {name}: not touching it"
        return Plan(REFUSED, reason, claims)
    primaries: dict[Ident, Reading] = {}
    for r in claims:
        if is_primary(r, volume) and r.ident is not None:
            primaries.setdefault(r.ident, r)  # several paths to one volume are one claim
    if len(primaries) == 1:
        return _one_primary(name, claims, next(iter(primaries.values())), mounted)
    unmount = mounted is not None
    if primaries:
        count = "two" if len(primaries) == 2 else str(len(primaries))
        listed = " and ".join(r.describe() for r in primaries.values())
        reason = f"{count} primaries for {name}: {listed}: not mounting"
        return Plan(REFUSED, reason, claims, unmount)
    if unmount or changeover:
        reason = f"changeover: no primary for {name}; I/O impossible"
        return Plan(CHANGEOVER, reason, claims, unmount)
    seen = ", ".join(r.describe() for r in claims)
    reason = (
        f"no primary for {name} ({seen})"
        if seen
        else (f"no device of {name} ({ident_text(volume)}) seen")
    )
    return Plan(UNMOUNTED, reason, claims)


def _one_primary(name: str, claims: tuple[Reading, ...], primary: Reading,
                 mounted: Mounted | None) -> Plan:  # fmt: skip
    """Keep a mount on the primary (by any path to it); otherwise (re)mount onto it."""
    desc = primary.describe()
    if mounted is not None:
        same = {r.device for r in claims if r.ident == primary.ident and r.error is None}
        if mounted.device in same:
            return Plan(MOUNTED, f"{mounted.device} is the only primary of {name}", claims)
        reason = f"changeover: the primary of {name} is now {desc}; unmounting {mounted.device}"
        return Plan(MOUNTED, reason, claims, unmount=True, mount=primary.device)
    return Plan(MOUNTED, f"{desc} is the only primary of {name}", claims, mount=primary.device)


class DeviceReader(Protocol):
    def read(self, paths: Sequence[str]) -> list[Reading]: ...


class Mounter(Protocol):
    def current(self, mountpoint: str) -> int | None: ...
    def mount(self, device: str, mountpoint: str, fstype: str | None, options: str) -> None: ...
    def unmount(self, mountpoint: str) -> None: ...
    def check(self, device: str, fstype: str | None) -> None: ...


@dataclass
class FsState:
    """One filesystem as the follower runs it."""

    config: FilesystemConfig
    state: str = UNMOUNTED
    reason: str = "not polled yet"
    claims: tuple[Reading, ...] = ()
    device: str | None = None  # what this follower mounted, and its device number
    rdev: int | None = None
    changeover_since: float | None = None  # when the unmount that began a changeover ended
    last_changeover: float | None = None  # seconds, unmount to mount, of the last one
    held: bool = False  # unmounted by the `unmount` command: left alone until `remount`
    since: float = field(default_factory=time.time)  # wall time of the last change of state

    def snapshot(self) -> dict[str, Any]:
        c = self.config
        return {
            "name": c.name, "volume": ident_text(c.volume), "mountpoint": c.mountpoint,
            "state": self.state, "device": self.device, "reason": self.reason,
            "claims": [_claim(r, c.volume) for r in self.claims],
            "last_changeover_seconds": self.last_changeover, "since": self.since,
        }  # fmt: skip


def _claim(r: Reading, volume: Ident) -> dict[str, Any]:
    return {
        "device": r.device, "volume": ident_text(r.ident) if r.ident else None,
        "role": r.role, "status": r.status, "primary": is_primary(r, volume), "error": r.error,
    }  # fmt: skip


class Follower:
    """Polls the devices, follows each filesystem's primary, serves `status`, `unmount` and
    `remount`.
    One lock orders polls and remounts; `status` reads snapshots and never waits for them."""

    def __init__(
        self, config: HostConfig, reader: DeviceReader, mounter: Mounter,
        candidates: Callable[[], list[str]], clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self.config = config
        self.reader = reader
        self.mounter = mounter
        self.candidates = candidates
        self.clock = clock
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._fs = {c.name: FsState(c) for c in config.filesystems}
        self._known: dict[str, Reading] = {}  # each device's last good reading
        self._snapshots = {name: fs.snapshot() for name, fs in self._fs.items()}

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> None:
        """Poll every `poll` seconds until `stop` is set; nothing is unmounted on the way out."""
        while not self.stop.is_set():
            self.step()
            self.stop.wait(self.config.poll)

    def step(self) -> None:
        """One poll: read every candidate once, then decide and act for each filesystem."""
        with self._lock:
            readings = self.read()
            for fs in self._fs.values():
                mounted = self._mounted(fs, readings)
                plan = decide(fs.config.name, fs.config.volume, readings, mounted,
                              fs.changeover_since is not None)  # fmt: skip
                if fs.held:  # the agent unmounted it for a change: show, do not act
                    self._set(fs, CHANGEOVER, self._held_reason(fs), plan.claims)
                else:
                    self._apply(fs, plan, mounted)

    def preview(self) -> tuple[list[Reading], dict[str, Plan]]:
        """One poll's readings and what each filesystem would get, without acting (`scan`)."""
        with self._lock:
            readings = self.read()
            plans = {
                name: decide(fs.config.name, fs.config.volume, readings,
                             self._mounted(fs, readings))
                for name, fs in self._fs.items()
            }  # fmt: skip
        return readings, plans

    def read(self) -> list[Reading]:
        """One reading per candidate; an unreachable device keeps its last known identity, so
        it is still shown among its filesystem's claims (claiming nothing)."""
        out = []
        for r in self.reader.read(self.candidates()):
            if r.error is None and r.ident is not None:
                self._known[r.device] = r
            elif r.error is not None and r.device in self._known:
                r = replace(self._known[r.device], error=r.error)
            out.append(r)
        return out

    def _mounted(self, fs: FsState, readings: Sequence[Reading]) -> Mounted | None:
        """The kernel's mount table is the truth (an operator may have unmounted by hand)."""
        rdev = self.mounter.current(fs.config.mountpoint)
        if rdev is None:
            fs.device = fs.rdev = None
            return None
        if rdev == fs.rdev and fs.device is not None:
            return Mounted(fs.device, rdev, ours=True)
        for r in readings:
            if r.rdev == rdev and r.ident is not None:
                return Mounted(r.device, rdev)
        return Mounted(None, rdev)

    def _apply(self, fs: FsState, plan: Plan, mounted: Mounted | None) -> None:
        if plan.unmount and not self._unmount(fs, plan):
            return
        if plan.mount is not None:
            self._mount(fs, plan)
            return
        if plan.state == MOUNTED and mounted is not None:  # kept; adopted if found mounted
            fs.device, fs.rdev = mounted.device, mounted.rdev
        self._set(fs, plan.state, plan.reason, plan.claims)

    def _unmount(self, fs: FsState, plan: Plan) -> bool:
        """Unmount; a failure leaves the filesystem mounted and nothing else is mounted."""
        device = fs.device or "the mounted filesystem"
        try:
            self.mounter.unmount(fs.config.mountpoint)
        except MountError as e:
            state = CHANGEOVER if plan.state == MOUNTED else plan.state
            self._set(fs, state, f"{plan.reason}; unmount of {device} failed: {e}", plan.claims)
            return False
        log.warning("%s: unmounted %s from %s: %s", fs.config.name, device,
                    fs.config.mountpoint, plan.reason)  # fmt: skip
        fs.device = fs.rdev = None
        if fs.changeover_since is None:
            fs.changeover_since = self.clock()
        return True

    def _mount(self, fs: FsState, plan: Plan) -> bool:
        """Mount the primary after a second look at it alone, so a role that changed since the
        poll is never mounted; a changeover in progress is timed to this mount."""
        assert plan.mount is not None
        c, waiting = fs.config, CHANGEOVER if fs.changeover_since is not None else UNMOUNTED
        again = self.reader.read([plan.mount])
        if len(again) != 1 or not is_primary(again[0], c.volume):
            now = again[0].describe() if again else plan.mount
            self._set(fs, waiting, f"{now} no longer claims primary on a second look; waiting",
                      plan.claims)  # fmt: skip
            return False
        try:
            if c.fsck:
                self.mounter.check(plan.mount, c.fstype)
            self.mounter.mount(plan.mount, c.mountpoint, c.fstype, c.options)
        except MountError as e:
            self._set(fs, waiting, f"{plan.reason}; mount of {plan.mount} failed: {e}", plan.claims)
            return False
        fs.device, fs.rdev = plan.mount, again[0].rdev
        reason = f"{plan.reason}; mounted on {c.mountpoint}"
        if fs.changeover_since is not None:
            fs.last_changeover = self.clock() - fs.changeover_since
            fs.changeover_since = None
            reason += f"; changeover took {fs.last_changeover:.3f} s"
        self._set(fs, MOUNTED, reason, plan.claims)
        return True

    def _set(self, fs: FsState, state: str, reason: str, claims: tuple[Reading, ...]) -> None:
        """Record a decision; a new state or reason is logged, a repeated one only at debug."""
        changed = (state, reason) != (fs.state, fs.reason)
        if state != fs.state:
            fs.since = time.time()
        fs.state, fs.reason, fs.claims = state, reason, claims
        level = logging.WARNING if changed and state != MOUNTED else logging.INFO
        log.log(level if changed else logging.DEBUG, "%s [%s] %s", fs.config.name, state, reason)
        self._snapshots[fs.config.name] = fs.snapshot()

    # -- control commands -------------------------------------------------------------------------

    def status(self, _args: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "config": self.config.source,
            "poll": self.config.poll,
            "filesystems": [self._snapshots[c.name] for c in self.config.filesystems],
        }

    def unmount(self, args: dict[str, Any]) -> dict[str, Any]:
        """What the agent calls before a planned role change ("users should unmount the file
        systems before the change"): unmount now and hold it unmounted, whatever the claims,
        until `remount`; the changeover is timed from here."""
        fs = self._lookup("unmount", args["name"])
        with self._lock:
            device = self._vacate(fs, "unmount")
            fs.held = True
            self._set(fs, CHANGEOVER, self._held_reason(fs), fs.claims)
            return {"name": fs.config.name, "device": device}

    def remount(self, args: dict[str, Any]) -> dict[str, Any]:
        """What the external agent calls after a takeover: unmount now, wait (at most `wait`
        seconds) for exactly one primary, mount it; the reason in a ControlError otherwise."""
        fs = self._lookup("remount", args["name"])
        timeout = args.get("wait", REMOUNT_TIMEOUT)
        if timeout < 0:
            raise ControlError(f"remount {fs.config.name}: wait must be 0 or more seconds, "
                               f"got {timeout}")  # fmt: skip
        with self._lock:
            return self._remount(fs, timeout)

    def _lookup(self, cmd: str, name: str) -> FsState:
        fs = self._fs.get(name)
        if fs is None:
            known = ", ".join(self._fs)
            raise ControlError(f"{cmd}: no filesystem {name!r} in {self.config.source} "
                               f"(known: {known})")  # fmt: skip
        return fs

    def _vacate(self, fs: FsState, cmd: str) -> str | None:
        """Unmount for `cmd` whatever the claims (never a foreign mount) and start timing the
        changeover; the device unmounted, if any."""
        c = fs.config
        readings = self.read()
        mounted = self._mounted(fs, readings)
        if mounted is None:
            if fs.changeover_since is None:
                fs.changeover_since = self.clock()
            return None
        plan = decide(c.name, c.volume, readings, mounted)
        if plan.state == REFUSED and not plan.unmount:
            raise ControlError(f"{cmd} {c.name}: {plan.reason}")
        device = fs.device or mounted.device
        if not self._unmount(fs, Plan(CHANGEOVER, f"{cmd} of {c.name} asked", plan.claims,
                                      unmount=True)):  # fmt: skip
            raise ControlError(f"{cmd} {c.name}: {fs.reason}")
        return device

    @staticmethod
    def _held_reason(fs: FsState) -> str:
        return (f"unmounted for a changeover (held until 'vscsi host remount "
                f"{fs.config.name}')")  # fmt: skip

    def _remount(self, fs: FsState, timeout: float) -> dict[str, Any]:
        c = fs.config
        self._vacate(fs, "remount")
        fs.held = False
        deadline = time.monotonic() + timeout
        while True:
            readings = self.read()
            plan = decide(c.name, c.volume, readings, None, changeover=True)
            if plan.mount is not None and self._mount(fs, plan):
                return {"name": c.name, "device": fs.device,
                        "changeover_seconds": fs.last_changeover}  # fmt: skip
            if plan.mount is None:
                self._set(fs, plan.state, plan.reason, plan.claims)
            if time.monotonic() >= deadline or self.stop.wait(min(self.config.poll, 0.5)):
                raise ControlError(f"remount {c.name}: {fs.reason} (waited {timeout:g} s)")

    def unmount_all(self) -> None:
        """`run --unmount-on-exit`: leave nothing of ours mounted."""
        with self._lock:
            for fs in self._fs.values():
                if fs.device is not None and self.mounter.current(fs.config.mountpoint) == fs.rdev:
                    self._unmount(fs, Plan(UNMOUNTED, "exiting", fs.claims))
                    self._set(fs, UNMOUNTED, "exiting", fs.claims)
