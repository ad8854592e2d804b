"""What a daemon or CLI start imports: under the VM's emulation every module is costly, so the
heavy ones stay out of starts that do not use them (rich off a terminal, the link's TLS and
cryptography without a link, pyroute2's whole library for one netlink family)."""

from __future__ import annotations

import subprocess
import sys


def imported_by(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running `code`."""
    p = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return set(p.stdout.split())


def heavy(modules: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if m.startswith(prefixes))


def test_the_daemon_module_imports_neither_rich_nor_the_link_sessions_nor_pyroute2() -> None:
    modules = imported_by("import vscsi.daemon")
    assert "vscsi.tcmu.netlink" in modules
    unused = ("rich", "cryptography", "vscsi.link.session", "vscsi.link.tls", "pyroute2")
    assert heavy(modules, unused) == []


def test_a_config_without_links_needs_neither_ssl_nor_cryptography() -> None:
    modules = imported_by("import vscsi.config")
    assert heavy(modules, ("ssl", "_ssl", "cryptography")) == []


def test_the_link_and_its_network_namespace_need_no_pyroute2() -> None:
    modules = imported_by("import vscsi.link.session, vscsi.link.netns")
    assert heavy(modules, ("pyroute2",)) == []
