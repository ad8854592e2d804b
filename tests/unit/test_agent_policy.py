"""The agent's policy over tables of observations: when it takes over, and every case where it
must not (and says why)."""

from __future__ import annotations

import pytest

from vscsi.agent.policy import PVOL, SVOL, Observation, PairView, SiteHealth, decide

DOWN = 3
REFUSED = "control socket: no vscsi daemon at /run/a.sock (Connection refused)"


def up(name: str, links: bool = True) -> SiteHealth:
    return SiteHealth(name, reachable=True, links_up=links)


def down(name: str, n: int, why: str = REFUSED) -> SiteHealth:
    return SiteHealth(name, reachable=False, heartbeat_ok=False, failures=n, reason=why)


def sick(name: str, n: int) -> SiteHealth:
    """The array answers, the site's heartbeat does not."""
    return SiteHealth(name, reachable=True, heartbeat_ok=False, links_up=True, failures=n,
                      reason="heartbeat file /run/siteA.alive not touched within 10s")  # fmt: skip


def view(site: str, role: str, p: str = "PAIR", s: str = "PAIR", **kw: bool) -> PairView:
    return PairView(site, role, p, s, **kw)


def obs(a: SiteHealth, b: SiteHealth, *views: PairView) -> Observation:
    return Observation("tc", (a, b), {v.site: v for v in views})


A_PVOL = view("siteA", PVOL)
B_SVOL = view("siteB", SVOL)

CASES = [
    # (observation, action, site, words the reason must hold)
    (obs(up("siteA"), up("siteB"), A_PVOL, B_SVOL), "none", None, "P-VOL at siteA healthy"),
    (obs(down("siteA", 1), up("siteB"), B_SVOL), "none", None, "check failed 1 of 3"),
    (obs(down("siteA", 2), up("siteB"), B_SVOL), "none", None, "check failed 2 of 3"),
    (obs(down("siteA", 3), up("siteB", links=False), B_SVOL), "takeover", "siteB",
     "siteA down for 3 checks (control socket: no vscsi daemon"),
    (obs(down("siteA", 7), up("siteB", links=False), B_SVOL), "takeover", "siteB",
     "siteA down for 3 checks"),
    (obs(down("siteA", 3), up("siteB", links=False), view("siteB", SVOL, "PAIR", "PSUE")),
     "takeover", "siteB", "down"),
    (obs(down("siteA", 3), up("siteB", links=False), view("siteB", SVOL, "PSUS", "SSUS")),
     "takeover", "siteB", "down"),
    # the agent cannot reach the P array, the S array's link to it is up: the P site is alive
    (obs(down("siteA", 3), up("siteB"), B_SVOL), "none", None,
     "takeover refused: the agent cannot reach siteA (control socket: no vscsi daemon"),
    # the site's heartbeat failed although its array answers: a site failure too
    (obs(sick("siteA", 3), up("siteB"), A_PVOL, B_SVOL), "takeover", "siteB", "heartbeat"),
    # the site's heartbeat failed, its array answers and the link is down: that array still
    # serves (fence never), a takeover would make a second primary
    (obs(SiteHealth("siteA", True, False, links_up=False, failures=3, reason="heartbeat"),
         up("siteB", links=False), view("siteA", PVOL, "PSUE"), B_SVOL), "none", None,
     "takeover refused: the array at siteA still answers and the link is down"),
    # the link, not a site: both arrays healthy, fence never keeps the P-VOL serving
    (obs(up("siteA", links=False), up("siteB", links=False), view("siteA", PVOL, "PSUE"),
         B_SVOL), "none", None, "link down, both sites healthy: no action"),
    (obs(down("siteA", 5), down("siteB", 5)), "none", None,
     "cannot decide: both sites unreachable"),
    (obs(down("siteA", 3), up("siteB", links=False), view("siteB", SVOL, "COPY", "COPY")),
     "none", None, "takeover refused: the S-VOL at siteB is in COPY"),
    (obs(down("siteA", 3), up("siteB", links=False), view("siteB", SVOL, "PSUS", "SMPL")),
     "none", None, "takeover refused: the S-VOL at siteB is SMPL"),
    (obs(down("siteA", 9), up("siteB"), view("siteB", SVOL, "PAIR", "SSWS")), "none", None,
     "already taken over"),
    (obs(up("siteA"), up("siteB"), view("siteA", PVOL, "PSUE", "SSWS", demoted=True),
         view("siteB", SVOL, "PSUE", "SSWS")), "none", None, "already taken over"),
    (obs(down("siteA", 3), up("siteB"), view("siteB", SVOL, "PSUE", "PSUE", split_brain=True)),
     "none", None, "split brain reported at siteB"),
    # swapped: siteB holds the P-VOL now, siteA (its S side) is down: nothing to take over
    (obs(down("siteA", 4), up("siteB"), view("siteB", PVOL, "PSUE", "PSUE")), "none", None,
     "siteA (S-VOL) unhealthy"),
    # the P site down, the S site's heartbeat failing too: nowhere safe to go
    (obs(down("siteA", 3), sick("siteB", 1), B_SVOL), "none", None,
     "cannot decide: siteA (P-VOL) down and siteB (S-VOL) unhealthy"),
    # the S site's array does not know the pair
    (Observation("tc", (down("siteA", 3), up("siteB")), {}, {"siteB": "no remote pair 'tc'"}),
     "none", None, "cannot decide: no reachable site shows the pair"),
    # P-VOL at siteB (after a swap), siteB down: the takeover goes to siteA
    (obs(up("siteA", links=False), down("siteB", 3), view("siteA", SVOL)), "takeover", "siteA",
     "siteB down for 3 checks"),
]  # fmt: skip


@pytest.mark.parametrize(("o", "action", "site", "words"), CASES)
def test_policy_table(o: Observation, action: str, site: str | None, words: str) -> None:
    d = decide(o, DOWN)
    assert (d.action, d.site) == (action, site), d.reason
    assert words in d.reason, d.reason
    assert d.pair == "tc"


def test_the_dry_run_line_says_what_would_run_and_why() -> None:
    d = decide(obs(down("siteA", 3, "control socket: connection refused"),
                   up("siteB", links=False), B_SVOL), DOWN)  # fmt: skip
    assert d.describe(dry_run=True) == (
        "would run takeover tc at siteB: siteA down for 3 checks (control socket: connection "
        "refused)"
    )
    assert d.describe().startswith("run takeover tc at siteB: ")


def test_the_reason_is_the_same_while_the_site_stays_down() -> None:
    """Logged once per change, not every poll: a longer outage is the same decision."""
    lines = {decide(obs(down("siteA", n), up("siteB"), B_SVOL), DOWN).describe() for n in
             range(3, 10)}  # fmt: skip
    assert len(lines) == 1
