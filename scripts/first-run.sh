#!/usr/bin/env bash
# The README's "Install on a host" steps, as written, run as root: install vscsi into a venv,
# load the kernel modules, mount configfs, serve examples/demo.toml, check that its volumes appear
# as disks, then stop the daemon. Exit status 0 when every step worked.
#
#   sudo scripts/first-run.sh
#
# VSCSI_PREFIX: where the venv goes (default /opt/vscsi, as in the README).
# VSCSI_BIN: an already installed `vscsi` to use instead of installing (a host without network).
# VSCSI_CONFIG: the config to serve (default examples/demo.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=${VSCSI_PREFIX:-/opt/vscsi}
config=${VSCSI_CONFIG:-examples/demo.toml}
step() { printf '\n== %s\n' "$*"; }

if [ "$(id -u)" != 0 ]; then
  echo "first-run: run as root (sudo $0)" >&2
  exit 2
fi

if [ -n "${VSCSI_BIN:-}" ]; then
  vscsi=$VSCSI_BIN
  step "using the installed $vscsi"
else
  step "install into $prefix"
  python3 -m venv "$prefix"
  "$prefix/bin/pip" install -q .
  vscsi=$prefix/bin/vscsi
fi
"$vscsi" --version

step "kernel modules and configfs"
modprobe -a target_core_user tcm_loop
mountpoint -q /sys/kernel/config || mount -t configfs configfs /sys/kernel/config

step "check and serve $config"
"$vscsi" check -c "$config"
log=$(mktemp /run/vscsi-first-run.XXXXXX)
"$vscsi" up -c "$config" >"$log" 2>&1 &
daemon=$!
trap 'kill -TERM $daemon 2>/dev/null; wait $daemon 2>/dev/null; rm -f "$log"' EXIT

status=""
for _ in $(seq 240); do
  if ! kill -0 "$daemon" 2>/dev/null; then
    cat "$log" >&2
    echo "first-run: vscsi up exited" >&2
    exit 1
  fi
  status=$("$vscsi" status --json 2>/dev/null) && ! grep -q '"sd": null' <<<"$status" && break
  status=""
  sleep 0.5
done
cat "$log"
if [ -z "$status" ]; then
  echo "first-run: the volumes did not appear as disks within 120 s" >&2
  exit 1
fi
"$vscsi" status

step "read each volume's first block from the host"
for sd in $(grep -o '"sd": "[^"]*"' <<<"$status" | cut -d'"' -f4); do
  dd if="$sd" of=/dev/null bs=4096 count=1 iflag=direct status=none
  echo "$sd: readable"
done

step "stop"
kill -TERM "$daemon"
wait "$daemon"
trap 'rm -f "$log"' EXIT
echo "first-run: OK"
