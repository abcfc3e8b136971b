"""Task functions for tests/test_shared_launcher.py (importable by workers)."""

from __future__ import annotations

import os
import re
import sys


def environment(name: str) -> tuple[str | None, str]:
    """An environment variable and the working directory, as a task sees them."""
    return os.environ.get(name), os.getcwd()


def import_and_call(module: str) -> object:
    """Import ``module`` (found through the pool's import path) and return its VALUE."""
    __import__(module)
    return sys.modules[module].VALUE  # type: ignore[attr-defined]


def write_to_stderr(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


def parent_pid() -> int:
    """The host PID of this worker's init (the task's parent), read from /proc."""
    with open("/proc/self/stat", "rb") as f:
        data = f.read()
    return int(data[data.rindex(b")") + 2 :].split()[1])


def worker_view(name: str, module: str) -> dict[str, object]:
    """What a worker took from its pool's program (an environment variable, the working
    directory, a module found on its import path), its parent's host PID, and the kinds of the
    fds it holds (``pipe``, ``socket``, ``/dev/null``...; numbers vary between workers)."""
    __import__(module)
    kinds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the listing's own fd, closed by now
        kinds.append(re.sub(r"\d+", "N", target.split("[")[0].rstrip(":")))
    return {
        "env": os.environ.get(name),
        "cwd": os.getcwd(),
        "value": sys.modules[module].VALUE,  # type: ignore[attr-defined]
        "parent": parent_pid(),
        "fds": sorted(kinds),
    }
