# Two commands: `make demo` and `make test` (see README.md).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
SYSTEM := .ci/system-packages.sh
DPKG_STATUS := /var/lib/dpkg/status

.PHONY: demo test lint typecheck bench fuzz clean

# Debian packages of `make demo` / `make test`: as root the script installs what is
# missing, otherwise it says what is and the tests that need it skip.  Its stamp is
# written only when nothing is missing and redone when the script or dpkg's database
# changes, so apt is not asked again on every run.
$(VENV)/.system-%: $(SYSTEM) $(wildcard $(DPKG_STATUS))
	$(SYSTEM) $* $@

# the venv needs python3-venv, in the demo's (smallest) set.  The demo installs the
# package alone (its runtime dependencies); the test tools come with `make test`.
$(DEMO_STAMP): pyproject.toml | $(VENV)/.system-demo
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $(DEMO_STAMP)

$(STAMP): pyproject.toml $(DEMO_STAMP)
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(VENV)/.system-demo $(DEMO_STAMP)
	$(BIN)/python examples/demo.py
	@echo "the command is installed in $(VENV): run $(BIN)/holepunch-mig --help," \
		"or activate the venv first (. $(BIN)/activate) and run holepunch-mig --help"

lint: $(STAMP)
	$(BIN)/ruff check src tests examples fuzz
	$(BIN)/ruff format --check src tests examples fuzz

typecheck: $(STAMP)
	$(BIN)/mypy

test: $(VENV)/.system-test $(STAMP) lint typecheck
	$(BIN)/pytest -q

# Every row (plain, TLS, RPC tunnel, tunnel, direct), 2 GiB x 3 runs, between two
# namespaces of the lab at 0/1/20 ms RTT, QEMU direct vs migrate-proxy, time to link;
# writes docs/results/performance.md and docs/results/performance.png (root; loopback rows
# only without).
bench: $(STAMP)
	mkdir -p build
	$(BIN)/python -m holepunch_mig.cli bench --json build/bench.json \
		--markdown docs/results/performance.md --png docs/results/performance.png

# Coverage-guided fuzzing (atheris), every target; FUZZ_SECONDS per target.
FUZZ_SECONDS ?= 60
fuzz: $(STAMP)
	$(BIN)/python fuzz/run.py --seconds $(FUZZ_SECONDS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
