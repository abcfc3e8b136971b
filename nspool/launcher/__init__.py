"""The launcher: an exec'd, single-threaded fork server (``python -m nspool.launcher``).

Its pieces, one file per process role: ``__main__`` (the outer process: creates the pool
namespace, explains failures), ``_forkserver`` (PID 1 of the pool namespace, forks workers),
``_init`` (PID 1 of a worker namespace: reaps, stops tasks exactly, relays signals) and
``_taskloop`` (its only child, an ordinary process that runs the tasks); plus ``_syscalls``
(unshare/setns/prctl/mount/ns_last_pid), ``_explain`` (what a refusal means) and
``_handover`` (the message that gives the fork server's spare worker to a pool).
"""

from __future__ import annotations

import sys


def add_sys_path(paths: list[str]) -> None:
    """Put the program's import path entries we lack in front of ours, in its order."""
    for path in reversed(paths):
        if path not in sys.path:
            sys.path.insert(0, path)
