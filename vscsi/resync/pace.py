"""`Pace`: keep a copy to the operator's rate, so host I/O keeps its share of the devices."""

from __future__ import annotations

import threading
import time


class Pace:
    """The operator's copy rate (bytes/s, 0 = unlimited): sleep so the copy keeps to it, and
    wake at once when the copier is told to stop."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.start = time.monotonic()
        self.done = 0

    def after(self, length: int, stop: threading.Event) -> None:
        if not self.rate:
            return
        self.done += length
        ahead = self.start + self.done / self.rate - time.monotonic()
        if ahead > 0:
            stop.wait(ahead)
