#!/usr/bin/env bash
# Run the test suite as an unprivileged user (uid 1000), the way most users run nspool.
# Not 65534: that is the kernel's overflow uid, which an unmapped user namespace reports for
# everyone, so a bug that maps the wrong uid would go unnoticed for exactly that user.
# /root and pyenv's interpreters are not readable by that user, so the sources are copied to a
# world-readable temporary folder and the system interpreter gets a virtual environment there.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
if [ "$(id -u)" != 0 ]; then
  echo "test-unprivileged: already unprivileged (uid $(id -u)); the main test run covers this."
  exit 0
fi
python=${UNPRIV_PYTHON:-/usr/bin/python3}
uid=${UNPRIV_UID:-1000}
if [ ! -x "$python" ]; then
  echo "test-unprivileged: skipped: no $python (set UNPRIV_PYTHON to a Python that uid $uid can read)"
  exit 0
fi
dir=$(mktemp -d /tmp/nspool-unpriv.XXXXXX)
trap 'rm -rf "$dir"' EXIT
echo "== copying the sources to $dir and installing nspool[test] for $python ($("$python" --version 2>&1)) ..."
(cd "$here" && git ls-files -z --cached --others --exclude-standard \
  | xargs -0 -I{} sh -c 'test -e "{}" && cp --parents "{}" "'"$dir"'"')
"$python" -m venv "$dir/.venv"
"$dir/.venv/bin/python" -m pip install --quiet --upgrade pip
"$dir/.venv/bin/python" -m pip install --quiet -e "$dir[test]"
echo "   $("$dir/.venv/bin/python" -m pip list --format=freeze 2>/dev/null \
  | grep -iE '^(anyio|cloudpickle|sniffio|trio|pytest|pytest-asyncio|hypothesis)==' | tr '\n' ' ')"
mkdir -p "$dir/home"
chown "$uid" "$dir/home"
chmod -R a+rX "$dir"
chmod a+rx "$dir"
echo "== nspool doctor as uid $uid =="
setpriv --reuid="$uid" --regid="$uid" --clear-groups \
  env HOME="$dir/home" "$dir/.venv/bin/python" -m nspool doctor
echo "== test suite as uid $uid =="
cd "$dir"
setpriv --reuid="$uid" --regid="$uid" --clear-groups \
  env HOME="$dir/home" PYTHONDONTWRITEBYTECODE=1 \
  "$dir/.venv/bin/python" -m pytest -p no:cacheprovider --basetemp="$dir/home/tmp" "$@"
