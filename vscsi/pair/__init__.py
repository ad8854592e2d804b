"""Local pairs (ShadowImage-style): state machine, durable records, VPD page 0xC0, engine.

The daemon builds one `PairManager` over its volumes and stacks `manager.volume(name)` under
each LUN, with `vendor_pages=manager.vendor_pages(name)`.
"""

from vscsi.pair.engine import LocalReplica, Pair, PairManager, PairVolume, Replica
from vscsi.pair.states import Access, Event, PairError, Role, Status

__all__ = [
    "Access",
    "Event",
    "LocalReplica",
    "Pair",
    "PairError",
    "PairManager",
    "PairVolume",
    "Replica",
    "Role",
    "Status",
]
