#!/usr/bin/env bash
# `make bench`, inside the VM: the I/O benchmark against LIO fileio, tcmu-runner and vscsi (IOPS
# and the VM's CPU per I/O); one daemon serving 64 LUNs (attach time, idle CPU, 1 busy LUN
# against 8); then the shadow set merge benchmark (members: sparse files of 1 TiB) on a tmpfs
# mounted for it.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python bench/bench_io.py
.venv/bin/python -m bench.bench_scale

dir=$(mktemp -d /tmp/bench-shadow.XXXXXX)
cleanup() {
  if mountpoint -q "$dir"; then umount "$dir"; fi
  rmdir "$dir"
}
trap cleanup EXIT
mount -t tmpfs -o size=1500M tmpfs "$dir"
.venv/bin/python bench/bench_shadow.py --dir "$dir"
