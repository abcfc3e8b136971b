# Everything runs from virtual environments this Makefile (or scripts/test-all.sh) creates.
#   make demo    set up nspool with its runtime dependencies only, and run the demo
#   make test    lint; the suite and CPython's ProcessPoolExecutor tests on the newest Python
#                with the newest dependency releases, and on the oldest Python with the oldest
#                releases pyproject.toml allows; the suite as an unprivileged user
#                (scripts/test-all.sh says what each stage covers, what it used and skipped)
PYTHON ?= python3

.PHONY: demo test lint test-newest test-lowest test-unprivileged soak bench bench-quick clean

.venv/.installed: pyproject.toml
	@echo "== setting up .venv: nspool and its runtime dependencies ($$($(PYTHON) --version))"
	$(PYTHON) -m venv .venv
	.venv/bin/python -m pip install --quiet -e .
	touch $@

demo: .venv/.installed
	.venv/bin/python -m nspool demo

test:
	bash scripts/test-all.sh

lint:
	bash scripts/test-all.sh lint

test-newest:
	bash scripts/test-all.sh newest

test-lowest:
	bash scripts/test-all.sh lowest

test-unprivileged:
	bash scripts/test-all.sh unprivileged

# The randomised stop/completion race tests, scaled up (SCALE=9: about 100,000 stops), with
# one JSON line of figures per test in soak-report.jsonl.
SCALE ?= 9
soak:
	rm -f soak-report.jsonl
	NSPOOL_RACE_SCALE=$(SCALE) NSPOOL_RACE_REPORT=$(CURDIR)/soak-report.jsonl \
	  bash scripts/test-all.sh soak
	@cat soak-report.jsonl

# The benchmarks compare nspool with its peers (loky, pebble, trio-parallel...): their own venv.
.venv-bench/.installed: pyproject.toml
	@echo "== setting up .venv-bench: nspool[bench,dask] ($$($(PYTHON) --version))"
	$(PYTHON) -m venv .venv-bench
	.venv-bench/bin/python -m pip install --quiet -e '.[bench,dask]'
	touch $@

bench: .venv-bench/.installed
	.venv-bench/bin/python -m benchmarks.run

bench-quick: .venv-bench/.installed
	.venv-bench/bin/python -m benchmarks.run --quick

clean:
	rm -rf .venv .venv-* .pytest_cache .mypy_cache .ruff_cache
