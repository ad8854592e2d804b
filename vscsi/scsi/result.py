"""What executing one command yields; the transport turns it into a ring response."""

from __future__ import annotations

from dataclasses import dataclass

GOOD = 0x00
CHECK_CONDITION = 0x02
CONDITION_MET = 0x04
BUSY = 0x08
RESERVATION_CONFLICT = 0x18
TASK_SET_FULL = 0x28


@dataclass(slots=True)
class Result:
    """SAM status, sense bytes (empty unless CHECK CONDITION) and data-in bytes produced."""

    status: int = GOOD
    sense: bytes = b""
    data_len: int = 0
