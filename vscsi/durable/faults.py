"""Named fault points: a no-op unless a crash-model test installs a hook that raises there.

Product code calls ``fault_point("<module>.<step>")`` just before each step whose ordering
matters for durability (a record written but not yet synced, a flag cleared in memory but not
yet on disk). A test installs a hook with `installed`; the hook sees every point passed, from
every thread, and may raise `Crash` to stop the process there (tests/unit/crashmodel.py has
hooks that list the points a run passes and crash at the k-th). Without a hook the cost is one
global load and a None check.

Names in use: ``commit.*`` (vscsi/durable/committer.py), ``wil.*`` (vscsi/tracker/wil.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

_hook: Callable[[str], None] | None = None


class Crash(BaseException):
    """Raised by a test hook at a fault point: the process "dies" here.

    A BaseException so that product code handling Exception, OSError or VolumeError does not
    swallow it; product code must never catch BaseException without re-raising.
    """


def fault_point(name: str) -> None:
    """A step a crash test may stop at; does nothing unless a hook is installed."""
    if _hook is not None:
        _hook(name)


@contextmanager
def installed(hook: Callable[[str], None]) -> Iterator[None]:
    """Call `hook(name)` at every fault point, in every thread, until the block exits."""
    global _hook
    previous, _hook = _hook, hook
    try:
        yield
    finally:
        _hook = previous
