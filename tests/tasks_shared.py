"""Task functions for tests/test_shared_launcher.py (importable by workers)."""

from __future__ import annotations

import os
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
