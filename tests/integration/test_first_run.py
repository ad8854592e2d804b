"""A new user's first run: the README's install-and-serve steps (scripts/first-run.sh) on a host
where nothing of vscsi exists yet.

The VM shares the host's root file system read only, so the script runs in a private mount
namespace with an empty tmpfs on /var/lib (the demo's state_dir is /var/lib/vscsi, as on a real
host), and with the `vscsi` already installed in the test venv (the VM has no network for pip).
On each transport (conftest's `transport`): the demo as shipped, then with `transport =
"libtcmu"` added to its `[daemon]` table.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.integration.conftest import VSCSI, our_configfs_objects, run

SCRIPT = Path(__file__).parents[2] / "scripts" / "first-run.sh"
DEMO = Path(__file__).parents[2] / "examples" / "demo.toml"
FRESH_VAR_LIB = 'mount -t tmpfs -o mode=0755 tmpfs /var/lib && exec "$@"'


def test_first_run_serves_the_demo_from_a_fresh_state_dir(transport: str, here: Path) -> None:
    config = DEMO
    if transport != "native":
        config = here / "demo.toml"
        text = DEMO.read_text().replace("[daemon]\n", f'[daemon]\ntransport = "{transport}"\n')
        config.write_text(text)
    out = run("unshare", "--mount", "--propagation", "private", "sh", "-c", FRESH_VAR_LIB,
              "sh", "sh", "-c", 'bash "$0" && stat -c "%a %n" /var/lib/vscsi/demo', str(SCRIPT),
              env={**os.environ, "VSCSI_BIN": VSCSI, "VSCSI_CONFIG": str(config)},
              timeout=300)  # fmt: skip
    assert f"vscsi: serving 2 volume(s) through the {transport} transport" in out, out
    assert "first-run: OK" in out, out
    assert "ldev0100: /dev/sd" in out and "ldev0101: /dev/sd" in out, out
    assert "700 /var/lib/vscsi/demo" in out, out  # made by create = true, private
    assert our_configfs_objects() == [], "configfs objects left behind after the first run"
