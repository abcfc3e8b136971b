"""``python -m nspool doctor``: what this machine allows, tried live, and how to fix it."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time

_PROBE = """
import sys
from nspool.launcher import _syscalls as s
try:
    s.unshare({flags})
except OSError as e:
    print(e.errno, e.strerror)
    sys.exit(1)
"""


def _sysctl(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return "(not present)"


def _probe(flags: str) -> str | None:
    """Try an unshare in a fresh single-threaded interpreter; None if it worked."""
    out = subprocess.run(
        [sys.executable, "-c", _PROBE.format(flags=flags)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if out.returncode == 0:
        return None
    return (out.stdout or out.stderr).strip() or f"exit code {out.returncode}"


def _task_pid() -> int:
    return os.getpid()


def _parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[1])


def _try_pool(private_proc: bool = False) -> tuple[str | None, float]:
    """Start a real pool and run one task; (error text or None, seconds taken)."""
    from .. import NSPoolExecutor

    t0 = time.perf_counter()
    try:
        with NSPoolExecutor(1, private_proc=private_proc) as ex:
            pid = ex.submit(_task_pid).result(timeout=60)
            init = _parent_of(ex.worker_pids()[0])
    except Exception as exc:  # noqa: BLE001 - the doctor reports every failure
        return f"{type(exc).__name__}: {exc}", time.perf_counter() - t0
    if pid == 1:
        return "the task runs as PID 1 of its namespace", time.perf_counter() - t0
    if pid != init:
        # It works, but PIDs of tasks may repeat across workers (ns_last_pid was refused).
        return (
            f"the task's PID {pid} is not its worker's unique PID {init}: writing "
            "/proc/sys/kernel/ns_last_pid was refused",
            time.perf_counter() - t0,
        )
    return None, time.perf_counter() - t0


#: each limit (and usage) and the controller it needs
_LIMITS = (
    ("limit: memory_limit", "memory"),
    ("limit: pids_limit", "pids"),
    ("limit: cpu_limit", "cpu"),
    ("usage: track_usage", "cpuacct"),
)


def _limit_lines() -> tuple[list[tuple[str, str]], dict[str, object]]:
    """Which limits work here, without writing anything; and the pool options that do."""
    from .._cgroups import layout as _layout

    try:
        layout = _layout.detect_layout()
        problems = _layout.check([c for _, c in _LIMITS], layout)
    except OSError as exc:
        return [("cgroups", f"cannot be read ({exc})")], {}
    lines = []
    for name, controller in _LIMITS:
        why = problems[controller]
        if why is None:
            h = layout.hierarchies[controller]
            text = f"ok (cgroup v{h.version}, {h.own_dir})"
            if controller == "cpuacct" and problems["memory"] is not None:
                # CPU time needs no controller on v2; the peak needs the memory controller.
                text += "; CPU time only: memory_peak is None without the memory controller"
            lines.append((name, text))
        else:
            lines.append((name, f"not available\n    {why}"))
    if any(problems.values()):
        lines.append(("  to get them", _layout.HOW_TO_GET_ONE))
    options: dict[str, object] = {}
    if problems["memory"] is None:
        options["memory_limit"] = "256M"
    if problems["pids"] is None:
        options["pids_limit"] = 64
    if problems["cpu"] is None:
        options["cpu_limit"] = 1.0
    if problems["cpuacct"] is None:
        options["track_usage"] = True
    return lines, options


def _usage_task() -> int:
    block = bytearray(32 << 20)
    block[::4096] = b"x" * len(block[::4096])
    return len(block)


def _try_limits(options: dict[str, object]) -> str:
    """Run a task in a pool with every limit that works here; what it measured."""
    from .. import NSPoolExecutor

    t0 = time.perf_counter()
    try:
        with NSPoolExecutor(1, **options) as ex:  # type: ignore[arg-type]
            f = ex.submit(_usage_task)
            f.result(timeout=60)
            usage = f.usage
    except Exception as exc:  # noqa: BLE001 - the doctor reports every failure
        return f"FAILED\n    {type(exc).__name__}: {exc}"
    took = (time.perf_counter() - t0) * 1e3
    text = f"ok ({took:.0f} ms; {', '.join(sorted(options))})"
    if usage is not None:
        peak = "?" if usage.memory_peak is None else f"{usage.memory_peak / (1 << 20):.1f} MiB"
        cpu = "?" if usage.cpu_time is None else f"{usage.cpu_time * 1e3:.1f} ms"
        text += f"\n    a task touching 32 MiB measured: peak memory {peak}, CPU {cpu}"
    return text


def main() -> int:
    from ..launcher._syscalls import SYSCALL_PATH

    root = os.geteuid() == 0
    lines: list[tuple[str, str]] = [
        ("kernel", f"{platform.system()} {platform.release()} {platform.machine()}"),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("syscall path", SYSCALL_PATH),
        (
            "user",
            f"uid {os.geteuid()} "
            + (
                "(root): the pool uses a PID namespace"
                if root
                else "(unprivileged): the pool uses a user + PID namespace"
            ),
        ),
        ("user.max_user_namespaces", _sysctl("/proc/sys/user/max_user_namespaces")),
        ("user.max_pid_namespaces", _sysctl("/proc/sys/user/max_pid_namespaces")),
        (
            "kernel.apparmor_restrict_unprivileged_userns",
            _sysctl("/proc/sys/kernel/apparmor_restrict_unprivileged_userns"),
        ),
        ("kernel.unprivileged_userns_clone", _sysctl("/proc/sys/kernel/unprivileged_userns_clone")),
    ]
    from ..launcher._syscalls import CLONE_NEWPID, CLONE_NEWUSER

    userns = _probe(str(CLONE_NEWUSER))
    pidns = _probe(str(CLONE_NEWPID | (0 if root else CLONE_NEWUSER)))
    lines.append(("live: user namespace", "ok" if userns is None else f"FAILED ({userns})"))
    lines.append(("live: PID namespace", "ok" if pidns is None else f"FAILED ({pidns})"))
    pool_err, took = _try_pool()
    lines.append(
        (
            "live: pool, task at a unique PID",
            f"ok ({took * 1e3:.0f} ms)" if pool_err is None else f"FAILED\n    {pool_err}",
        )
    )
    proc_err = None
    if pool_err is None:
        proc_err, took = _try_pool(private_proc=True)
        lines.append(
            (
                "live: private /proc",
                f"ok ({took * 1e3:.0f} ms)"
                if proc_err is None
                else f"not available\n    {proc_err}",
            )
        )
    limit_lines, options = _limit_lines()
    lines += limit_lines
    if pool_err is None and options:
        lines.append(("live: pool with limits", _try_limits(options)))
    width = max(len(k) for k, _ in lines)
    print("nspool doctor")
    for key, value in lines:
        print(f"  {key.ljust(width)}  {value}")
    if pool_err is None:
        extra = "" if proc_err is None else " (without private_proc)"
        print(f"verdict: nspool works here{extra}.")
        return 0
    print("verdict: nspool cannot run here. The error above says why and how to fix it.")
    return 1
