"""``python -m nspool doctor``: its report, and its failure path with namespaces switched off."""

from __future__ import annotations

import subprocess
import sys

import pytest
from _procs import NO_NAMESPACES


def test_doctor_reports_a_working_machine() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "nspool", "doctor"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for needle in (
        "kernel",
        "syscall path",
        "user.max_user_namespaces",
        "apparmor_restrict_unprivileged_userns",
        "live: user namespace",
        "live: PID namespace",
        "live: pool, task at a unique PID              ok",
        "live: private /proc",
        "verdict: nspool works here",
        "limit: memory_limit",
        "limit: pids_limit",
        "limit: cpu_limit",
        "usage: track_usage",
    ):
        assert needle in out.stdout, out.stdout
    from nspool._cgroups import layout

    usable = [c for c, why in layout.check(["memory", "pids", "cpu"]).items() if why is None]
    if usable:
        assert "live: pool with limits                        ok" in out.stdout, out.stdout
        assert "a task touching 32 MiB measured: peak memory" in out.stdout
    if len(usable) < 3:
        assert "not available" in out.stdout and "systemd-run --user" in out.stdout


def test_doctor_fails_with_the_remedy_when_namespaces_are_off() -> None:
    out = subprocess.run(
        [sys.executable, "-c", NO_NAMESPACES, "doctor"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "live: PID namespace" in out.stdout and "FAILED" in out.stdout
    assert "NamespaceError" in out.stdout
    assert "sysctl user.max_user_namespaces=15000" in out.stdout  # the exact remedy
    assert "verdict: nspool cannot run here" in out.stdout


def test_the_constructor_raises_namespace_error_when_namespaces_are_off() -> None:
    script = NO_NAMESPACES.replace(
        "os.execv(sys.executable, [sys.executable, '-m', 'nspool', *sys.argv[1:]])",
        "from nspool import NSPoolExecutor, NamespaceError\n"
        "try:\n"
        "    NSPoolExecutor(1)\n"
        "except NamespaceError as e:\n"
        "    print('ERRNO', e.errno)\n"
        "    print(e)\n",
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "ERRNO 28" in out.stdout  # ENOSPC: a namespace limit
    assert "namespace" in out.stdout and "sysctl" in out.stdout


def test_doctor_says_when_usage_is_cpu_time_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """track_usage works with CPU time alone where no memory controller can be had (v2:
    cpu.stat is everywhere): the report says its memory_peak will be None."""
    from nspool._cgroups import layout
    from nspool._tools import doctor

    h = layout.Hierarchy(2, "/sys/fs/cgroup", "/sys/fs/cgroup/a.scope", frozenset({"cpuacct"}))
    monkeypatch.setattr(layout, "detect_layout", lambda: layout.Layout({"cpuacct": h}))
    no = "not delegated"
    checked = {"memory": no, "pids": no, "cpu": no, "cpuacct": None}
    monkeypatch.setattr(layout, "check", lambda controllers, layout: checked)
    lines, options = doctor._limit_lines()
    usage = dict(lines)["usage: track_usage"]
    assert usage.startswith("ok (cgroup v2, /sys/fs/cgroup/a.scope)")
    assert "memory_peak is None" in usage
    assert options == {"track_usage": True}
