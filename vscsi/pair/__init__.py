"""Local pairs (ShadowImage-style): state machine, durable records, VPD page 0xC0, engine.

The daemon builds one `PairManager` over its volumes and stacks `manager.volume(name)` under
each LUN, with `vendor_pages=manager.vendor_pages(name)`.
"""

from vscsi.pair.manager import PairManager
from vscsi.pair.pair import Pair
from vscsi.pair.replica import LocalReplica, Replica
from vscsi.pair.states import Access, Event, PairError, Role, Status
from vscsi.pair.volume import PairVolume

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
