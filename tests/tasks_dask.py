"""Task functions the Dask tests run (importable by reference on the Dask workers)."""

from __future__ import annotations

import os
import subprocess
import time


def pid_ns() -> str:
    """This process's PID namespace, as /proc shows it."""
    return os.readlink("/proc/self/ns/pid")


def host_pid() -> int:
    """This process's PID as the host sees it (``os.getpid()`` is the namespace's view)."""
    return int(os.readlink("/proc/self"))


def square(x: int) -> int:
    return x * x


def where(_: object = None) -> tuple[str, int]:
    """(PID namespace, host PID) of the process that runs the task."""
    return pid_ns(), host_pid()


def leave_daemon(_: object = None) -> int:
    """Start a setsid'd, double-forked ``sleep`` that outlives this task unless something kills
    it; return its host PID."""
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        os.setsid()
        if os.fork() == 0:
            os.close(r)
            os.write(w, str(int(os.readlink("/proc/self"))).encode())
            os.close(w)
            os.execvp("sleep", ["sleep", "3600"])
        os._exit(0)
    os.close(w)
    os.waitpid(child, 0)
    data = b""
    while chunk := os.read(r, 64):
        data += chunk
    os.close(r)
    return int(data)


def tree_then_block(path: str, seconds: float = 60.0) -> None:
    """Start a few ``sleep`` processes (one a setsid'd daemon), write every host PID of this
    task's tree to ``path`` (this process first), then block for ``seconds``."""
    procs = [subprocess.Popen(["sleep", "3600"]) for _ in range(2)]
    me = host_pid()
    pids = [me, leave_daemon(), *_children_of(me)]
    assert len(pids) == 2 + len(procs), pids
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(" ".join(map(str, pids)))
    os.replace(tmp, path)
    time.sleep(seconds)


def _children_of(pid: int) -> list[int]:
    """Host PIDs of the children of host PID ``pid`` (/proc is the host's here)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat[stat.rindex(b")") + 2 :].split()[1]) == pid:
                out.append(int(name))
    return out


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def crash() -> None:
    os._exit(3)


def spin(n: int) -> int:
    """CPU-bound pure Python."""
    total = 0
    for i in range(n):
        total += i * i % 7
    return total
