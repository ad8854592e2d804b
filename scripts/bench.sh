#!/usr/bin/env bash
# `make bench`, inside the VM: the I/O benchmark against LIO fileio, tcmu-runner and vscsi.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python bench/bench_io.py
