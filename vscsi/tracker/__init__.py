"""The dirty-block tracker: what changed, so copies, merges and resyncs move only that.

`DirtyMap` is the C bitmap (csrc/tracker.c) behind a small Python API; `WriteIntentLog` is the
crash-safe record of regions with writes in flight.
"""

from vscsi.tracker.dirtymap import DirtyMap
from vscsi.tracker.wil import InvalidLogError, WriteIntentLog

__all__ = ["DirtyMap", "InvalidLogError", "WriteIntentLog"]
