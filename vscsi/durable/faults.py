"""Named fault points: a no-op unless a crash-model test installs a hook that raises there."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

_hook: Callable[[str], None] | None = None


class Crash(BaseException):
    """Raised by a test hook at a fault point: the process "dies" here."""


def fault_point(name: str) -> None:
    if _hook is not None:
        _hook(name)


@contextmanager
def installed(hook: Callable[[str], None]) -> Iterator[None]:
    global _hook
    previous, _hook = _hook, hook
    try:
        yield
    finally:
        _hook = previous
