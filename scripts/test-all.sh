#!/usr/bin/env bash
# `make test`: ruff and mypy, then the test suite and CPython's own ProcessPoolExecutor tests
# (tests/stdlib_harness.py) on every supported Python this machine has -- the default python3
# always, and the oldest (3.10) and newest (3.13) supported ones where pyenv or PATH has them --
# then the suite as an unprivileged user where the machine allows it (root + setpriv). The
# default python3's suite run is left out when the unprivileged stage runs the suite on the same
# minor version (it says so).
#
#   scripts/test-all.sh [STAGE ...]     stages: lint suite stdlib unprivileged (default: all),
#                                       and soak (the race tests alone, newest Python: make soak)
#
# Every stage says what it runs, with which Python, and what it skipped and why.
# Environment: PYTHON (the default interpreter, default python3), PY_OLDEST, PY_NEWEST (paths
# that override the search).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n== %s\n' "$*"; }

# pytest's temporary folders in a root of this run's own: a pytest run elsewhere on the machine
# (another checkout, a terminal) would otherwise prune them under our feet.
PYTEST_DEBUG_TEMPROOT=$(mktemp -d /tmp/nspool-test-all.XXXXXX)
export PYTEST_DEBUG_TEMPROOT
trap 'rm -rf "$PYTEST_DEBUG_TEMPROOT"' EXIT

# -- which Pythons -------------------------------------------------------------------------
version_of() { "$1" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null; }
supported() { "$1" -c 'import sys; sys.exit(not (3, 10) <= sys.version_info[:2] <= (3, 13))' 2>/dev/null; }

find_python() {  # find_python MINOR: the newest 3.MINOR.x from pyenv, else python3.MINOR on PATH
  local minor=$1 root found=""
  root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
  for p in "$root"/versions/3."$minor".*/bin/python3."$minor"; do
    [ -x "$p" ] && found=$p
  done
  [ -n "$found" ] || found=$(command -v "python3.$minor" 2>/dev/null || true)
  echo "$found"
}

default=${PYTHON:-python3}
if ! command -v "$default" >/dev/null || ! supported "$default"; then
  echo "   the default Python ($default) is missing or not 3.10-3.13: not tested (set PYTHON=)" >&2
  default=""
fi
oldest=${PY_OLDEST:-$(find_python 10)}
newest=${PY_NEWEST:-$(find_python 13)}

# role:interpreter pairs, one per distinct version, newest first (it also runs the linters)
roles=()
seen=" "
add_role() {  # add_role ROLE PYTHON
  local v
  [ -n "$2" ] || return 0
  v=$(version_of "$2") || return 0
  case "$seen" in *" $v "*) return 0 ;; esac
  seen="$seen$v "
  roles+=("$1:$2")
}
add_role NEWEST "$newest"
add_role DEFAULT "$default"
add_role OLDEST "$oldest"

if [ ${#roles[@]} -eq 0 ]; then
  echo "no supported Python (3.10-3.13) found: set PYTHON=/path/to/python3" >&2
  exit 1
fi
say "Pythons: $(for r in "${roles[@]}"; do printf '%s %s (%s); ' "${r%%:*}" "$(version_of "${r#*:}")" "${r#*:}"; done)"
[ -n "$oldest" ] || echo "   no Python 3.10 found (pyenv or PATH; or set PY_OLDEST): the oldest supported version is not tested"
[ -n "$newest" ] || echo "   no Python 3.13 found (pyenv or PATH; or set PY_NEWEST): the newest supported version is not tested"

venv_for() {  # venv_for ROLE PYTHON: a virtual environment for the tests, made if missing
  local dir=".venv-$1" extras=test
  # The newest Python also gets the benchmark peers and distributed, for the benchmark smoke
  # run and the Dask tests (elsewhere those skip, saying why).
  [ "$1" = "${roles[0]%%:*}" ] && extras=test,bench,dask
  if [ ! -f "$dir/.installed" ] || [ pyproject.toml -nt "$dir/.installed" ]; then
    echo "   setting up $dir: Python $(version_of "$2") with nspool[$extras] ..." >&2
    {
      rm -rf "$dir"
      "$2" -m venv "$dir"
      "$dir/bin/python" -m pip install --quiet --upgrade pip
      "$dir/bin/python" -m pip install --quiet -e ".[$extras]"
      touch "$dir/.installed"
    } >&2  # stdout carries only the folder's name
  fi
  echo "$dir"
}

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(lint suite stdlib unprivileged)
failed=()
for stage in "${stages[@]}"; do
  case $stage in
  lint)
    r=${roles[0]}
    venv=$(venv_for "${r%%:*}" "${r#*:}")
    say "lint: ruff and mypy --strict ($venv)"
    "$venv/bin/ruff" check nspool tests
    "$venv/bin/mypy"
    ;;
  suite)
    # The unprivileged stage runs the whole suite too: a DEFAULT Python of the same minor
    # version as its interpreter adds little but another two minutes (the oldest and newest
    # always run as root, which covers the root-only tests).
    unpriv_minor=""
    if [ "$(id -u)" = 0 ] && command -v setpriv >/dev/null \
      && [[ " ${stages[*]} " == *" unprivileged "* ]]; then
      unpriv_minor=$(version_of "${UNPRIV_PYTHON:-/usr/bin/python3}") || unpriv_minor=""
      unpriv_minor=${unpriv_minor%.*}
    fi
    for r in "${roles[@]}"; do
      v=$(version_of "${r#*:}")
      if [ "${r%%:*}" = DEFAULT ] && [ -n "$unpriv_minor" ] && [ "${v%.*}" = "$unpriv_minor" ]; then
        say "test suite on Python $v skipped: the unprivileged stage runs it on Python $unpriv_minor"
        continue
      fi
      venv=$(venv_for "${r%%:*}" "${r#*:}")
      say "test suite on Python $(version_of "${r#*:}") ($venv)"
      "$venv/bin/python" -m pytest || failed+=("suite on $(version_of "${r#*:}")")
    done
    ;;
  stdlib)
    for r in "${roles[@]}"; do
      if ! "${r#*:}" -c 'import test.test_concurrent_futures' 2>/dev/null; then
        # No virtual environment to make for nothing: the harness would say the same.
        say "CPython's ProcessPoolExecutor tests skipped on Python $(version_of "${r#*:}"): its test package (test.test_concurrent_futures) is not installed"
        continue
      fi
      venv=$(venv_for "${r%%:*}" "${r#*:}")
      say "CPython's ProcessPoolExecutor tests against nspool, Python $(version_of "${r#*:}") ($venv)"
      "$venv/bin/python" tests/stdlib_harness.py || failed+=("stdlib harness on $(version_of "${r#*:}")")
    done
    ;;
  soak)
    r=${roles[0]}
    venv=$(venv_for "${r%%:*}" "${r#*:}")
    say "race tests, NSPOOL_RACE_SCALE=${NSPOOL_RACE_SCALE:-1} ($venv)"
    "$venv/bin/python" -m pytest -p no:cacheprovider -q tests/test_races.py || failed+=("soak")
    ;;
  unprivileged)
    if [ "$(id -u)" != 0 ]; then
      say "unprivileged stage skipped: this run is already unprivileged (uid $(id -u)), so the suite above covered it"
    elif ! command -v setpriv >/dev/null; then
      say "unprivileged stage skipped: it needs setpriv (util-linux) to drop to an unprivileged uid"
    else
      say "test suite as an unprivileged user (scripts/test-unprivileged.sh)"
      bash scripts/test-unprivileged.sh || failed+=("unprivileged suite")
    fi
    ;;
  *)
    echo "unknown stage $stage (lint suite stdlib unprivileged soak)" >&2
    exit 2
    ;;
  esac
done

if [ ${#failed[@]} -gt 0 ]; then
  say "FAILED: ${failed[*]}"
  exit 1
fi
say "all stages passed"
