# ssw-gateway: `make demo` and `make test` work from a fresh clone.
# Both create .venv when it is missing and install the project into it first.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# Three workers on two cores: the end-to-end tests spend much of their time waiting on
# child processes and sockets, which a third worker fills (7:25 against 9:18 for the
# default pass on this 2-core machine, one run each, 2026-12-01).
PYTEST_WORKERS ?= 3

.PHONY: all install demo test test-fast test-slow test-future lint format bench clean

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gateway demo

# The whole default suite (unit, attacks, integration on SQLite and PostgreSQL,
# end to end). Under CI=true the slow chaos and large-data runs follow, then the
# whole of both again with the clock three years ahead.
test: $(STAMP)
	$(PY) -m pytest -n $(PYTEST_WORKERS) -m "not slow"
	@if [ -n "$$CI" ]; then $(MAKE) --no-print-directory test-slow test-future; fi

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

# Every test again with the system clock FUTURE_SHIFT ahead (libfaketime, Debian's
# `faketime` package): a test that pins a date and mixes it with keys, tokens or rows
# made at the real time passes today and breaks once the calendar passes that date;
# here it breaks now. Tests marked realclock reach outside this machine (the
# package index over TLS), whose clock is not shifted: they run in the other passes.
# Tests marked soak (thousand-bundle, browser and benchmark runs) exercise the same
# clock paths as the shorter end-to-end runs and run in the real-clock pass only.
FUTURE_SHIFT ?= +1100d
test-future: $(STAMP)
	@command -v faketime >/dev/null || { echo "test-future needs faketime: apt-get install faketime" >&2; exit 1; }
	faketime -f "$(FUTURE_SHIFT)" $(PY) -m pytest -p no:cacheprovider -n $(PYTEST_WORKERS) -m "not slow and not realclock"
	faketime -f "$(FUTURE_SHIFT)" $(PY) -m pytest -p no:cacheprovider -m "slow and not realclock and not soak"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy --strict gateway
	$(VENV)/bin/lint-imports

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Each benchmark also runs alone: `$(PY) benchmarks/<name>.py --quick` is a smoke run.
bench: $(STAMP)
	@for script in benchmarks/*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
