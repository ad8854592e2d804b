"""When to take over: health observations in, one decision with its reason out, no I/O.

The rule (docs/failover.md, "The external agent"): run the takeover at the S site only when the
P-VOL's site has failed `down_after` checks in a row, the S site is healthy and its S-VOL holds
consistent data (PAIR, PSUE, SSUS). A link failure between two healthy arrays is not a site
failure: with fence never the P-VOL keeps serving, and a takeover would make a second primary.
Nor is a P array the agent cannot reach while the S array's link to it is up. Whatever cannot be
decided safely (both sites unreachable, a split brain, an S-VOL mid-copy, a P array that still
answers while the link is down) is left alone, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

PVOL, SVOL = "P-VOL", "S-VOL"
TAKEOVER_OK = ("PAIR", "PSUE", "SSUS")  # an S-VOL whose data is a consistent image


@dataclass(frozen=True)
class SiteHealth:
    """One round's checks of one site; `failures` counts the failed checks in a row, this one
    included (0: it passed)."""

    name: str
    reachable: bool  # the control socket answered `status`
    heartbeat_ok: bool = True  # every configured heartbeat passed (True when none is)
    links_up: bool | None = None  # every link the array reports is up; None: not reachable
    failures: int = 0
    reason: str = ""  # why this check failed; "" when it passed

    @property
    def healthy(self) -> bool:
        return self.reachable and self.heartbeat_ok


@dataclass(frozen=True)
class PairView:
    """A remote pair as one array's pair_display shows it."""

    site: str
    local_role: str  # PVOL or SVOL: the role of that array's volume
    pvol_status: str
    svol_status: str
    split_brain: bool = False
    demoted: bool = False


@dataclass(frozen=True)
class Observation:
    """One round for one pair: both sites' health and the pair as each reachable site shows it
    (`views` by site name; a site that could not show it is absent, `unknown` says why)."""

    pair: str
    sites: tuple[SiteHealth, SiteHealth]
    views: dict[str, PairView] = field(default_factory=dict)
    unknown: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    action: Literal["none", "takeover"]
    pair: str
    reason: str
    site: str | None = None  # where to run the takeover

    def describe(self, dry_run: bool = False) -> str:
        """The log line: "run takeover tc at siteB: siteA down for 3 checks (...)"."""
        if self.action == "takeover":
            verb = "would run" if dry_run else "run"
            return f"{verb} takeover {self.pair} at {self.site}: {self.reason}"
        return f"pair {self.pair}: {self.reason}"


def decide(obs: Observation, down_after: int) -> Decision:
    """The decision for one pair this round."""

    def none(reason: str) -> Decision:
        return Decision("none", obs.pair, reason)

    a, b = obs.sites
    if not a.reachable and not b.reachable:
        return none(f"cannot decide: both sites unreachable ({a.name}: {a.reason}; "
                    f"{b.name}: {b.reason}): no action")  # fmt: skip
    if not obs.views:
        why = "; ".join(f"{s}: {r}" for s, r in obs.unknown.items())
        return none(f"cannot decide: no reachable site shows the pair ({why}): no action")
    for v in obs.views.values():
        if v.split_brain:
            return none(f"split brain reported at {v.site}: the operator resolves it, no action")
    for v in obs.views.values():
        if v.svol_status == "SSWS" or v.demoted:
            return none(f"already taken over (S-VOL SSWS, seen at {v.site}): no action")
    p, s = _roles(obs)
    if p.failures < down_after:
        return none(_no_failover(p, s, down_after))
    if not s.healthy:
        return none(f"cannot decide: {p.name} (P-VOL) down and {s.name} (S-VOL) unhealthy "
                    f"({s.reason}): no action")  # fmt: skip
    if not p.reachable and s.links_up:
        return none(f"takeover refused: the agent cannot reach {p.name} ({p.reason}), but "
                    f"{s.name}'s link to it is up: the P-VOL's array is alive, the failure is "
                    "the agent's path to it")  # fmt: skip
    if p.reachable and (p.links_up is False or s.links_up is False):
        return none(f"takeover refused: the array at {p.name} still answers and the link is "
                    f"down, so a takeover would make a second primary ({p.reason}); stop that "
                    "array or restore the link")  # fmt: skip
    view = obs.views.get(s.name)
    if view is None:
        return none(f"cannot decide: {s.name} does not show the pair "
                    f"({obs.unknown.get(s.name, 'unknown')}): no action")  # fmt: skip
    if view.svol_status == "COPY":
        return none(f"takeover refused: the S-VOL at {s.name} is in COPY, inconsistent "
                    f"mid-copy, although {p.name} is down ({p.reason})")  # fmt: skip
    if view.svol_status not in TAKEOVER_OK:
        return none(f"takeover refused: the S-VOL at {s.name} is {view.svol_status} "
                    f"(takeover needs {', '.join(TAKEOVER_OK)})")  # fmt: skip
    return Decision("takeover", obs.pair, f"{p.name} down for {down_after} checks ({p.reason})",
                    site=s.name)  # fmt: skip


def _roles(obs: Observation) -> tuple[SiteHealth, SiteHealth]:
    """(P-VOL's site, S-VOL's site) as the first site that shows the pair reports them."""
    a, b = obs.sites
    view = obs.views.get(a.name) or obs.views[b.name]
    here, there = (a, b) if view.site == a.name else (b, a)
    return (here, there) if view.local_role == PVOL else (there, here)


def _no_failover(p: SiteHealth, s: SiteHealth, down_after: int) -> str:
    """Why a P-VOL site not (yet) down gets no takeover."""
    if p.failures:
        return (f"{p.name} (P-VOL) check failed {p.failures} of {down_after} ({p.reason}): "
                "waiting")  # fmt: skip
    if not s.healthy:
        return f"{s.name} (S-VOL) unhealthy ({s.reason}), P-VOL at {p.name} serving: no action"
    if p.links_up is False or s.links_up is False:
        return "link down, both sites healthy: no action"
    return f"P-VOL at {p.name} healthy: no action"
