# Everything runs from virtual environments this Makefile creates.
#   make demo   set up and run the demo
#   make test   set up and run lint + the whole suite on the oldest and newest supported
#               Python (3.10 and 3.13), then again as an unprivileged user
PYTHON ?= python3
# pyenv's interpreters (their shims answer only for the selected version, so use the paths)
PYENV_ROOT ?= $(or $(shell pyenv root 2>/dev/null),$(HOME)/.pyenv)
PY_OLDEST ?= $(or $(lastword $(wildcard $(PYENV_ROOT)/versions/3.10.*/bin/python3.10)),$(shell command -v python3.10))
PY_NEWEST ?= $(or $(lastword $(wildcard $(PYENV_ROOT)/versions/3.13.*/bin/python3.13)),$(shell command -v python3.13))

.PHONY: demo test lint test-oldest test-newest test-stdlib test-unprivileged soak bench bench-quick clean

.venv/.installed: pyproject.toml
	$(PYTHON) -m venv .venv
	.venv/bin/python -m pip install --quiet --upgrade pip
	.venv/bin/python -m pip install --quiet -e '.[test]'
	touch $@

.venv-%/.installed: pyproject.toml
	@test -n "$(PY_$(*))" || { echo "no Python for $*: install it (pyenv) or set PY_$*=/path/to/python"; exit 1; }
	$(PY_$(*)) -m venv .venv-$*
	.venv-$*/bin/python -m pip install --quiet --upgrade pip
	.venv-$*/bin/python -m pip install --quiet -e '.[test]'
	touch $@

demo: .venv/.installed
	.venv/bin/python -m nspool demo

lint: .venv-NEWEST/.installed
	.venv-NEWEST/bin/ruff check nspool tests
	.venv-NEWEST/bin/mypy

test-oldest: .venv-OLDEST/.installed
	.venv-OLDEST/bin/python -m pytest

test-newest: .venv-NEWEST/.installed
	.venv-NEWEST/bin/python -m pytest

# CPython's own ProcessPoolExecutor tests (its `test` package) against NSPoolExecutor, on both
# Pythons; both always run, and each prints its summary (a Python without the test package
# prints a SKIPPED line).
test-stdlib: .venv-NEWEST/.installed .venv-OLDEST/.installed
	@status=0; \
	.venv-NEWEST/bin/python tests/stdlib_harness.py || status=1; \
	.venv-OLDEST/bin/python tests/stdlib_harness.py || status=1; \
	exit $$status

test-unprivileged:
	bash scripts/test-unprivileged.sh

test: lint test-oldest test-newest test-stdlib test-unprivileged

# The randomised stop/completion race tests, scaled up (SCALE=9: about 100,000 stops), with
# one JSON line of figures per test in soak-report.jsonl.
SCALE ?= 9
soak: .venv-NEWEST/.installed
	rm -f soak-report.jsonl
	NSPOOL_RACE_SCALE=$(SCALE) NSPOOL_RACE_REPORT=$(CURDIR)/soak-report.jsonl \
	  .venv-NEWEST/bin/python -m pytest -p no:cacheprovider -q tests/test_races.py
	@cat soak-report.jsonl

bench: .venv/.installed
	.venv/bin/python -m benchmarks.run

bench-quick: .venv/.installed
	.venv/bin/python -m benchmarks.run --quick

clean:
	rm -rf .venv .venv-* .pytest_cache .mypy_cache .ruff_cache
