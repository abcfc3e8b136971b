"""Task functions the Dask tests run (importable by reference on the Dask workers)."""

from __future__ import annotations

import os
import subprocess
import time

import tasks


def pid_ns() -> str:
    """This process's PID namespace, as /proc shows it."""
    return os.readlink("/proc/self/ns/pid")


host_pid = tasks.host_pid


def square(x: int) -> int:
    return x * x


def where(_: object = None) -> tuple[str, int]:
    """(PID namespace, host PID) of the process that runs the task."""
    return pid_ns(), host_pid()


def leave_daemon(_: object = None) -> int:
    """Start a setsid'd, double-forked daemon that outlives this task unless something kills
    it; return its host PID (``tasks.spawn_daemon``, with the argument Dask's map passes)."""
    return tasks.spawn_daemon()


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
