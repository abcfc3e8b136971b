#!/usr/bin/env bash
# `make test`: every stage below, in order; each says what it runs, with which Python and
# which dependency releases, and the run ends with a table of the stages and their times.
#
#   lint          ruff and mypy --strict, newest Python, newest releases
#   newest        the whole suite and CPython's own ProcessPoolExecutor tests on the newest
#                 supported Python (3.13) with the newest release of every dependency (what a
#                 fresh `pip install` gets today), the benchmark peers and Dask included
#   lowest        the whole suite and CPython's tests on the oldest supported Python (3.10)
#                 with the oldest release of every dependency that pyproject.toml allows
#                 (scripts/lower_bounds.py); the race tests at a third of their length
#   unprivileged  as uid 1000 (scripts/test-unprivileged.sh), the system Python, newest
#                 releases: the tests of what differs for a user without privileges (see
#                 UNPRIVILEGED_TESTS below); only when this run is root
#   default       the suite on the default python3 with the newest releases, when its minor
#                 version is none of the above (else that version is covered already)
#
#   scripts/test-all.sh [STAGE ...]     default: lint newest lowest unprivileged default;
#                                       soak: the race tests alone, long (make soak)
#
# A stage that cannot run here (no such Python, not root...) says so and is skipped.
# Environment: PYTHON (the default interpreter, default python3), PY_OLDEST, PY_NEWEST (paths
# that override the search), NSPOOL_RACE_SCALE (the race tests' length, see tests/_racing.py).
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
minor_of() { local v; v=$(version_of "$1") && echo "${v%.*}"; }
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
[ -n "$newest" ] || newest=$default  # without 3.13 the newest stage runs on the default
[ -n "$oldest" ] || oldest=$default
if [ -z "$newest" ]; then
  echo "no supported Python (3.10-3.13) found: set PYTHON=/path/to/python3" >&2
  exit 1
fi
unpriv_python=${UNPRIV_PYTHON:-/usr/bin/python3}

# -- virtual environments --------------------------------------------------------------------
# The packages each stage tests against, named as pip names them, printed with their versions.
DEPS='anyio|cloudpickle|sniffio|trio|pytest|pytest-asyncio|pytest-timeout|hypothesis|distributed|ruff|mypy'

venv_for() {  # venv_for NAME PYTHON EXTRAS [CONSTRAINTS]: a venv for the tests, made if stale
  local dir=".venv-$1" python=$2 extras=$3 constraints=${4:-} stale=""
  if [ ! -f "$dir/.installed" ] || [ pyproject.toml -nt "$dir/.installed" ]; then
    stale=yes
  elif [ -z "$constraints" ] && [ -n "$(find "$dir/.installed" -mmin +1440)" ]; then
    stale=yes  # "the newest releases" are a day's news at most
  elif [ -n "$constraints" ] && ! cmp -s "$constraints" "$dir/constraints.txt"; then
    stale=yes
  fi
  if [ -n "$stale" ]; then
    echo "   setting up $dir: Python $(version_of "$python") with nspool[$extras]" \
      "${constraints:+at the lower bounds}..." >&2
    {
      # One chain: a failed install must not leave a venv that looks ready (errexit does
      # not hold inside a stage, which runs as an `if` condition).
      rm -rf "$dir" &&
        "$python" -m venv "$dir" &&
        "$dir/bin/python" -m pip install --quiet --upgrade pip &&
        if [ -n "$constraints" ]; then
          cp "$constraints" "$dir/constraints.txt" &&
            "$dir/bin/python" -m pip install --quiet --constraint "$dir/constraints.txt" \
              -e ".[$extras]"
        else
          "$dir/bin/python" -m pip install --quiet -e ".[$extras]"
        fi &&
        touch "$dir/.installed"
    } >&2 || return 1  # stdout carries only the folder's name
  fi
  echo "$dir"
}

releases() {  # releases VENV: the dependency releases it holds, on one line
  "$1/bin/python" -m pip list --format=freeze 2>/dev/null | grep -iE "^($DEPS)==" | tr '\n' ' '
}

newest_venv() { venv_for NEWEST "$newest" test,lint,bench,dask; }

stdlib_harness() {  # stdlib_harness VENV: CPython's own tests, where its test package is
  local venv=$1
  if ! "$venv/bin/python" -c 'import test.test_concurrent_futures' 2>/dev/null; then
    echo "   CPython's ProcessPoolExecutor tests skipped: Python $(version_of "$venv/bin/python")" \
      "has no test package (test.test_concurrent_futures)"
    return 0
  fi
  say "CPython's ProcessPoolExecutor tests against nspool ($venv)"
  "$venv/bin/python" tests/stdlib_harness.py
}

# -- the stages ------------------------------------------------------------------------------
results=()
failed=()
run_stage() {  # run_stage NAME FUNCTION: time it, note its outcome
  local name=$1 start outcome
  start=$SECONDS
  if "$2"; then outcome=passed; else outcome=FAILED; failed+=("$name"); fi
  results+=("$(printf '%-13s %-7s %4d s  %s' "$name" "$outcome" $((SECONDS - start)) "$stage_note")")
}

stage_lint() {
  local venv
  venv=$(newest_venv) || return 1
  stage_note="Python $(version_of "$venv/bin/python"): $(releases "$venv" | grep -oE '(ruff|mypy)==[^ ]+' | tr '\n' ' ')"
  say "lint: ruff and mypy --strict ($venv)"
  "$venv/bin/ruff" check nspool tests scripts benchmarks && "$venv/bin/mypy"
}

stage_newest() {
  local venv ok=0
  venv=$(newest_venv) || return 1
  stage_note="Python $(version_of "$venv/bin/python"), newest releases"
  say "suite, newest releases: Python $(version_of "$venv/bin/python") ($venv)"
  echo "   $(releases "$venv")"
  "$venv/bin/python" -m pytest || ok=1
  stdlib_harness "$venv" || ok=1
  return $ok
}

stage_lowest() {
  local venv constraints ok=0
  constraints=$PYTEST_DEBUG_TEMPROOT/lower-bounds.txt
  "$newest" scripts/lower_bounds.py test >"$constraints" || return 1
  venv=$(venv_for LOWEST "$oldest" test "$constraints") || return 1
  stage_note="Python $(version_of "$venv/bin/python"), lower bounds"
  say "suite, the oldest releases pyproject.toml allows: Python $(version_of "$venv/bin/python") ($venv)"
  echo "   $(releases "$venv")"
  NSPOOL_RACE_SCALE=${NSPOOL_RACE_SCALE:-0.3} "$venv/bin/python" -m pytest || ok=1
  stdlib_harness "$venv" || ok=1
  return $ok
}

# What differs for an unprivileged user is what the kernel lets it do: the launcher's user
# namespace, PIDs, a private /proc, file ownership, cgroups (refused, with the error that says
# why), what a task may do to its worker. The fronts' own logic, the pool core, the protocol,
# the races and the drop-in and documentation checks run the same code for every user and ran
# above as root.
UNPRIVILEGED_TESTS=(
  tests/test_guarantees.py tests/test_worker_shape.py tests/test_containment.py
  tests/test_executor_api.py tests/test_shared_launcher.py tests/test_limits.py
  tests/test_cgroups.py tests/test_doctor.py tests/test_tracebacks.py tests/test_errors.py
  tests/test_explain.py
)

stage_unprivileged() {
  stage_note="Python $(version_of "$unpriv_python" || echo '?') as uid ${UNPRIV_UID:-1000}, newest releases"
  if [ "$(id -u)" != 0 ]; then
    say "unprivileged stage skipped: this run is already unprivileged (uid $(id -u)): the stages above covered it"
    stage_note="skipped (already unprivileged)"
    return 0
  elif ! command -v setpriv >/dev/null; then
    say "unprivileged stage skipped: it needs setpriv (util-linux) to drop to an unprivileged uid"
    stage_note="skipped (no setpriv)"
    return 0
  fi
  say "suite as an unprivileged user (scripts/test-unprivileged.sh)"
  NSPOOL_RACE_SCALE=${NSPOOL_RACE_SCALE:-0.3} bash scripts/test-unprivileged.sh "${UNPRIVILEGED_TESTS[@]}"
}

stage_default() {
  local venv minor covered=""
  minor=$(minor_of "$default" || true)
  if [ -z "$minor" ]; then
    stage_note="skipped (no default python3)"
    return 0
  fi
  if [ "$minor" = "$(minor_of "$newest")" ] || [ "$minor" = "$(minor_of "$oldest")" ]; then
    covered="the newest or lowest stage"
  elif [ "$(id -u)" = 0 ] && command -v setpriv >/dev/null \
    && [ "$minor" = "$(minor_of "$unpriv_python" || true)" ]; then
    covered="the unprivileged stage"
  fi
  if [ -n "$covered" ]; then
    say "default python3 ($minor) skipped: $covered ran Python $minor"
    stage_note="skipped: $covered ran Python $minor"
    return 0
  fi
  venv=$(venv_for DEFAULT "$default" test) || return 1
  stage_note="Python $(version_of "$venv/bin/python"), newest releases"
  say "suite on the default python3: Python $(version_of "$venv/bin/python") ($venv)"
  echo "   $(releases "$venv")"
  NSPOOL_RACE_SCALE=${NSPOOL_RACE_SCALE:-0.3} "$venv/bin/python" -m pytest
}

stage_soak() {
  local venv
  venv=$(newest_venv) || return 1
  stage_note="Python $(version_of "$venv/bin/python"), NSPOOL_RACE_SCALE=${NSPOOL_RACE_SCALE:-1}"
  say "race tests, NSPOOL_RACE_SCALE=${NSPOOL_RACE_SCALE:-1} ($venv)"
  "$venv/bin/python" -m pytest -p no:cacheprovider -q tests/test_races.py
}

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(lint newest lowest unprivileged default)
say "Pythons: newest $(version_of "$newest") ($newest); oldest $(version_of "$oldest") ($oldest);" \
  "unprivileged $(version_of "$unpriv_python" || echo none) ($unpriv_python);" \
  "default ${default:+$(version_of "$default") ($default)}"
[ "$(minor_of "$oldest")" = 3.10 ] || echo "   no Python 3.10 found (pyenv or PATH; or set PY_OLDEST): the oldest supported version is not tested"
[ "$(minor_of "$newest")" = 3.13 ] || echo "   no Python 3.13 found (pyenv or PATH; or set PY_NEWEST): the newest supported version is not tested"
for stage in "${stages[@]}"; do
  stage_note=""
  case $stage in
  lint | newest | lowest | unprivileged | default | soak) run_stage "$stage" "stage_$stage" ;;
  *)
    echo "unknown stage $stage (lint newest lowest unprivileged default soak)" >&2
    exit 2
    ;;
  esac
done

say "stages (total $SECONDS s)"
printf '   %s\n' "${results[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  say "FAILED: ${failed[*]}"
  exit 1
fi
say "all stages passed"
