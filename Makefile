# Two commands on a fresh machine: `make demo` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast lint docs fault bench down clean

install: $(STAMP)

# DS_BUILD_OPS=0: DeepSpeed builds no CUDA ops at install time (they JIT-compile when used).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: install
	$(BIN)/ditforge demo

# Three lanes. The tests marked `hosts` (network-namespace hosts with services, Ray and a Slurm of
# their own: nothing of the session's) run in the background from the start, their output in
# .ditforge/hosts-lane.log, printed when they end. Meanwhile two pytest-xdist workers share one set
# of services and take whole files (tests/conftest.py hands out the longest first); then the tests
# marked `serial` (they stop or restart those services, or hold a cluster or a command to a
# deadline) run alone. The hosts lane spends part of its time waiting (fail-over detection, joins,
# Slurm's scheduling), which the others fill (docs/development.md: the measured gain is modest).
test: install
	status=0; mkdir -p .ditforge; \
	$(BIN)/python -m pytest -q -rs -m hosts -p no:cacheprovider --durations=15 >.ditforge/hosts-lane.log 2>&1 & hosts=$$!; \
	$(BIN)/python -m pytest -q -rs -n 2 --dist loadfile --no-loadscope-reorder -m "not serial and not hosts" --durations=30 || status=$$?; \
	$(BIN)/python -m pytest -q -rs -m "serial and not hosts" --durations=15 || status=$$?; \
	wait $$hosts || status=$$?; \
	echo "==== the hosts lane (pytest -m hosts) ===="; cat .ditforge/hosts-lane.log; \
	exit $$status

# ruff lint (pyflakes + pycodestyle rules) and ruff format over the package and the tests, and mypy
# over the package (settings in pyproject.toml); CI runs it first. Format with `.venv/bin/ruff format platform tests`.
lint: install
	$(BIN)/ruff check platform tests
	$(BIN)/ruff format --check platform tests
	$(BIN)/mypy

# The documentation site (docs/, mkdocs.yml) into site/; --strict: a broken link or anchor fails.
docs: install
	$(BIN)/mkdocs build --strict

# The unit tier: no services, no Ray, no servers (tests/conftest.py refuses a unit test that asks for one).
test-fast: install
	$(BIN)/python -m pytest -q tests/unit

# The fault-injection suite alone (killed workers and drivers, S3 and MLflow outages); `test` runs it too.
fault: install
	$(BIN)/python -m pytest -q -rs --durations=0 -m fault

# `make bench BENCH_ARGS=--quick`: the CI smoke run (small sizes, few repeats).
bench: install
	$(BIN)/ditforge bench --json bench.json $(BENCH_ARGS)

down:
	-$(BIN)/ditforge services down

clean: down
	rm -rf .ditforge
