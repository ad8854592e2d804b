"""The failover drill (tests/integration/drill.py), one test per step, in order: each step
builds on the state the previous one left, as `make drill` runs them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.drill import STEPS, Drill
from tests.integration.sites import network


@pytest.fixture(scope="module")
def drill(workdir: Path) -> Iterator[Drill]:
    (workdir / "drill").mkdir()
    with network():
        d = Drill(workdir / "drill")
        try:
            yield d
        finally:
            d.stop()


@pytest.mark.parametrize("step", STEPS)
def test_drill_step(drill: Drill, step: str) -> None:
    getattr(drill, step)()
