"""The TrueCopy state machine, row by row of the research brief: statuses per side, host access,
fence levels, the takeover-switch table with CCI's exit codes, and the lineages that tell an
old primary from a new one."""

from __future__ import annotations

import pytest

from vscsi.pair.states import Access, PairError, Role
from vscsi.remote.states import (
    Event,
    Fence,
    Lineage,
    PairState,
    Status,
    Takeover,
    TakeoverError,
    Verdict,
    access,
    apply,
    compare,
    on_update_failure,
    takeover,
)

P, S = 410001, 410002  # the two arrays' serials
E, St = Event, Status
RO, RW = Access.READ_ONLY, Access.READ_WRITE


def state(*events: Event, fence: Fence = Fence.NEVER, rw: bool = False) -> PairState:
    st = PairState(P, S, fence=fence)
    for e in (E.CREATE, *events):
        st = apply("tc", st, e, rw=rw)
    return st


def sides(st: PairState) -> tuple[str, str, Access, Access]:
    return st.p.value, st.s.value, access(st, P), access(st, S)


@pytest.mark.parametrize(
    ("events", "rw", "fence", "expected"),
    [
        ((), False, Fence.NEVER, ("COPY", "COPY", RW, RO)),
        ((E.COPY_DONE,), False, Fence.NEVER, ("PAIR", "PAIR", RW, RO)),
        ((E.COPY_DONE, E.SPLIT), False, Fence.NEVER, ("PSUS", "SSUS", RW, RO)),
        ((E.COPY_DONE, E.SPLIT), True, Fence.NEVER, ("PSUS", "SSUS", RW, RW)),
        ((E.COPY_DONE, E.SUSPEND), False, Fence.NEVER, ("PSUE", "PAIR", RW, RO)),
        ((E.COPY_DONE, E.SUSPEND), False, Fence.DATA, ("PSUE", "PAIR", RO, RO)),
        ((E.COPY_DONE, E.SUSPEND_BOTH), False, Fence.STATUS, ("PSUE", "PSUE", RW, RO)),
        ((E.COPY_DONE, E.SVOL_TAKEOVER), False, Fence.NEVER, ("PAIR", "SSWS", RW, RW)),
        ((E.COPY_DONE, E.SPLIT_RS), False, Fence.NEVER, ("PAIR", "SSWS", RW, RW)),
        ((E.COPY_DONE, E.SUSPEND, E.PVOL_TAKEOVER), False, Fence.DATA, ("PSUE", "PAIR", RW, RO)),
        ((E.COPY_DONE, E.SPLIT, E.RESYNC), True, Fence.NEVER, ("COPY", "COPY", RW, RO)),
        ((E.COPY_DONE, E.DELETE), False, Fence.NEVER, ("SMPL", "SMPL", RW, RW)),
    ],
)
def test_status_and_access_on_each_side(events, rw, fence, expected) -> None:
    """Brief §0.2: COPY/PAIR S read only; SSUS read only unless --rw; PSUE P read only with
    fence=data; SSWS read/write."""
    assert sides(state(*events, fence=fence, rw=rw)) == expected


def test_swaps_move_the_primary_to_the_other_array() -> None:
    st = state(E.COPY_DONE, E.SWAP_TAKEOVER)
    assert (st.primary, st.secondary, st.p, st.s) == (S, P, St.PAIR, St.PAIR)
    assert access(st, S) is RW and access(st, P) is RO
    back = state(E.COPY_DONE, E.SVOL_TAKEOVER, E.SWAP_RESYNC)
    assert (back.primary, back.p, back.s) == (S, St.COPY, St.COPY)
    assert back.role_of(S) is Role.PVOL and back.role_of(P) is Role.SVOL


@pytest.mark.parametrize(
    ("events", "event", "message"),
    [
        ((), E.SPLIT, "cannot split pair 'tc': it is COPY/COPY (P/S), split needs PAIR"),
        ((E.COPY_DONE, E.SVOL_TAKEOVER), E.RESYNC, "after a takeover: resync --swaps at the"),
        ((E.COPY_DONE,), E.SWAP_RESYNC, "resync --swaps needs an S-VOL in SSWS or SSUS"),
        ((E.COPY_DONE, E.SUSPEND), E.PVOL_TAKEOVER, "its P-VOL is not fenced"),
        ((E.COPY_DONE, E.SPLIT), E.SWAP_TAKEOVER, "swap-takeover needs both sides PAIR"),
    ],
)
def test_refusals_name_what_the_event_needs(events, event, message) -> None:
    with pytest.raises(PairError, match=message.replace("(", r"\(").replace(")", r"\)")):
        apply("tc", state(*events), event)


def test_the_same_events_give_the_same_state_on_both_arrays() -> None:
    """The module does not know which side it plays: the P array applying its own events and
    the S array applying them as reported end in one state."""
    events = [E.COPY_DONE, E.SPLIT, E.RESYNC, E.COPY_DONE, E.SUSPEND_BOTH, E.SVOL_TAKEOVER]
    at_p, at_s = PairState(P, S), PairState(P, S)
    for e in (E.CREATE, *events):
        at_p, at_s = apply("tc", at_p, e), apply("tc", at_s, e)
    assert at_p == at_s


@pytest.mark.parametrize(
    ("fence", "told", "write_ok", "event"),
    [
        (Fence.DATA, True, False, E.SUSPEND_BOTH),
        (Fence.DATA, False, False, E.SUSPEND),
        (Fence.STATUS, True, True, E.SUSPEND_BOTH),
        (Fence.STATUS, False, False, E.SUSPEND),
        (Fence.NEVER, False, True, E.SUSPEND),
    ],
)
def test_fence_levels_decide_the_write(fence, told, write_ok, event) -> None:
    """Brief §3.1: data fails the write; status fails it only if the S side could not be
    marked suspended; never lets it through."""
    out = on_update_failure(fence, told)
    assert (out.write_ok, out.event) == (write_ok, event)


PAIRED = state(E.COPY_DONE)


@pytest.mark.parametrize(
    ("st", "at", "remote", "expected"),
    [
        (state(E.COPY_DONE, E.SVOL_TAKEOVER), S, (Role.PVOL, St.PAIR), Takeover.NOP),
        (PAIRED, S, (Role.PVOL, St.PAIR), Takeover.SWAP),
        (PAIRED, S, (Role.PVOL, St.PSUE), Takeover.SVOL_SSUS),
        (PAIRED, S, None, Takeover.SVOL_E),
        (state(E.COPY_DONE, E.SUSPEND, fence=Fence.DATA), P, None, Takeover.PVOL_PSUE),
        (
            state(E.COPY_DONE, E.SUSPEND, fence=Fence.DATA),
            P,
            (Role.SVOL, St.PAIR),
            Takeover.PVOL_PSUE,
        ),
        (PAIRED, P, (Role.SVOL, St.PAIR), Takeover.NOP),
        (state(E.COPY_DONE, E.SUSPEND), P, None, Takeover.NOP),
        (state(E.COPY_DONE, E.DELETE), P, (Role.PVOL, St.PAIR), Takeover.NOP),
    ],
)
def test_takeover_switch_table(st, at, remote, expected) -> None:
    """Brief §3.2, with CCI's exit codes as the enum values (225: EX_VOLCUR)."""
    assert takeover("tc", st, at, remote) is expected


@pytest.mark.parametrize(
    ("st", "at", "remote"),
    [
        (PAIRED, S, (Role.SVOL, St.PAIR)),
        (PAIRED, S, (Role.SMPL, St.SMPL)),
        (state(E.COPY_DONE, E.DELETE), S, None),
    ],
)
def test_unconformable_volumes_are_refused(st, at, remote) -> None:
    with pytest.raises(TakeoverError) as e:
        takeover("tc", st, at, remote)
    assert e.value.exit_status == 223


def test_lineages_tell_the_old_primary_and_a_split_brain() -> None:
    synced = Lineage(7)
    p_wrote, s_wrote = synced.fork(), synced.fork()
    assert compare(synced, synced) is Verdict.SAME
    assert compare(synced, s_wrote) is Verdict.PEER_AHEAD  # the old P-VOL did not write
    assert compare(s_wrote, synced) is Verdict.SELF_AHEAD
    assert compare(p_wrote, s_wrote) is Verdict.SPLIT_BRAIN  # both wrote alone
    assert compare(s_wrote.fork(), s_wrote) is Verdict.SELF_AHEAD  # several outages on
