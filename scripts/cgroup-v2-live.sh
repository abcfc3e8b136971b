#!/usr/bin/env bash
# The live cgroup limit tests (tests/test_cgroups.py, tests/test_limits.py) on a machine with a
# pure cgroup v2 hierarchy, in one go, and what came out (issue 20). This machine (cgroup v1 for
# the controllers) runs them through v1; only a v2 machine runs the v2 code against the kernel.
#
# Meant for: root, no network, a python3 (3.10+; the v2 machine has 3.12) that has nspool's
# runtime dependencies (cloudpickle, anyio, sniffio) but no pytest. The tests need these wheels,
# all pure Python, in .whl/ (git-ignored, so carry it along: with the device tool,
# carry=[".whl"]); `scripts/cgroup-v2-live.sh fetch` downloads them where there is network:
#   pytest pluggy iniconfig packaging pygments     pytest itself
#   pytest-timeout pytest-asyncio typing_extensions the plugins pyproject.toml's settings name
#   hypothesis sortedcontainers                     conftest.py imports hypothesis
#   trio attrs outcome sniffio idna                 the trio backend of the async limit test
# They go to site-pkgs/ (git-ignored, remade each run) with
#   python3 -m pip install --no-index --no-deps --target site-pkgs .whl/*.whl
# (or are unzipped there where python3 has no pip: a pure wheel unzipped is installed), and the
# run uses PYTHONPATH=$PWD/site-pkgs:$PWD, so nothing is installed into the machine's Python.
#
# Usage (from anywhere; it works in the repository root):
#   scripts/cgroup-v2-live.sh fetch           download the wheels into .whl/ (needs network)
#   scripts/cgroup-v2-live.sh [PYTEST ARGS]   install them, show the machine, run the tests
# PYTHON picks the interpreter (default python3). The exit status is pytest's. With $OUT set
# (the device tool's folder of files to bring back) the whole pytest output is copied there.
# From a session with that machine: run(command="bash scripts/cgroup-v2-live.sh",
# carry=[".whl"], timeout_s=300); it takes about half a minute here.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}

# The versions the suite runs with where it was written. hypothesis: 6.155.7 is the newest
# release with a pure-Python wheel (later ones ship a compiled module per platform).
WHEELS=(
  pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.4 pygments==2.21.0
  pytest-timeout==2.4.0 pytest-asyncio==1.5.0 typing_extensions==4.16.0
  hypothesis==6.155.7 sortedcontainers==2.4.0
  trio==0.35.0 attrs==26.1.0 outcome==1.3.0.post0 sniffio==1.3.1 idna==3.20
)

if [ "${1:-}" = fetch ]; then
  mkdir -p .whl
  "$py" -m pip download --no-deps --only-binary=:all: \
    --python-version "${WHEEL_PYTHON_VERSION:-3.12}" -d .whl "${WHEELS[@]}"
  exit 0
fi

# Every wheel there, and pure Python (a compiled one would only work on its own platform)?
missing=()
for spec in "${WHEELS[@]}"; do
  name=${spec%%==*}
  name=${name//-/_}
  found=$(find .whl -maxdepth 1 -iname "${name}-*-none-any.whl" 2>/dev/null | head -n 1)
  [ -n "$found" ] || missing+=("$spec")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "cgroup-v2-live: no pure-Python wheel in .whl/ for: ${missing[*]}" >&2
  echo "  make them where there is network: scripts/cgroup-v2-live.sh fetch; then carry .whl/" >&2
  exit 2
fi

rm -rf site-pkgs
if "$py" -m pip --version >/dev/null 2>&1; then
  "$py" -m pip install --quiet --disable-pip-version-check --no-index --no-deps \
    --target site-pkgs .whl/*.whl
else
  echo "== $py has no pip: unzipping the wheels into site-pkgs/"
  "$py" - .whl/*.whl <<'EOF'
import sys, zipfile
for wheel in sys.argv[1:]:
    zipfile.ZipFile(wheel).extractall("site-pkgs")
EOF
fi
export PYTHONPATH="$PWD/site-pkgs:$PWD"
export PYTHONDONTWRITEBYTECODE=1

echo "== machine"
echo "kernel $(uname -r), $(nproc) CPUs, uid $(id -u), $("$py" --version 2>&1) ($(command -v "$py"))"
echo "/sys/fs/cgroup: $(stat -fc %T /sys/fs/cgroup) (a pure v2 machine shows cgroup2fs)"
echo "own cgroup(s):"
sed 's/^/  /' /proc/self/cgroup
"$py" -c "from importlib.metadata import version as v
print(*(f'{n} {v(n)}' for n in ('anyio', 'cloudpickle', 'sniffio', 'pytest', 'trio', 'hypothesis')))"

echo "== python -m nspool doctor"
"$py" -m nspool doctor || echo "(doctor exited $?)"

echo "== the two facts behind issue 20"
"$py" - <<'EOF' || echo "(probe exited $?)"
import os
import subprocess
import sys

from nspool._cgroups.layout import detect_layout
from nspool._cgroups.limits import Limits
from nspool._cgroups.pool import PoolCgroups
from nspool._cgroups.removal import remove_pool

# Each pool's cgroups as the launcher makes them (launcher/__main__.py, _make_cgroups), and
# removed as it removes them at its end.
layout = detect_layout()
try:
    # What the launcher asks for with track_usage=True and no limit.
    pool = PoolCgroups({"cpuacct"}, ("memory", "cpuacct"), layout=layout)
    try:
        w = pool.create_worker(1)
        leaf = w.dirs.get("memory") or w.dirs["cpuacct"]
        print(f"track_usage alone: controllers {sorted(pool.controllers)}, worker leaf {leaf}")
        v2 = pool.version_of("memory") == 2
        peak = "memory.peak" if v2 else "memory.max_usage_in_bytes"
        there = os.path.exists(os.path.join(leaf, peak))
        print(f"  {peak} in the leaf: {'yes' if there else 'NO'}")
        meter = pool.meter(w)
        print(f"  memory.peak reset through the meter's fd: {meter.reset_peak()}")
        print(f"  meter reads: {meter.read()}")
        meter.close()
    finally:
        remove_pool(pool.name, layout)
except OSError as e:
    print(f"track_usage alone: {type(e).__name__}: {e}")

HOG = (
    "import sys\nsys.stdin.readline()\nh = []\nwhile True:\n"
    "    h.append(bytearray(8 << 20)); h[-1][::4096] = b'x' * len(h[-1][::4096])\n"
)
try:
    # memory_limit="64M" without track_usage.
    limits = Limits.parse("64M")
    pool = PoolCgroups({"memory"}, ("memory", "cpuacct"), limits=limits, layout=layout)
    try:
        w = pool.create_worker(1)
        proc = subprocess.Popen([sys.executable, "-c", HOG], stdin=subprocess.PIPE)
        try:
            pool.attach(w, proc.pid)
            proc.communicate(b"go\n", timeout=60)
        finally:
            proc.kill()
            proc.wait()
        d = w.dirs["memory"]
        name = "memory.events" if pool.version_of("memory") == 2 else "memory.oom_control"
        with open(os.path.join(d, name)) as f:
            events = " ".join(f.read().split())
        print(f"one hog alone in a 64M leaf: exit {proc.returncode}; {name}: {events}")
    finally:
        remove_pool(pool.name, layout)
except OSError as e:
    print(f"memory limit: {type(e).__name__}: {e}")
EOF

echo "== pytest tests/test_cgroups.py tests/test_limits.py"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
"$py" -m pytest tests/test_cgroups.py tests/test_limits.py -q -p no:cacheprovider "$@" 2>&1 \
  | tee "$log"
rc=${PIPESTATUS[0]}
set -e
echo "== summary"
grep -E '^(FAILED|ERROR) ' "$log" || true
live_skips=$(grep -cE '^SKIPPED .*(live cgroup|usable controller|needs root|no cgroup2 mount|cgroup layout)' "$log" || true)
if [ "$live_skips" -gt 0 ]; then
  echo "WARNING: $live_skips live test group(s) skipped: this run did not test the kernel"
  grep -E '^SKIPPED ' "$log" || true
fi
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
  cp "$log" "$OUT/cgroup-v2-pytest.log"  # the device tool returns only the output's tail
  echo "the whole pytest output: \$OUT/cgroup-v2-pytest.log"
fi
echo "RESULT (pytest exit $rc): $(tail -n 1 "$log")"
exit "$rc"
