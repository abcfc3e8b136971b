"""A task that starts a tree of blocking processes, and /proc checks on it from outside.

``make_tree`` runs in a worker: it starts ``n`` processes (``start_tree`` of
``python -m nspool bench``: fork, then exec of ``sleep``, so every tree process is equally small
whatever the worker's size; one in ten a daemon, a double fork with ``setsid`` in between, so
it is reparented away from the worker), writes every PID to a file, then blocks.
PIDs are as the host sees them (``readlink /proc/self`` reads the host's /proc even inside a
worker's PID namespace), so the benchmark can watch them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection
from dataclasses import dataclass

# The tree and the /proc checks are those of `python -m nspool bench`, which watches trees the
# same way.
from nspool._tools.bench import kill_all, proc_stat, running, start_tree

__all__ = ["Tree", "kill_all", "make_tree", "read_tree", "running", "wait_gone"]

#: a safety net: tree processes exit on their own after this long, whatever happens
LIFETIME = 120.0


def host_pid() -> int:
    """This process's PID in the host's /proc (not the PID namespace's own numbering)."""
    return int(os.readlink("/proc/self"))


def make_tree(n: int, path: str) -> None:
    """Start ``n`` processes, write ``w<worker pid>`` and one ``p<pid>``/``d<pid>`` line each
    to ``path`` (atomically, by rename), then block until killed (or ``LIFETIME``)."""
    tree = start_tree(n, LIFETIME)
    lines = b"".join(b"%c%d\n" % (b"d" if daemon else b"p", pid) for pid, daemon in tree)
    with open(path + ".tmp", "wb") as f:
        f.write(b"w%d\n" % host_pid() + lines)
    os.rename(path + ".tmp", path)
    time.sleep(LIFETIME)


@dataclass
class Tree:
    worker: int  # host PID of the worker that runs the task
    pids: dict[int, int]  # host PID -> start time (clock ticks since boot), every tree process
    daemons: set[int]


def read_tree(path: str, n: int, timeout: float) -> Tree:
    """Wait for ``make_tree``'s file and read it (with each process's start time, so that a
    recycled PID is never mistaken for a tree process)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the task did not start its {n} processes in {timeout:g} s")
        time.sleep(0.002)
    with open(path, "rb") as f:
        lines = f.read().split()
    worker = next(int(x[1:]) for x in lines if x.startswith(b"w"))
    pids = {int(x[1:]): 0 for x in lines if x[:1] in b"pd"}
    daemons = {int(x[1:]) for x in lines if x.startswith(b"d")}
    if len(pids) != n:
        raise AssertionError(f"the task reported {len(pids)} processes, not {n}")
    for pid in pids:
        st = proc_stat(pid)
        if st is None or st[0] in "ZX":
            raise AssertionError(f"tree process {pid} is not running")
        pids[pid] = st[1]
    return Tree(worker, pids, daemons)


def wait_gone(pids: dict[int, int], timeout: float, spare: Collection[int] = ()) -> None:
    """Poll /proc until every process of ``pids`` except those in ``spare`` is gone."""
    deadline = time.monotonic() + timeout
    left = {p: s for p, s in pids.items() if p not in spare}
    while left:
        left = {p: left[p] for p in running(left)}
        if left and time.monotonic() > deadline:
            raise TimeoutError(f"{len(left)} tree processes still running after {timeout:g} s")
