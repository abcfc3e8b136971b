"""Exceptions nspool raises. Pool-breaking errors subclass the stdlib's ``BrokenProcessPool``
so that ``except BrokenProcessPool`` in code written for ``ProcessPoolExecutor`` keeps working."""

from __future__ import annotations

import concurrent.futures as _futures
import signal
import sys
from concurrent.futures.process import BrokenProcessPool

from ._task_errors import RemoteTraceback, TaskPicklingError, TaskUnpicklingError

__all__ = [
    "BrokenProcessPool",
    "LauncherDiedError",
    "NamespaceError",
    "PoolInitializerError",
    "RemoteTraceback",
    "TaskPicklingError",
    "TaskTimeoutError",
    "TaskUnpicklingError",
    "WorkerDiedError",
    "describe_wait_status",
]


class NamespaceError(OSError):
    """The kernel refused to create the namespaces nspool needs; the message says how to fix it."""


class WorkerDiedError(BrokenProcessPool):
    """The worker running this task died (crash, ``os._exit``, a signal, the OOM killer).

    Only that task fails; the pool replaces the worker and keeps serving.
    """

    def __init__(self, message: str, *, exitcode: int | None, signal: int | None) -> None:
        super().__init__(message)
        #: the worker's exit code, if it exited
        self.exitcode = exitcode
        #: the number of the signal that killed it, if one did
        self.signal = signal


class LauncherDiedError(BrokenProcessPool):
    """The pool's launcher is gone, so is every worker: the pool cannot serve any more."""


class PoolInitializerError(BrokenProcessPool):
    """The pool's ``initializer`` raised in a worker: the pool is broken, as in the stdlib."""


# On 3.10 concurrent.futures has its own TimeoutError; be both, so either `except` catches it.
if sys.version_info >= (3, 11):
    _TimeoutBases: tuple[type[Exception], ...] = (TimeoutError,)
else:
    _TimeoutBases = (_futures.TimeoutError, TimeoutError)


class TaskTimeoutError(*_TimeoutBases):  # type: ignore[misc]
    """A task ran past its deadline; its worker and every process it started were killed."""


def describe_wait_status(status: int) -> tuple[int | None, int | None, str]:
    """Split a raw ``waitpid`` status into (exit code, signal number, human text)."""
    import os

    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return None, sig, f"was killed by {name} (signal {sig})"
    if os.WIFEXITED(status):
        code = os.WEXITSTATUS(status)
        return code, None, f"exited with code {code}"
    return None, None, f"ended with wait status {status:#x}"
