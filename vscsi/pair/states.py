"""The pair state machine (Hitachi ShadowImage model): roles, statuses, events, host access.

Every status change goes through `next_status`, so the transition table below is the whole
truth about which operation applies where; anything else is refused with a one-line reason.
"""

from __future__ import annotations

from enum import Enum


class PairError(Exception):
    """An operation that does not apply: a one-line reason. `exit_status` is the CCI code the
    CLI exits with (research brief §2.3 lists the codes; which refusal gets which is our
    choice, docs/pairs.md): this base class is a rejected command (EX_CMDRJE)."""

    exit_status = 221  # EX_CMDRJE


class NoSuchPair(PairError):
    """A pair, volume or remote array the daemon does not know."""

    exit_status = 247  # EX_ENOENT: no such device or group


class StatusRefused(PairError):
    """The pair's status does not allow the operation (the state tables say what would)."""

    exit_status = 228  # EX_INVSTP: invalid pair status


class VolumeRefused(PairError):
    """The volume cannot take that part: in another pair, too small, read only."""

    exit_status = 222  # EX_INVVOL: invalid volume status


class Role(Enum):
    """What a volume is in its pair: unpaired (simplex), primary or secondary mirror."""

    SMPL = "SMPL"
    PVOL = "P-VOL"
    SVOL = "S-VOL"


class Status(Enum):
    """Pair status as CCI pairdisplay prints it (local and remote pairs share the words)."""

    SMPL = "SMPL"  # not paired
    COPY = "COPY"  # initial or resync copy running (progress %)
    PAIR = "PAIR"  # identical; every write mirrored before it is acknowledged
    PSUS = "PSUS"  # split by the operator: S-VOL is a point-in-time copy; both sides track
    PSUE = "PSUE"  # suspended by an error on the S-VOL side; P-VOL runs on and tracks changes
    RCPY = "RCPY"  # reverse copy (restore S-VOL -> P-VOL) running
    # remote (TrueCopy) pairs only, see vscsi/remote/states.py:
    SSUS = "SSUS"  # S side of an operator split
    SSWS = "SSWS"  # S side taken over: read/write, to be swapped by resync --swaps


class Event(Enum):
    """What moves a pair: operator commands, copy completion and S-VOL errors."""

    CREATE = "create"
    COPY_DONE = "copy done"
    SPLIT = "split"
    RESYNC = "resync"
    RESTORE = "restore"
    RESTORE_DONE = "restore done"
    SECONDARY_ERROR = "secondary error"
    RECOVER = "recover"  # a PAIR's P and S may differ (crash, failed P-VOL write): copy again
    DELETE = "delete"


class Access(Enum):
    """What the host may do with a volume."""

    READ_WRITE = "read/write"
    READ_ONLY = "read only"  # writes -> WRITE PROTECTED (07/27/00)
    NO_WRITES = "no writes"  # writes -> NOT READY (02/04/07), reads served
    NO_ACCESS = "no access"  # everything -> NOT READY (02/04/03)


S = Status
E = Event
LOCAL = frozenset({S.SMPL, S.COPY, S.PAIR, S.PSUS, S.PSUE, S.RCPY})  # a local pair's statuses

# (status, event) -> next status. Read it as the state table of docs/pairs.md.
TRANSITIONS: dict[tuple[Status, Event], Status] = {
    (S.SMPL, E.CREATE): S.COPY,
    (S.COPY, E.COPY_DONE): S.PAIR,
    (S.COPY, E.SECONDARY_ERROR): S.PSUE,
    (S.COPY, E.DELETE): S.SMPL,
    (S.PAIR, E.SPLIT): S.PSUS,
    (S.PAIR, E.SECONDARY_ERROR): S.PSUE,
    (S.PAIR, E.RECOVER): S.COPY,
    (S.PAIR, E.DELETE): S.SMPL,
    (S.PSUS, E.RESYNC): S.COPY,
    (S.PSUS, E.RESTORE): S.RCPY,
    (S.PSUS, E.DELETE): S.SMPL,
    (S.PSUE, E.RESYNC): S.COPY,
    (S.PSUE, E.DELETE): S.SMPL,
    (S.RCPY, E.RESTORE_DONE): S.PSUS,
    (S.RCPY, E.SECONDARY_ERROR): S.PSUE,
    (S.RCPY, E.DELETE): S.SMPL,
}

# Which statuses each operator command needs, for the refusal message.
_NEEDS: dict[Event, str] = {
    E.CREATE: "both volumes simplex",
    E.SPLIT: "PAIR",
    E.RESYNC: "PSUS or PSUE",
    E.RESTORE: "PSUS",
    E.DELETE: "a pair",
    E.COPY_DONE: "COPY",
    E.RESTORE_DONE: "RCPY",
    E.SECONDARY_ERROR: "COPY, PAIR or RCPY",
    E.RECOVER: "PAIR",
}


def next_status(name: str, status: Status, event: Event) -> Status:
    """The status after `event`, or PairError saying which status the event needs."""
    try:
        return TRANSITIONS[(status, event)]
    except KeyError:
        raise StatusRefused(
            f"cannot {event.value} pair {name!r}: it is {status.value}, {event.value} needs "
            f"{_NEEDS[event]}"
        ) from None


def access(role: Role, status: Status, split_read_only: bool = False) -> Access:
    """Host access to a volume with `role` in a pair with `status` (the seed's table)."""
    if role is Role.PVOL:
        return Access.NO_WRITES if status is S.RCPY else Access.READ_WRITE
    if role is Role.SVOL:
        if status is S.PSUE:
            return Access.NO_ACCESS
        if status is S.PSUS and not split_read_only:
            return Access.READ_WRITE
        return Access.READ_ONLY
    return Access.READ_WRITE


def copying(status: Status) -> bool:
    """Statuses in which a background copier runs."""
    return status in (S.COPY, S.RCPY)
