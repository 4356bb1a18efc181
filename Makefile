# ssw-gateway: `make demo` and `make test` work from a fresh clone.
# Both create .venv when it is missing and install the project into it first.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_WORKERS ?= 2

.PHONY: all install demo test test-fast test-slow lint format bench clean

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
# end to end). Under CI=true the slow chaos and large-data runs follow.
test: $(STAMP)
	$(PY) -m pytest -n $(PYTEST_WORKERS) -m "not slow"
	@if [ -n "$$CI" ]; then $(MAKE) --no-print-directory test-slow; fi

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy --strict gateway

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	@for script in benchmarks/*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
