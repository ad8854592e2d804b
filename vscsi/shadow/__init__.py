"""Shadow sets (OpenVMS Volume Shadowing): one virtual unit over several member volumes, kept
identical by copy, minicopy, merge and minimerge. A library; see docs/shadow.md."""

from vscsi.shadow.control import AREA, ControlBlockError
from vscsi.shadow.set import ShadowSet, Tuning
from vscsi.shadow.states import MemberState, OpKind, ShadowError

__all__ = [
    "AREA",
    "ControlBlockError",
    "MemberState",
    "OpKind",
    "ShadowError",
    "ShadowSet",
    "Tuning",
]
