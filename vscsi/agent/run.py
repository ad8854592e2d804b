"""The agent's loop: a round of checks every `poll` seconds, each pair's decision logged when
it changes, and a takeover carried out once: run at the S site, waited for until the pair
settles there, then the storage server's file systems remounted."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from vscsi.agent.config import AgentConfig, SiteConfig
from vscsi.agent.health import Ask, ask_reason, pair_view, probe
from vscsi.agent.policy import PVOL, SVOL, Decision, Observation, PairView, SiteHealth, decide
from vscsi.control import request

log = logging.getLogger("vscsi.agent")


def settled(view: PairView) -> bool:
    """The pair at the new primary's array after a takeover: its S-VOL SSWS (SVOL-takeover),
    or its volume now the P-VOL in PAIR (swap-takeover)."""
    if view.local_role == SVOL:
        return view.svol_status == "SSWS"
    return view.local_role == PVOL and view.pvol_status == "PAIR"


class Agent:
    """The external agent over one config; `ask`, `clock` and `sleep` are replaceable so that
    the loop runs in tests against fake arrays and a fake clock."""

    def __init__(self, cfg: AgentConfig, dry_run: bool = False, ask: Ask = request,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:  # fmt: skip
        self.cfg = cfg
        self.dry_run = dry_run or cfg.dry_run
        self.ask, self.clock, self.sleep = ask, clock, sleep
        self.failures = {s.name: 0 for s in cfg.sites}
        self.logged: dict[str, str] = {}  # pair -> the decision line last logged

    # -- one round --------------------------------------------------------------------------------

    def observe(self) -> list[Observation]:
        """One round of checks: both sites, then every pair at each site that answered."""
        health = tuple(self._site_health(s) for s in self.cfg.sites)
        out = []
        for pair in self.cfg.pairs:
            views, unknown = {}, {}
            for site, h in zip(self.cfg.sites, health, strict=True):
                if not h.reachable:
                    continue
                view, why = pair_view(site.name, site.socket, pair, self.cfg.timeout, self.ask)
                if view is None:
                    unknown[site.name] = why
                else:
                    views[site.name] = view
            out.append(Observation(pair, (health[0], health[1]), views, unknown))
        return out

    def _site_health(self, site: SiteConfig) -> SiteHealth:
        reachable, links_up, why = probe(site, self.cfg.timeout, self.ask)
        failed = not reachable or bool(why)
        self.failures[site.name] = self.failures[site.name] + 1 if failed else 0
        return SiteHealth(site.name, reachable, heartbeat_ok=reachable and not why,
                          links_up=links_up, failures=self.failures[site.name],
                          reason=why)  # fmt: skip

    def check(self) -> list[tuple[Observation, Decision]]:
        """One round and its decisions; nothing is done."""
        return [(o, decide(o, self.cfg.down_after)) for o in self.observe()]

    def step(self) -> list[Decision]:
        """One round: each pair's decision logged if it changed, and acted on then (a
        decision carried out, or failed, is not retried until the situation changes)."""
        decisions = [d for _, d in self.check()]
        for d in decisions:
            line = d.describe(self.dry_run)
            if self.logged.get(d.pair) == line:
                continue
            self.logged[d.pair] = line
            log.log(logging.WARNING if d.action == "takeover" else logging.INFO, "%s", line)
            if d.action == "takeover" and not self.dry_run:
                self.take_over(d)
        return decisions

    def run(self, stop: Callable[[], bool] = lambda: False) -> None:
        mode = " (dry run: nothing is changed)" if self.dry_run else ""
        log.info("watching %s every %gs%s", ", ".join(self.cfg.pairs), self.cfg.poll, mode)
        while not stop():
            self.step()
            self.sleep(self.cfg.poll)

    # -- the takeover -----------------------------------------------------------------------------

    def take_over(self, d: Decision) -> bool:
        """Takeover at the S site, wait for it to settle, remount; False if any step failed."""
        assert d.site is not None
        site = self._site(d.site)
        result, why = ask_reason(self.ask, site.socket, "takeover", self.cfg.changeover_timeout,
                                 name=d.pair)  # fmt: skip
        if result is None:
            log.error("takeover %s at %s failed: %s", d.pair, site.name, why)
            return False
        log.warning("takeover %s at %s: %s (exit %s)", d.pair, site.name, result.get("action"),
                    result.get("exit"))  # fmt: skip
        if not self._settle(site, d.pair):
            return False
        return self._remount()

    def _settle(self, site: SiteConfig, pair: str) -> bool:
        deadline = self.clock() + self.cfg.changeover_timeout
        while True:
            view, why = pair_view(site.name, site.socket, pair, self.cfg.timeout, self.ask)
            if view is not None and settled(view):
                log.info(
                    "pair %s settled at %s: %s %s",
                    pair,
                    site.name,
                    view.local_role,
                    view.svol_status if view.local_role == SVOL else view.pvol_status,
                )
                return True
            if self.clock() >= deadline:
                seen = why if view is None else (f"{view.local_role}, P-VOL {view.pvol_status}, "
                                                 f"S-VOL {view.svol_status}")  # fmt: skip
                log.error(
                    "pair %s at %s did not settle within %gs (%s): file systems not remounted",
                    pair,
                    site.name,
                    self.cfg.changeover_timeout,
                    seen,
                )
                return False
            self.sleep(min(self.cfg.poll, 1.0))

    def _remount(self) -> bool:
        host = self.cfg.host
        if host.socket is None:
            log.warning("no [host] socket configured: remount the file systems on the new "
                        "primary yourself")  # fmt: skip
            return True
        ok = True
        for fs in host.filesystems:
            result, why = ask_reason(self.ask, host.socket, "remount",
                                     self.cfg.changeover_timeout, name=fs)  # fmt: skip
            if result is None:
                log.error("host remount %s failed: %s", fs, why)
                ok = False
                continue
            log.warning(
                "host remounted %s on %s: changeover took %.1fs",
                fs,
                result.get("device"),
                float(result.get("changeover_seconds", 0)),
            )
        return ok

    def _site(self, name: str) -> SiteConfig:
        return next(s for s in self.cfg.sites if s.name == name)


def report(pairs: list[tuple[Observation, Decision]]) -> dict[str, Any]:
    """`vscsi agent check --json`: the sites' health and each pair's decision."""
    sites = pairs[0][0].sites if pairs else ()
    return {
        "sites": [{"name": s.name, "reachable": s.reachable, "heartbeat_ok": s.heartbeat_ok,
                   "links_up": s.links_up, "failures": s.failures, "reason": s.reason}
                  for s in sites],
        "pairs": [{"pair": d.pair, "action": d.action, "site": d.site, "reason": d.reason,
                   "views": {k: asdict(v) for k, v in o.views.items()}}
                  for o, d in pairs],
    }  # fmt: skip
