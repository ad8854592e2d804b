"""The shadow set state machine (OpenVMS Volume Shadowing model): member states, the queue of
pending operations, and the events that move them.

Every transition of the seed ("What Happens to a Shadow Set When a System Fails?", Volume
Shadowing for OpenVMS V8.4, chapter 6) is one function below, quoted in its docstring, so the
table in docs/shadow.md can be checked against the code by reading it. The functions are pure
bookkeeping on a `SetState`; `vscsi.shadow.set` does the I/O they call for.

The queue holds at most one merge (full or mini) and at most one copy per target. It is kept in
the order the manual prescribes: a minimerge first, then copies in the order requested, then a
full merge ("when a merge and a copy are both pending, the merge goes first only if it is a
minimerge; a full merge waits for the copy"). The head of the queue is the active operation;
the others are pending and keep their fences, so an interrupted operation resumes where it
stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class ShadowError(Exception):
    """An operation that does not apply to the set now: a one-line reason."""


class MemberState(Enum):
    """What a device is to the set, as SHOW SHADOW words it."""

    FULL = "ShadowSetMember"  # a full source member: identical to the others, a read source
    COPY_TARGET = "ShadowCopying"  # receives host writes and a copy; never a read source
    REMOVED = "Removed"  # left the set; its changes are tracked for a later minicopy
    STALE = "Stale"  # carries an older generation or an aborted copy: never a source


class OpKind(Enum):
    """The four operations that make members identical."""

    COPY = "Copy"  # every block from a source member to a copy target
    MINICOPY = "MiniCopy"  # assisted copy: only blocks the returning member's bitmap lists
    MERGE = "Merge"  # whole volume: read the master, write the others where they differ
    MINIMERGE = "MiniMerge"  # the same over the write-intent log's regions only

    @property
    def is_copy(self) -> bool:
        return self in (OpKind.COPY, OpKind.MINICOPY)

    @property
    def is_merge(self) -> bool:
        return self in (OpKind.MERGE, OpKind.MINIMERGE)


# Queue order: a minimerge runs before copies; a full merge waits for them.
PRIORITY = {OpKind.MINIMERGE: 0, OpKind.COPY: 1, OpKind.MINICOPY: 1, OpKind.MERGE: 2}


class Event(Enum):
    """What moves a shadow set; each has one function below."""

    MOUNT_MEMBER = "mount new member"  # rows 1, 3, 5, 7
    REMOVE_MEMBER = "dismount member"
    MEMBER_FAILED = "member error"
    COPY_TARGET_FAILED = "copy target error"
    OPERATION_DONE = "operation complete"
    SYSTEM_FAILURE = "system failure (standalone)"  # rows 2, 4, 6, 8
    NODE_FAILURE = "node failure (cluster)"  # row 9 and the minicopy rule
    DISMOUNT = "clean dismount"  # row 10
    LOG_LOST = "write-intent log lost"  # row 6, no performance assists


@dataclass(slots=True)
class Operation:
    """One queued operation: `target` is the copy target's member id (None for merges),
    `fence` the offset below which this pass is done, `seq` the order it was requested in."""

    kind: OpKind
    target: str | None = None
    fence: int = 0
    seq: int = 0


@dataclass(slots=True)
class SetState:
    """Members in join order (the first full member is the merge master and copy source)
    and the queue of operations, head first."""

    members: dict[str, MemberState] = field(default_factory=dict)
    queue: list[Operation] = field(default_factory=list)
    next_seq: int = 0

    # -- queries -------------------------------------------------------------------------------

    def full_members(self) -> list[str]:
        return [m for m, s in self.members.items() if s is MemberState.FULL]

    def master(self) -> str:
        """The merge master and copy source: the first full member."""
        full = self.full_members()
        if not full:
            raise ShadowError("the set has no full member")
        return full[0]

    def active(self) -> Operation | None:
        """The operation running now: the head of the queue."""
        return self.queue[0] if self.queue else None

    def merge_op(self) -> Operation | None:
        return next((op for op in self.queue if op.kind.is_merge), None)

    def copy_op(self, member: str) -> Operation | None:
        return next((op for op in self.queue if op.kind.is_copy and op.target == member), None)

    @property
    def steady(self) -> bool:
        """No operation pending: every member is identical."""
        return not self.queue

    # -- queue maintenance ---------------------------------------------------------------------

    def enqueue(self, op: Operation) -> Operation:
        op.seq = self.next_seq
        self.next_seq += 1
        self.queue.append(op)
        self._order()
        return op

    def _order(self) -> None:
        self.queue.sort(key=lambda op: (PRIORITY[op.kind], op.seq))

    def _drop_copies(self) -> None:
        """Abort every copy: its target stops being a member (STALE)."""
        for op in [op for op in self.queue if op.kind.is_copy]:
            self.queue.remove(op)
            if op.target is not None:
                self.members[op.target] = MemberState.STALE

    def _need_merge(self, log_valid: bool) -> None:
        """Queue the merge a crash calls for; an existing one restarts from the beginning."""
        current = self.merge_op()
        if current is not None:
            self.queue.remove(current)
        full_merge_pending = current is not None and current.kind is OpKind.MERGE
        kind = OpKind.MINIMERGE if log_valid and not full_merge_pending else OpKind.MERGE
        self.enqueue(Operation(kind))


# -- transitions ---------------------------------------------------------------------------------


def mount_member(state: SetState, member: str, bitmap: bool = False) -> Operation:
    """A new disk is mounted into the set; it becomes a copy target.

    Row 1: "If you mount a new disk into a steady state shadow set, the shadowing software
    performs a copy operation to make the new disk a full shadow set source member."
    Row 3: "If you mount an additional disk into the shadow set that is already undergoing a
    copy operation, the shadowing software finishes the original copy operation before it
    begins another copy operation on the newly mounted disk."
    Row 5: "If a new member is mounted into a shadow set when a minimerge operation is in
    progress, the minimerge is completed before the copy operation is started."
    Row 7: "If you add a new disk to a shadow set that is undergoing a merge operation, the
    shadowing software interrupts the merge operation to perform a copy operation. The merge
    operation resumes when the copy operation is completed."

    With a valid bitmap (the member was removed with the minicopy policy) the copy is a
    minicopy of the blocks written since.
    """
    current = state.members.get(member)
    if current in (MemberState.FULL, MemberState.COPY_TARGET):
        raise ShadowError(f"member {member} is already in the set ({current.value})")
    state.master()  # a set with no full member has nothing to copy from
    state.members.pop(member, None)
    state.members[member] = MemberState.COPY_TARGET
    return state.enqueue(Operation(OpKind.MINICOPY if bitmap else OpKind.COPY, member))


def remove_member(state: SetState, member: str, minicopy: bool = False) -> None:
    """The operator dismounts a member. With the minicopy policy the set keeps a write bitmap
    for it from this moment ("assisted copy" when it returns); that is refused while a merge is
    pending or running, because then no trustworthy bitmap exists. A copy target's copy is
    dropped. The last full member is never removed."""
    current = state.members.get(member)
    if current not in (MemberState.FULL, MemberState.COPY_TARGET):
        raise ShadowError(f"member {member} is not in the set")
    if minicopy and state.merge_op() is not None:
        raise ShadowError(f"cannot remove {member} with minicopy while a merge is pending")
    if current is MemberState.FULL and state.full_members() == [member]:
        raise ShadowError(f"{member} is the last full member of the set")
    op = state.copy_op(member)
    if op is not None:
        state.queue.remove(op)
    if minicopy and current is MemberState.FULL:
        state.members[member] = MemberState.REMOVED
    else:
        del state.members[member]


def member_failed(state: SetState, member: str) -> bool:
    """A full member failed a write (or a read repair): it is removed from the set and its
    changes are tracked for a later minicopy, while host I/O continues on the others. The last
    full member is never removed: returns False, and the error goes to the host."""
    if state.full_members() == [member]:
        return False
    state.members[member] = MemberState.REMOVED
    return True


def copy_target_failed(state: SetState, member: str) -> None:
    """A copy target failed a write: its copy is abandoned and it leaves the set."""
    op = state.copy_op(member)
    if op is not None:
        state.queue.remove(op)
    state.members[member] = MemberState.STALE


def operation_done(state: SetState, op: Operation) -> None:
    """An operation finished: a copy target becomes a full member; after a merge the members
    are identical. When the queue is empty the set is back in a steady state."""
    state.queue.remove(op)
    if op.kind.is_copy and op.target is not None:
        state.members[op.target] = MemberState.FULL


def system_failure(state: SetState, log_valid: bool) -> None:
    """The standalone system crashed; this runs when the set is remounted.

    Row 2: "If a failure occurs on a standalone system (the system crashes), on a steady state
    shadow set, the shadow set SCB reflects that the shadow set has been incorrectly
    dismounted. When the system is rebooted and the set is remounted, a copy operation is not
    necessary, but a merge operation is necessary and initiated." With performance assists
    (a valid write-intent log) that merge is a minimerge.
    Row 4: "When a shadow set on a standalone system is undergoing a copy operation and the
    system fails, the copy operation aborts and the shadow set is left with the original
    members." Every copy target leaves the set; a new `add` restarts its copy.
    Row 6: "If another system failure occurs before a pending minimerge has completed ...
    the shadowing software restarts the minimerge from the beginning and adds new LBNs to the
    write log file" (the log keeps the old entries while a merge is pending, so the new
    minimerge covers the union); "If performance assists are disabled, the shadowing software
    reverts to a merge operation."
    Row 8: "If a node failure occurs when the shadow set is performing a merge operation, the
    shadowing software abandons the current merge operation and starts a new merge operation."
    """
    state._drop_copies()
    state._need_merge(log_valid)


def node_failure(state: SetState, log_valid: bool) -> None:
    """Another node failed while this one keeps the set mounted (the cluster case).

    Row 9: "If minimerge is enabled and can be performed, the shadowing software interrupts the
    copy operation to perform a minimerge and then resumes the copy operation. If the minimerge
    is not enabled, the shadowing software marks the set as needing a merge operation and
    finishes the copy operation before beginning the merge operation." The queue order does
    both: a minimerge sorts before the copy, a full merge after it. Copies keep their fences,
    and an interrupted minicopy continues as a full copy (see `dismount`).
    """
    _minicopies_continue_as_copies(state)
    state._need_merge(log_valid)


def dismount(state: SetState) -> None:
    """The node running the operations dismounts the virtual unit cleanly; copies continue at
    the next mount from their fences.

    Row 10: "If a shadow set is undergoing an assisted copy operation when this occurs, the
    assisted copy does not continue. Instead, a full copy continues from the point where the
    minicopy stopped, and all the remaining blocks are copied."
    """
    _minicopies_continue_as_copies(state)


def _minicopies_continue_as_copies(state: SetState) -> None:
    for op in state.queue:
        if op.kind is OpKind.MINICOPY:
            op.kind = OpKind.COPY


def log_lost(state: SetState) -> None:
    """The write-intent log a pending minimerge needs is gone (disabled, lost, ran out): "the
    shadowing software reverts to a merge operation" over the whole volume (row 6)."""
    op = state.merge_op()
    if op is not None and op.kind is OpKind.MINIMERGE:
        state.queue.remove(op)
        state.enqueue(Operation(OpKind.MERGE))


# Event -> the function that applies it: the state table of docs/shadow.md.
TRANSITIONS: dict[Event, Callable[..., Any]] = {
    Event.MOUNT_MEMBER: mount_member,
    Event.REMOVE_MEMBER: remove_member,
    Event.MEMBER_FAILED: member_failed,
    Event.COPY_TARGET_FAILED: copy_target_failed,
    Event.OPERATION_DONE: operation_done,
    Event.SYSTEM_FAILURE: system_failure,
    Event.NODE_FAILURE: node_failure,
    Event.DISMOUNT: dismount,
    Event.LOG_LOST: log_lost,
}


def apply(state: SetState, event: Event, *args: Any) -> Any:
    """Apply `event` to `state` (the single entry point the shadow set uses)."""
    return TRANSITIONS[event](state, *args)
