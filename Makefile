# Two commands: `make demo` and `make test` (see README.md).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck bench fuzz clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

lint: $(STAMP)
	$(BIN)/ruff check src tests examples fuzz
	$(BIN)/ruff format --check src tests examples fuzz

typecheck: $(STAMP)
	$(BIN)/mypy

test: $(STAMP) lint typecheck
	$(BIN)/pytest -q

# Every row (plain, TLS, RPC tunnel, tunnel, direct), 2 GiB x 3 runs, between two
# namespaces of the lab at 0/1/20 ms RTT, QEMU direct vs migrate-proxy, time to link;
# writes docs/performance.md and docs/performance.png (root; loopback rows only without).
bench: $(STAMP)
	mkdir -p build
	$(BIN)/python -m holepunch_mig.cli bench --json build/bench.json \
		--markdown docs/performance.md --png docs/performance.png

# Coverage-guided fuzzing (atheris), every target; FUZZ_SECONDS per target.
FUZZ_SECONDS ?= 60
fuzz: $(STAMP)
	$(BIN)/python fuzz/run.py --seconds $(FUZZ_SECONDS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
