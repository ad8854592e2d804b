"""The shadow set state machine, one test per row of the seed's transitions (docs/shadow.md)
and per rule of the manual the issue lists."""

from __future__ import annotations

import pytest

from vscsi.shadow.states import (
    MemberState,
    Operation,
    OpKind,
    SetState,
    ShadowError,
    copy_target_failed,
    dismount,
    log_lost,
    member_failed,
    mount_member,
    node_failure,
    operation_done,
    remove_member,
    system_failure,
)

FULL, TARGET = MemberState.FULL, MemberState.COPY_TARGET


def steady(*names: str) -> SetState:
    return SetState(members=dict.fromkeys(names, FULL))


def kinds(state: SetState) -> list[tuple[OpKind, str | None]]:
    return [(op.kind, op.target) for op in state.queue]


def finish_head(state: SetState) -> Operation:
    op = state.active()
    assert op is not None
    operation_done(state, op)
    return op


def test_row1_new_member_into_steady_set_is_copied() -> None:
    s = steady("a", "b")
    assert s.steady
    mount_member(s, "c")
    assert s.members["c"] is TARGET and kinds(s) == [(OpKind.COPY, "c")]
    finish_head(s)
    assert s.members["c"] is FULL and s.steady


def test_row2_crash_of_steady_set_merges_not_copies() -> None:
    s = steady("a", "b")
    system_failure(s, log_valid=True)
    assert kinds(s) == [(OpKind.MINIMERGE, None)]
    s = steady("a", "b")
    system_failure(s, log_valid=False)
    assert kinds(s) == [(OpKind.MERGE, None)]
    assert s.members == {"a": FULL, "b": FULL}


def test_row3_second_new_member_waits_for_the_running_copy() -> None:
    s = steady("a")
    mount_member(s, "b")
    s.queue[0].fence = 4096
    mount_member(s, "c")
    assert kinds(s) == [(OpKind.COPY, "b"), (OpKind.COPY, "c")]
    assert s.active() is not None and s.active().fence == 4096  # the first copy goes on
    assert finish_head(s).target == "b"
    assert finish_head(s).target == "c"


def test_row4_standalone_crash_during_copy_aborts_it() -> None:
    s = steady("a", "b")
    mount_member(s, "c")
    mount_member(s, "d")
    system_failure(s, log_valid=True)
    assert s.full_members() == ["a", "b"]
    assert s.members["c"] is MemberState.STALE and s.members["d"] is MemberState.STALE
    assert kinds(s) == [(OpKind.MINIMERGE, None)]
    finish_head(s)
    mount_member(s, "c")  # a new add restarts the copy from block 0
    assert kinds(s) == [(OpKind.COPY, "c")] and s.queue[0].fence == 0


def test_row5_new_member_during_minimerge_waits_for_it() -> None:
    s = steady("a", "b")
    system_failure(s, log_valid=True)
    mount_member(s, "c")
    assert kinds(s) == [(OpKind.MINIMERGE, None), (OpKind.COPY, "c")]
    assert finish_head(s).kind is OpKind.MINIMERGE
    assert finish_head(s).kind is OpKind.COPY


def test_row6_crash_before_minimerge_completes_restarts_it_or_merges() -> None:
    s = steady("a", "b")
    system_failure(s, log_valid=True)
    s.queue[0].fence = 1 << 20
    system_failure(s, log_valid=True)
    assert kinds(s) == [(OpKind.MINIMERGE, None)] and s.queue[0].fence == 0
    s.queue[0].fence = 1 << 20
    system_failure(s, log_valid=False)
    assert kinds(s) == [(OpKind.MERGE, None)] and s.queue[0].fence == 0


def test_row6_log_lost_while_minimerge_pending_reverts_to_merge() -> None:
    s = steady("a", "b")
    system_failure(s, log_valid=True)
    log_lost(s)
    assert kinds(s) == [(OpKind.MERGE, None)]


def test_row7_new_member_interrupts_merge_which_resumes_after() -> None:
    s = steady("a", "b")
    system_failure(s, log_valid=False)
    s.queue[0].fence = 3 << 20
    mount_member(s, "c")
    assert kinds(s) == [(OpKind.COPY, "c"), (OpKind.MERGE, None)]
    finish_head(s)
    merge = s.active()
    assert merge is not None and merge.kind is OpKind.MERGE and merge.fence == 3 << 20


def test_row8_crash_during_merge_abandons_it_for_a_new_merge() -> None:
    s = steady("a", "b")
    system_failure(s, log_valid=False)
    old = s.queue[0]
    old.fence = 3 << 20
    system_failure(s, log_valid=True)  # a valid log cannot vouch for the first crash
    assert kinds(s) == [(OpKind.MERGE, None)]
    assert s.queue[0] is not old and s.queue[0].fence == 0


def test_row9_node_failure_during_copy_minimerge_first_then_copy_resumes() -> None:
    s = steady("a", "b")
    mount_member(s, "c")
    s.queue[0].fence = 2 << 20
    node_failure(s, log_valid=True)
    assert kinds(s) == [(OpKind.MINIMERGE, None), (OpKind.COPY, "c")]
    assert s.members["c"] is TARGET and s.queue[1].fence == 2 << 20
    finish_head(s)
    assert s.active() is not None and s.active().fence == 2 << 20


def test_row9_node_failure_without_minimerge_marks_merge_needed_after_copy() -> None:
    s = steady("a", "b")
    mount_member(s, "c")
    s.queue[0].fence = 2 << 20
    node_failure(s, log_valid=False)
    assert kinds(s) == [(OpKind.COPY, "c"), (OpKind.MERGE, None)]
    assert s.active() is not None and s.active().fence == 2 << 20  # the copy finishes first


def test_row10_interrupted_minicopy_continues_as_full_copy_from_its_point() -> None:
    for interrupt in (dismount, lambda st: node_failure(st, True)):
        s = steady("a", "b")
        remove_member(s, "b", minicopy=True)
        mount_member(s, "b", bitmap=True)
        assert kinds(s) == [(OpKind.MINICOPY, "b")]
        s.queue[0].fence = 1 << 20
        interrupt(s)
        copy = s.copy_op("b")
        assert copy is not None and copy.kind is OpKind.COPY and copy.fence == 1 << 20


def test_full_merge_waits_for_copies_minimerge_does_not() -> None:
    for log_valid, order in (
        (False, [OpKind.COPY, OpKind.MERGE]),
        (True, [OpKind.MINIMERGE, OpKind.COPY]),
    ):
        s = steady("a")
        mount_member(s, "b")
        node_failure(s, log_valid)
        assert [op.kind for op in s.queue] == order


def test_copies_run_one_at_a_time_in_order_requested() -> None:
    s = steady("a")
    for m in ("d", "b", "c"):
        mount_member(s, m)
    assert [op.target for op in s.queue] == ["d", "b", "c"]


def test_minicopy_removal_refused_while_merge_pending() -> None:
    s = steady("a", "b")
    system_failure(s, log_valid=True)
    with pytest.raises(ShadowError, match="merge is pending"):
        remove_member(s, "b", minicopy=True)
    remove_member(s, "b")
    assert "b" not in s.members


def test_last_full_member_is_never_removed() -> None:
    s = steady("a", "b")
    assert member_failed(s, "b")
    assert s.members["b"] is MemberState.REMOVED
    assert not member_failed(s, "a")
    assert s.full_members() == ["a"]
    with pytest.raises(ShadowError, match="last full member"):
        remove_member(s, "a")


def test_copy_target_failure_abandons_its_copy() -> None:
    s = steady("a")
    mount_member(s, "b")
    mount_member(s, "c")
    copy_target_failed(s, "b")
    assert s.members["b"] is MemberState.STALE and kinds(s) == [(OpKind.COPY, "c")]


def test_removing_a_copy_target_drops_its_copy() -> None:
    s = steady("a")
    mount_member(s, "b")
    remove_member(s, "b")
    assert s.steady and "b" not in s.members


def test_mounting_a_member_twice_is_refused() -> None:
    s = steady("a")
    mount_member(s, "b")
    with pytest.raises(ShadowError, match="already in the set"):
        mount_member(s, "b")
    with pytest.raises(ShadowError, match="already in the set"):
        mount_member(s, "a")
