"""Process-table helpers for tests (plain /proc reading, no psutil)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from concurrent.futures import CancelledError, Future
from typing import Any


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, ppid) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rindex(b")") + 2 :].split()
    return rest[0].decode(), int(rest[1])


def process_table() -> dict[int, tuple[str, int]]:
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                table[int(name)] = st
    return table


def descendants(root: int | None = None) -> dict[int, str]:
    """Every live descendant of ``root`` (default: this process) -> its state letter."""
    root = os.getpid() if root is None else root
    table = process_table()
    children: dict[int, list[int]] = {}
    for pid, (_, ppid) in table.items():
        children.setdefault(ppid, []).append(pid)
    out: dict[int, str] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        out[pid] = table[pid][0]
        todo.extend(children.get(pid, []))
    return out


def shared_launcher_pids() -> set[int]:
    """The program's shared launcher (outer process, fork server), if one runs."""
    from nspool._core import shared_launcher

    process = shared_launcher.current()
    return set() if process is None else process.pids()


def comm(pid: int) -> str:
    """A process's name (``prctl(PR_SET_NAME)``), or "" once it is gone."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def spare_worker() -> tuple[int, int] | None:
    """(init, task loop) of the shared launcher's spare worker, once it is fully made."""
    from nspool._core import shared_launcher

    process = shared_launcher.current()
    if process is None:
        return None
    for init in descendants(process.forkserver_pid):
        if comm(init) == "nspool-spare" and _stat(init) is not None:
            loops = [p for p, (_, ppid) in process_table().items() if ppid == init]
            if len(loops) == 1 and comm(loops[0]) == "nspool-spare":
                return init, loops[0]
    return None


def pool_processes() -> dict[int, str]:
    """:func:`descendants` but the program's shared launcher, which outlives its pools by
    design: what pools have running (workers, tasks' children, own launchers)."""
    shared = shared_launcher_pids()
    return {p: s for p, s in descendants().items() if p not in shared}


def alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    st = _stat(pid)
    return st is not None and st[0] != "Z"


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def nspool_processes() -> dict[int, str]:
    """Processes anywhere on the machine that run nspool's launcher/fork server/workers."""
    out = {}
    for pid in process_table():
        line = cmdline(pid)
        if "nspool.launcher" in line and pid != os.getpid():
            out[pid] = line
    return out


def wait_gone(pids: Iterable[int], timeout: float) -> set[int]:
    """Poll until none of ``pids`` is alive or ``timeout`` passes; returns those still alive."""
    pids = set(pids)
    deadline = time.monotonic() + timeout
    while True:
        left = {p for p in pids if alive(p)}
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.01)  # polling the process table with a deadline, not synchronisation


def wait_for(predicate, timeout: float, interval: float = 0.01) -> bool:  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it is true or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def pool_cgroups() -> set[str]:
    """Every nspool pool cgroup (``nspool-<pid>-<hex>``) where pools make them: under each
    hierarchy's own cgroup of this process and its parent, and each hierarchy's root."""
    import glob

    from nspool._cgroups.layout import detect_layout

    try:
        layout = detect_layout()
    except OSError:
        return set()
    found: set[str] = set(glob.glob("/sys/fs/cgroup/*/nspool-*"))
    for h in layout.hierarchies.values():
        for place in (h.own_dir, os.path.dirname(os.path.normpath(h.own_dir))):
            found.update(glob.glob(os.path.join(glob.escape(place), "nspool-*")))
    return found


def cgroups_live_reason() -> str | None:
    """Why the live cgroup tests can't run here (None: they can): they need root and every
    controller the pool uses."""
    from nspool._cgroups import layout

    if os.geteuid() != 0:
        return "the live cgroup tests need root (unprivileged: see the clear-error tests)"
    try:
        problems = {c: why for c, why in layout.check(layout.CONTROLLERS).items() if why}
    except OSError as e:
        return f"cannot read the cgroup layout: {e}"
    return f"no usable controller here: {problems}" if problems else None


def open_fds() -> set[int]:
    """This process's open fds (not the one the listing itself used, whose number moves
    whenever an fd below it opens or closes)."""
    out = set()
    for n in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(n))
        except OSError:
            continue
        out.add(int(n))
    return out


def outcome(f: Future[Any]) -> tuple[str, Any]:
    """How a future settled, without ever blocking: ("pending", None), ("cancelled", None or
    the CancelledError a stopped running task failed with), ("result", value) or ("error",
    exception)."""
    if not f.done():
        return "pending", None
    if f.cancelled():
        return "cancelled", None
    exc = f.exception(timeout=0)
    if exc is None:
        return "result", f.result(timeout=0)
    if isinstance(exc, CancelledError):
        return "cancelled", exc
    return "error", exc


#: ``python -c NO_NAMESPACES ARGS...`` runs ``python -m nspool ARGS...`` with namespaces
#: switched off for that process tree, without touching the machine: inside a throwaway user
#: namespace, the namespace limits under /proc/sys/user are that namespace's own.
NO_NAMESPACES = """
import os, sys
from nspool.launcher import _syscalls as s
uid, gid = os.geteuid(), os.getegid()
s.unshare(s.CLONE_NEWUSER)
s.write_id_maps(uid, gid)
for limit in ('max_user_namespaces', 'max_pid_namespaces'):
    open(f'/proc/sys/user/{limit}', 'w').write('0')
os.execv(sys.executable, [sys.executable, '-m', 'nspool', *sys.argv[1:]])
"""
