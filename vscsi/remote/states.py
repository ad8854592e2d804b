"""The TrueCopy pair state machine: a P-VOL on one array, its S-VOL on another.

Two rules, kept from h11's `_state.py`: everything that affects the state machine lives in
this file, and the file does not know which side it plays. Each array keeps a `PairState`
holding the status of *both* sides as it knows them, and applies the same events whether its
own operator issued them or the peer reported them over the link, so the P side and the S side
can never follow different rules. Which array is the P side is part of the state (`primary`,
an array serial): a swap moves it.

Statuses, as CCI prints them (research brief §2.2): SMPL, COPY, PAIR; PSUS (P side of a user
split) and SSUS (its S side); PSUE (suspended by an error: link, remote array, update copy);
SSWS (the S side after an S-VOL takeover or a forced split `-RS`: writable, the pair kept, to
be swapped by `resync --swaps`). The P side owns the pair status; the S side may be behind it
until the link tells it (a P side that suspended while the link was down still shows the S side
as PAIR: "substantially dubious", brief §3.1).

Fence levels decide what a P-VOL write does when its update copy cannot be made (`on_update
failure`); `takeover` is horctakeover's takeover-switch table (brief §3.2) with CCI's exit
codes; `Lineage` is the generation history that stops an old primary from coming back as a
second primary (DRBD's UUID history is the model).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, replace
from enum import Enum

from vscsi.pair.states import Access, PairError, Role, Status, StatusRefused
from vscsi.pair.states import Event as LocalEvent


class Fence(Enum):
    """What a P-VOL write does when its update copy cannot be made (brief §3.1)."""

    DATA = "data"  # the write fails; the P-VOL goes PSUE and read only
    STATUS = "status"  # the write succeeds if the S side could be marked PSUE, else it fails
    NEVER = "never"  # the write succeeds; the P-VOL goes PSUE and tracks changes


class Event(Enum):
    CREATE = "create"
    COPY_DONE = "copy done"
    SPLIT = "split"
    SPLIT_RS = "split -RS"  # issued on the S side: SSWS at once, whatever the P side says
    SUSPEND = "suspend"  # the P side could not make an update copy; the S side not told
    SUSPEND_BOTH = "suspend both"  # ... and the S side was told (and is PSUE too)
    RECOVER = "recover"  # a PAIR whose sides may differ (crash, failed P-VOL write): copy again
    RESYNC = "resync"
    SWAP_RESYNC = "resync --swaps"  # at the S side in SSWS/SSUS: roles swap, S -> old P copied
    SWAP_TAKEOVER = "swap-takeover"  # both sides healthy and PAIR: roles swap, nothing copied
    SVOL_TAKEOVER = "svol-takeover"  # the S side becomes writable (SSWS)
    PVOL_TAKEOVER = "pvol-takeover"  # a fenced P-VOL in PSUE accepts writes again
    DELETE = "delete"


S = Status
E = Event
ANY = frozenset(Status) - {S.SMPL}
LIVE = frozenset({S.COPY, S.PAIR})  # the P side mirrors every write


@dataclass(frozen=True, slots=True)
class Rule:
    """An event applies when the P side's status is in `p` and the S side's in `s`; the
    sides then take `to_p` / `to_s` (None: unchanged)."""

    p: frozenset[Status]
    s: frozenset[Status]
    to_p: Status | None
    to_s: Status | None
    needs: str  # for the refusal: which statuses the event needs


def _r(p: set[Status], s: set[Status], to_p: Status | None, to_s: Status | None,
       needs: str) -> Rule:  # fmt: skip
    return Rule(frozenset(p), frozenset(s), to_p, to_s, needs)


# The state table of docs/remote.md: event -> rule. Swaps also exchange the sides' roles.
RULES: dict[Event, Rule] = {
    E.CREATE: _r({S.SMPL}, {S.SMPL}, S.COPY, S.COPY, "both volumes SMPL"),
    # S PAIR: the copy of a recover (the S side is not told of it)
    E.COPY_DONE: _r({S.COPY}, {S.COPY, S.PAIR}, S.PAIR, S.PAIR, "COPY"),
    E.SPLIT: _r({S.PAIR}, {S.PAIR}, S.PSUS, S.SSUS, "PAIR"),
    E.SPLIT_RS: _r(
        set(ANY),
        {S.COPY, S.PAIR, S.SSUS, S.PSUE},
        None,
        S.SSWS,
        "an S-VOL in COPY, PAIR, SSUS or PSUE",
    ),
    E.SUSPEND: _r(set(LIVE), set(ANY), S.PSUE, None, "COPY or PAIR"),
    E.SUSPEND_BOTH: _r(
        {S.COPY, S.PAIR, S.PSUE}, {S.COPY, S.PAIR, S.PSUE}, S.PSUE, S.PSUE, "COPY, PAIR or PSUE"
    ),
    E.RECOVER: _r({S.PAIR}, set(ANY), S.COPY, None, "PAIR"),
    E.RESYNC: _r(
        {S.PSUS, S.PSUE},
        {S.SSUS, S.PSUE, S.PAIR, S.COPY},
        S.COPY,
        S.COPY,
        "PSUS or PSUE with the S-VOL not taken over (after a takeover: "
        "resync --swaps at the S-VOL's array)",
    ),
    E.SWAP_RESYNC: _r(
        {S.PSUS, S.PSUE, S.PAIR, S.COPY},
        {S.SSWS, S.SSUS},
        S.COPY,
        S.COPY,
        "an S-VOL in SSWS or SSUS",
    ),
    E.SWAP_TAKEOVER: _r({S.PAIR}, {S.PAIR}, S.PAIR, S.PAIR, "both sides PAIR"),
    E.SVOL_TAKEOVER: _r(
        set(ANY),
        {S.COPY, S.PAIR, S.SSUS, S.PSUE},
        None,
        S.SSWS,
        "an S-VOL in COPY, PAIR, SSUS or PSUE",
    ),
    E.PVOL_TAKEOVER: _r({S.PSUE}, set(ANY), S.PSUE, None, "a P-VOL in PSUE"),
    E.DELETE: _r(set(ANY), set(Status), S.SMPL, S.SMPL, "a pair"),
}
SWAPPING = frozenset({E.SWAP_RESYNC, E.SWAP_TAKEOVER})


@dataclass(frozen=True, slots=True)
class PairState:
    """Both sides of one remote pair as an array knows them."""

    primary: int  # serial of the array holding the P-VOL
    secondary: int  # serial of the array holding the S-VOL
    p: Status = S.SMPL
    s: Status = S.SMPL
    fence: Fence = Fence.NEVER
    svol_rw: bool = False  # split --rw: the S-VOL takes host writes in SSUS
    fenced: bool = False  # P-VOL refuses writes: fence=data after a failed copy, or peer unknown
    demoted: bool = False  # an old P-VOL whose peer took over: refuses writes until swapped
    swaps: int = 0  # role swaps so far: when the sides disagree on the primary, more is newer

    def role_of(self, serial: int) -> Role:
        if self.p is S.SMPL and self.s is S.SMPL:
            return Role.SMPL
        return Role.PVOL if serial == self.primary else Role.SVOL

    def status_of(self, serial: int) -> Status:
        return self.p if serial == self.primary else self.s


def apply(name: str, state: PairState, event: Event, *, rw: bool = False) -> PairState:
    """The state after `event`, or PairError naming what the event needs. `rw` is split's
    --rw (the S-VOL writable in SSUS)."""
    rule = RULES[event]
    if state.p not in rule.p or state.s not in rule.s:
        raise StatusRefused(
            f"cannot {event.value} pair {name!r}: it is {state.p.value}/{state.s.value} "
            f"(P/S), {event.value} needs {rule.needs}"
        )
    if event is E.PVOL_TAKEOVER and not state.fenced:
        raise StatusRefused(f"cannot {event.value} pair {name!r}: its P-VOL is not fenced")
    new = replace(
        state,
        p=rule.to_p or state.p,
        s=rule.to_s or state.s,
        svol_rw=rw if event is E.SPLIT else state.svol_rw and rule.to_s in (None, S.SSUS),
        fenced=_fenced(state, event),
        demoted=state.demoted and event not in SWAPPING and event is not E.DELETE,
        swaps=state.swaps + (event in SWAPPING),
    )
    if event in SWAPPING:
        new = replace(new, primary=state.secondary, secondary=state.primary, demoted=False)
    return new


def _fenced(state: PairState, event: Event) -> bool:
    """A fence=data P-VOL refuses writes from its suspension until a takeover or resync."""
    if event in (E.SUSPEND, E.SUSPEND_BOTH):
        return state.fence is Fence.DATA or state.fenced
    if event in (E.PVOL_TAKEOVER, E.RESYNC, E.DELETE, *SWAPPING):
        return False
    return state.fenced


def access(state: PairState, serial: int) -> Access:
    """Host access to this array's volume of the pair (brief §0.2): the P side owns the
    status; an S-VOL is read only but in SSWS or a --rw split."""
    role = state.role_of(serial)
    if role is Role.SMPL:
        return Access.READ_WRITE
    if role is Role.PVOL:
        if state.demoted or (state.p is S.PSUE and state.fenced):
            return Access.READ_ONLY
        return Access.READ_WRITE
    if state.s is S.SSWS or (state.s is S.SSUS and state.svol_rw):
        return Access.READ_WRITE
    return Access.READ_ONLY


# -- cascades: local (ShadowImage) pairs whose P-VOL is this array's volume of a TC pair ------

L = LocalEvent
_TAKE_OVER = "take the TC pair over first (split -RS or svol-takeover: SSWS)"
_AT_S = "a TC S-VOL is written only by its P-VOL; " + _TAKE_OVER
_MIRRORS = "the TC pair mirrors every write; split it first"
_COPYING = "the TC S-VOL holds a half-done copy until the TC copy ends"

# (this array's side of the TC pair, its status there) -> local pair operations refused, and
# why; not listed: allowed. The "Cascades" table of docs/pairs.md. A restore writes the volume,
# so it runs only where the volume takes writes alone and no TC copy can land on it; a split
# or resync of a TC S-VOL's local pair keeps that S-VOL's image, so not while it is no image.
CASCADE: dict[tuple[Role, Status], dict[LocalEvent, str]] = {
    (Role.PVOL, S.COPY): {L.RESTORE: _MIRRORS},
    (Role.PVOL, S.PAIR): {L.RESTORE: _MIRRORS},
    (Role.SVOL, S.COPY): {L.SPLIT: _COPYING, L.RESYNC: _COPYING, L.RESTORE: _AT_S},
    (Role.SVOL, S.PAIR): {L.RESTORE: _AT_S},
    (Role.SVOL, S.SSUS): {L.RESTORE: "the TC P-VOL may resync over it at any time; " + _TAKE_OVER},
    (Role.SVOL, S.PSUE): {
        L.RESYNC: "the TC S-VOL may hold a half-done copy; resync the TC pair first",
        L.RESTORE: _AT_S,
    },
}

# TC events refused while a local pair restores the volume: each would copy over it, or copy
# a half-restored image to the peer.
RESTORE_EXCLUDES = frozenset({E.CREATE, E.RESYNC, E.SWAP_RESYNC})


def cascade(name: str, state: PairState, serial: int, local: str, event: LocalEvent) -> None:
    """PairError (naming the TC status) when TC pair `name` in `state` refuses `event` of
    local pair `local` on this array's (`serial`) volume of it."""
    role, status = state.role_of(serial), state.status_of(serial)
    why = CASCADE.get((role, status), {}).get(event)
    if why is None and event is L.RESTORE and role is Role.PVOL:
        if state.demoted:
            why = f"array {state.secondary} took the TC pair over; resync --swaps there"
        elif state.fenced:
            why = "the TC P-VOL is fenced (read only); resync the TC pair or take it over"
    if why is not None:
        raise StatusRefused(
            f"cannot {event.value} pair {local!r}: its P-VOL is the "
            f"{role.value} of TC pair {name!r} ({status.value}): {why}"
        )


# -- a P-VOL write whose update copy failed ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """What to do with the host write, and which event the pair takes."""

    write_ok: bool
    event: Event


def on_update_failure(fence: Fence, marked_s_suspended: bool) -> Outcome:
    """The fence level's answer (brief §3.1). `marked_s_suspended`: the S side could still
    be told to suspend (the link works but the S-VOL failed, say)."""
    event = E.SUSPEND_BOTH if marked_s_suspended else E.SUSPEND
    if fence is Fence.DATA:
        return Outcome(False, event)
    if fence is Fence.STATUS:
        return Outcome(marked_s_suspended, event)
    return Outcome(True, event)


# -- horctakeover ---------------------------------------------------------------------------


class Takeover(Enum):
    """horctakeover's actions with CCI's exit codes (brief §2.3, §3.2). CCI's 2 (an SVOL-
    takeover that could swap) and 3 (PVOL-SMPL-takeover) have no case here: a swap needs the
    P side PAIR (then it is a swap-takeover, 1) and a fenced P-VOL always keeps its pair."""

    NOP = 0
    SWAP = 1  # swap-takeover
    PVOL_PSUE = 4  # PVOL-takeover: a fenced P-VOL accepts writes again
    SVOL_SSUS = 5  # SVOL-SSUS-takeover: SSWS, the P side reachable but not PAIR
    SVOL_E = 225  # SVOL-SSUS-takeover with the P side unknown: EX_VOLCUR


class TakeoverError(PairError):
    """The takeover-switch table has no action: the volumes are unconformable."""

    exit_status = 223  # EX_VOLCRE (the brief lists no code for "unconformable": our choice)


Peer = tuple[Role, Status] | None  # the remote volume's role and status; None: unreachable


def takeover(name: str, state: PairState, serial: int, remote: Peer) -> Takeover:
    """The takeover-switch table, for a takeover run at array `serial`; `remote` is what the
    peer reported of its volume (None: unreachable)."""
    role, status = state.role_of(serial), state.status_of(serial)
    if role is Role.SVOL:
        return _svol_takeover(name, status, remote)
    if role is Role.PVOL:
        if state.demoted:
            raise TakeoverError(
                f"cannot take over pair {name!r}: array {state.secondary} "
                f"took it over; run resync --swaps there"
            )
        peer_ok = remote is None or remote[0] is Role.SVOL
        return Takeover.PVOL_PSUE if state.fenced and peer_ok else Takeover.NOP
    if remote is not None and remote[0] is Role.PVOL:
        return Takeover.NOP
    raise TakeoverError(
        f"cannot take over pair {name!r}: the local volume is SMPL and the "
        f"remote one is {'unreachable' if remote is None else remote[0].value}"
    )


def _svol_takeover(name: str, status: Status, remote: Peer) -> Takeover:
    if status is S.SSWS:
        return Takeover.NOP
    if remote is None:
        return Takeover.SVOL_E
    if remote[0] is not Role.PVOL:
        raise TakeoverError(
            f"cannot take over pair {name!r}: the local volume is an S-VOL "
            f"and the remote one is {remote[0].value}: unconformable"
        )
    return Takeover.SWAP if remote[1] is S.PAIR else Takeover.SVOL_SSUS


TAKEOVER_EVENT: dict[Takeover, Event | None] = {
    Takeover.NOP: None,
    Takeover.SWAP: E.SWAP_TAKEOVER,
    Takeover.PVOL_PSUE: E.PVOL_TAKEOVER,
    Takeover.SVOL_SSUS: E.SVOL_TAKEOVER,
    Takeover.SVOL_E: E.SVOL_TAKEOVER,
}


# -- never two primaries --------------------------------------------------------------------


def new_uuid() -> int:
    return secrets.randbits(63) | 1  # never 0: 0 is "no data yet"


@dataclass(frozen=True, slots=True)
class Lineage:
    """A side's data generations: `current` names its data as of now; `history` the
    generations it went through. Whenever a side writes without its peer (a split, a
    suspension, a takeover) it starts a new generation, so when the link returns each side
    can tell whether the other's data descends from its own."""

    current: int
    history: tuple[int, ...] = field(default=())

    def fork(self) -> Lineage:
        """Start a new generation: made durable before the first write this side takes
        without its peer (split, suspended, taken over), so that only a side that really
        wrote alone looks diverged."""
        return Lineage(new_uuid(), (*self.history, self.current)[-16:])

    def knows(self, generation: int) -> bool:
        return generation == self.current or generation in self.history


class Verdict(Enum):
    """What two sides' lineages say when the link returns."""

    SAME = "same"  # one data generation: nothing diverged
    PEER_AHEAD = "peer ahead"  # the peer went on from ours: we are the old copy
    SELF_AHEAD = "self ahead"  # we went on from the peer's: it is the old copy
    SPLIT_BRAIN = "split brain"  # both went on from a common past: only an operator decides


def compare(mine: Lineage, peer: Lineage) -> Verdict:
    if mine.current == peer.current:
        return Verdict.SAME
    if peer.knows(mine.current):
        return Verdict.PEER_AHEAD
    if mine.knows(peer.current):
        return Verdict.SELF_AHEAD
    return Verdict.SPLIT_BRAIN
