# Everything a person runs. `make test` installs what it needs, then runs the unit tests on the
# host and the integration tests inside one VM boot of Debian's kernel (see scripts/vm-run).

PYTHON  ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
APT_PKGS := qemu-system-x86 qemu-utils linux-image-amd64 busybox-static sg3-utils lsscsi fio tcmu-runner \
            e2fsprogs kmod udev util-linux dmsetup open-iscsi multipath-tools

.PHONY: deps apt venv test unit integration lint demo drill bench profile bench-tracker bench-shadow clean

deps: apt venv

apt:
	@missing=$$(for p in $(APT_PKGS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
	  | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*) vscsi/_build.py
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test,vm,bench]'
	touch $@

test: deps lint unit integration

lint: venv
	$(VENV)/bin/ruff check vscsi tests scripts bench
	$(VENV)/bin/ruff format --check vscsi tests scripts bench

unit: venv
	$(VPY) -m pytest tests/unit -q --timeout=120

# One boot, all integration tests; a skipped integration test fails the run (tests/integration).
integration: deps
	scripts/vm-run '$(CURDIR)/$(VPY) -m pytest tests/integration -v -rs -x --durations=12'

demo: deps
	scripts/vm-run 'bash scripts/demo.sh'

# the failover drill of the first seed, as a runbook, in one VM boot (tests/integration/drill.py)
drill: deps
	scripts/vm-run '$(CURDIR)/$(VPY) -m tests.integration.drill'

bench: deps
	VSCSI_VM_MEM=3G scripts/vm-run 'bash scripts/bench.sh'

# py-spy on the daemons of one bench_io backend while fio runs: flame graphs and summaries in
# vm-out/ (VSCSI_PROFILE_BACKEND=vscsi|vscsi-pair|vscsi-remote, VSCSI_PROFILE_JOB="randwrite 4K QD16")
profile: deps
	VSCSI_VM_MEM=3G scripts/vm-run '$(CURDIR)/$(VPY) -m bench.profile'

bench-tracker: venv
	$(VPY) bench/bench_tracker.py

# the shadow set merge benchmark on this host (make bench also runs it inside the VM)
bench-shadow: venv
	$(VPY) bench/bench_shadow.py

clean:
	rm -rf $(VENV) build *.egg-info vm-out vscsi/tracker/_tracker_c.* vscsi/tcmu/_ring_c.* .pytest_cache
