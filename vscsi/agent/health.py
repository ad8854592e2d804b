"""The checks of one round: each site's control socket, links and heartbeats, and each pair
as the sites show it. Everything a check finds is turned into `policy` observations; no check
ever changes anything."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from typing import Any

from vscsi.agent.config import SiteConfig
from vscsi.agent.policy import PVOL, SVOL, PairView
from vscsi.control import ControlError, request

Ask = Callable[..., Any]  # vscsi.control.request's signature: (path, cmd, timeout=, **args)


def ask_reason(ask: Ask, path: str, cmd: str, timeout: float, **args: Any) -> tuple[Any, str]:
    """(result, "") or (None, why it failed): a dead, hung or garbled socket is a failed
    check, never an exception out of the loop."""
    try:
        return ask(path, cmd, timeout=timeout, **args), ""
    except ControlError as e:
        return None, f"control socket: {e}"
    except TimeoutError:
        return None, f"control socket: no answer to {cmd} within {timeout:g}s"
    except (OSError, ValueError) as e:
        return None, f"control socket: {e}"


def heartbeat(site: SiteConfig, timeout: float, now: Callable[[], float] = time.time) -> str:
    """ "" when the site's configured heartbeats pass, else why not."""
    if site.heartbeat_file is not None:
        try:
            age = now() - os.stat(site.heartbeat_file).st_mtime
        except OSError as e:
            return f"heartbeat file {site.heartbeat_file}: {e.strerror}"
        if age > site.heartbeat_max_age:
            return (f"heartbeat file {site.heartbeat_file} not touched within "
                    f"{site.heartbeat_max_age:g}s")  # fmt: skip
    if site.heartbeat_command is not None:
        cmd = " ".join(site.heartbeat_command)
        try:
            done = subprocess.run(site.heartbeat_command, timeout=timeout, capture_output=True,
                                  check=False)  # fmt: skip
        except subprocess.TimeoutExpired:
            return f"heartbeat command {cmd!r}: no exit within {timeout:g}s"
        except OSError as e:
            return f"heartbeat command {cmd!r}: {e.strerror}"
        if done.returncode != 0:
            return f"heartbeat command {cmd!r}: exit status {done.returncode}"
    return ""


def probe(site: SiteConfig, timeout: float, ask: Ask = request) -> tuple[bool, bool | None, str]:
    """(the socket answered, every link up or None, why the check failed or "")."""
    status, why = ask_reason(ask, site.socket, "status", timeout)
    if status is None:
        return False, None, why
    links = status.get("links", []) if isinstance(status, dict) else []
    links_up = all(bool(link.get("up")) for link in links)
    return True, links_up, heartbeat(site, timeout)


def pair_view(site: str, socket: str, pair: str, timeout: float,
              ask: Ask = request) -> tuple[PairView | None, str]:  # fmt: skip
    """The remote pair `pair` as the array at `socket` shows it, or why it cannot."""
    result, why = ask_reason(ask, socket, "pair_display", timeout, name=pair)
    if result is None:
        return None, why
    try:
        rows = [p for p in result["pairs"] if p.get("pair") == pair and "remote" in p]
        if not rows:
            return None, f"no remote pair {pair!r} there"
        row = rows[0]
        # the peer's volume is named REMOTE:VOLUME; a local volume name never has a colon
        local = PVOL if ":" not in row["pvol"]["volume"] else SVOL
        return PairView(site, local, str(row["pvol"]["status"]), str(row["svol"]["status"]),
                        bool(row.get("split_brain")), bool(row.get("demoted"))), ""  # fmt: skip
    except (KeyError, TypeError, AttributeError):
        return None, f"pair_display answered what no vscsi array does: {result!r:.200}"
