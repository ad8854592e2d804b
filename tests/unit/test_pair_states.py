"""The pair state machine: every transition, every refusal, host access per role/status."""

from __future__ import annotations

import pytest

from vscsi.pair.states import (
    LOCAL,
    TRANSITIONS,
    Access,
    Event,
    PairError,
    Role,
    Status,
    access,
    next_status,
)

S, E = Status, Event


@pytest.mark.parametrize(("status", "event"), list(TRANSITIONS))
def test_every_transition(status: Status, event: Event) -> None:
    assert next_status("p", status, event) is TRANSITIONS[(status, event)]


@pytest.mark.parametrize(
    ("status", "event"),
    [(s, e) for s in LOCAL for e in Event if (s, e) not in TRANSITIONS],
)
def test_refusals_name_the_needed_status(status: Status, event: Event) -> None:
    with pytest.raises(PairError) as exc:
        next_status("p1", status, event)
    msg = str(exc.value)
    assert "'p1'" in msg and status.value in msg and "\n" not in msg


def test_operator_paths() -> None:
    path = [E.CREATE, E.COPY_DONE, E.SPLIT, E.RESTORE, E.RESTORE_DONE, E.RESYNC, E.COPY_DONE]
    status = S.SMPL
    seen = []
    for ev in path:
        status = next_status("p", status, ev)
        seen.append(status)
    assert seen == [S.COPY, S.PAIR, S.PSUS, S.RCPY, S.PSUS, S.COPY, S.PAIR]


def test_delete_from_every_paired_status() -> None:
    for s in LOCAL:
        if s is not S.SMPL:
            assert next_status("p", s, E.DELETE) is S.SMPL


@pytest.mark.parametrize(
    ("role", "status", "ro", "expected"),
    [
        (Role.SMPL, S.SMPL, False, Access.READ_WRITE),
        (Role.PVOL, S.COPY, False, Access.READ_WRITE),
        (Role.PVOL, S.PAIR, False, Access.READ_WRITE),
        (Role.PVOL, S.PSUS, False, Access.READ_WRITE),
        (Role.PVOL, S.PSUE, False, Access.READ_WRITE),
        (Role.PVOL, S.RCPY, False, Access.NO_WRITES),
        (Role.SVOL, S.COPY, False, Access.READ_ONLY),
        (Role.SVOL, S.PAIR, False, Access.READ_ONLY),
        (Role.SVOL, S.PSUS, False, Access.READ_WRITE),
        (Role.SVOL, S.PSUS, True, Access.READ_ONLY),
        (Role.SVOL, S.PSUE, False, Access.NO_ACCESS),
        (Role.SVOL, S.RCPY, False, Access.READ_ONLY),
    ],
)
def test_access_table(role: Role, status: Status, ro: bool, expected: Access) -> None:
    assert access(role, status, ro) is expected
