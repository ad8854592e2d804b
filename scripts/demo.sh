#!/usr/bin/env bash
# `make demo`, inside the VM: serve examples/demo.toml and look at it as a host would.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${VSCSI_VM:-}" ] && [ -z "${VSCSI_DEMO_NS:-}" ] && [ ! -w /var/lib ]; then
  # The VM shares the host's root read only: the demo's state_dir gets a private, empty /var/lib.
  exec env VSCSI_DEMO_NS=1 unshare --mount --propagation private \
    bash -c 'mount -t tmpfs -o mode=0755 tmpfs /var/lib && exec bash "$0"' "$0"
fi
VSCSI=${VSCSI:-$PWD/.venv/bin/vscsi}
mkdir -p /tmp/vscsi-demo
show() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

"$VSCSI" up -c examples/demo.toml > /tmp/vscsi-demo/daemon.log 2>&1 &
daemon=$!
trap 'kill -TERM $daemon 2>/dev/null; wait $daemon 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  "$VSCSI" status --json >/tmp/vscsi-demo/status.json 2>/dev/null \
    && ! grep -q '"sd": null' /tmp/vscsi-demo/status.json && break
  sleep 0.5
done
cat /tmp/vscsi-demo/daemon.log
sd=$(python3 -c 'import json;print(json.load(open("/tmp/vscsi-demo/status.json"))["volumes"][0]["sd"])')

show "$VSCSI" status
show lsscsi -g
show sg_inq "$sd"
show sg_vpd -p sv "$sd"
show sg_vpd -p di "$sd"
show sg_vpd -p bl "$sd"
show sg_readcap -l "$sd"
show mkfs.ext4 -q -F "$sd"
mkdir -p /tmp/vscsi-demo/mnt
show mount "$sd" /tmp/vscsi-demo/mnt
show cp -r /usr/share/doc/sg3-utils /tmp/vscsi-demo/mnt/
show df -h /tmp/vscsi-demo/mnt
show ls /tmp/vscsi-demo/mnt
show umount /tmp/vscsi-demo/mnt
show fsck.ext4 -n -f "$sd"
kill -TERM $daemon; wait $daemon || true
trap - EXIT
echo; echo "daemon stopped; configfs left behind:"; ls /sys/kernel/config/target/loopback 2>/dev/null || echo "(nothing)"
