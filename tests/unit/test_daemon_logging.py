"""The daemon's log as an operator reads it from a journal or a file: one line per record."""

from __future__ import annotations

import subprocess
import sys

LOG_ONE = """
import logging
from types import SimpleNamespace
from vscsi.daemon import Daemon
Daemon._setup_logging(SimpleNamespace(verbose=0))
logging.getLogger("vscsi.tcmu").warning("%s: %s end", "ring-a", "x" * 200)
"""


def test_a_long_record_is_one_line_when_stderr_is_not_a_terminal() -> None:
    p = subprocess.run([sys.executable, "-c", LOG_ONE], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].endswith(" WARNING vscsi.tcmu: ring-a: " + "x" * 200 + " end")
