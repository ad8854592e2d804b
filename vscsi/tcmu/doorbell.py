"""Doorbells shared by the threads that complete a ring's commands."""

from __future__ import annotations

import threading
from collections.abc import Callable


class Doorbell:
    """Announces published completions with as few rings as possible: a thread that finishes
    while another is ringing leaves its completion to that one, which rings once more for all
    that came meanwhile (the kernel reaps every published completion on each ring)."""

    def __init__(self, ring: Callable[[], None]) -> None:
        self._ring = ring
        self._lock = threading.Lock()  # guards the two flags below
        self._owed = False  # a completion is published that no ring has announced yet
        self._ringing = False  # a thread is ringing: others leave their completions to it

    def __call__(self) -> None:
        with self._lock:
            self._owed = True
            if self._ringing:
                return
            self._ringing = True
        while True:
            with self._lock:
                if not self._owed:
                    self._ringing = False  # in the same hold: no completion is left unrung
                    return
                self._owed = False
            try:
                self._ring()
            except BaseException:
                with self._lock:
                    self._ringing = False
                raise
