"""Exceptions nspool raises. Pool-breaking errors subclass the stdlib's ``BrokenProcessPool``
so that ``except BrokenProcessPool`` in code written for ``ProcessPoolExecutor`` keeps working."""

from __future__ import annotations

import concurrent.futures as _futures
import pickle
import signal
import sys
from concurrent.futures.process import BrokenProcessPool
from typing import Any, ClassVar

from ._cgroups.errors import CgroupUnavailableError

__all__ = [
    "BrokenProcessPool",
    "CgroupUnavailableError",
    "LauncherDiedError",
    "MemoryLimitError",
    "NamespaceError",
    "PoolInitializerError",
    "RemoteTraceback",
    "TaskPicklingError",
    "TaskTimeoutError",
    "TaskUnpicklingError",
    "WorkerDiedError",
    "describe_wait_status",
    "pickling_error",
]


class TaskPicklingError(pickle.PicklingError):
    """A task's function, argument, result or exception could not be pickled; the message
    names which. Only that future fails.

    It is also an instance of the exception that pickling raised, where Python allows it
    (``TypeError`` for a lock, ``PicklingError``...), so ``except TypeError`` written for
    ``ProcessPoolExecutor`` still catches it; that exception is its ``__cause__`` when it was
    raised in this program.
    """

    #: the type of the exception pickling raised, when this error is also one
    original_type: ClassVar[type[BaseException] | None] = None

    def __reduce__(self) -> tuple[Any, ...]:
        return (pickling_error, (str(self), self.original_type))


_pickling_error_classes: dict[type[BaseException] | None, type[TaskPicklingError]] = {}


def _pickling_error_class(base: type[BaseException] | None) -> type[TaskPicklingError]:
    cls = _pickling_error_classes.get(base)
    if cls is None:
        cls = _pickling_error_classes[base] = _make_pickling_error_class(base)
    return cls


def _make_pickling_error_class(base: type[BaseException] | None) -> type[TaskPicklingError]:
    if (
        base is None
        or not issubclass(base, Exception)
        or issubclass(TaskPicklingError, base)
        or issubclass(base, TaskPicklingError)
    ):
        return TaskPicklingError
    try:
        cls = type(
            "TaskPicklingError",
            (TaskPicklingError, base),
            {"__module__": __name__, "__doc__": TaskPicklingError.__doc__, "original_type": base},
        )
    except TypeError:  # e.g. an incompatible instance layout (OSError, UnicodeError...)
        return TaskPicklingError
    return cls


def pickling_error(message: str, original_type: type[BaseException] | None) -> TaskPicklingError:
    """A :class:`TaskPicklingError` that is also an ``original_type`` where possible."""
    cls = _pickling_error_class(original_type)
    try:
        return cls(message)
    except Exception:  # noqa: BLE001 - a base whose constructor wants other arguments
        return TaskPicklingError(message)


class TaskUnpicklingError(BrokenProcessPool, pickle.UnpicklingError):
    """A task or its result (or exception) could not be unpickled: in the worker, or in this
    program. Only that future fails and the pool keeps serving; it is a ``BrokenProcessPool``
    because that is what ``ProcessPoolExecutor`` raises here (after breaking the whole pool)."""


# What the stdlib pool attaches as a task exception's __cause__ (code may test for its type):
# the same class, so that such code keeps working.
try:
    from concurrent.futures.process import _RemoteTraceback as RemoteTraceback
except ImportError:  # pragma: no cover - a future CPython without it

    class RemoteTraceback(Exception):  # type: ignore[no-redef]
        """Carries the worker-side traceback; the ``__cause__`` of a task's exception."""

        def __init__(self, tb: str) -> None:
            super().__init__(tb)
            self.tb = tb

        def __str__(self) -> str:
            return self.tb


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

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments: the default (cls, args) would not rebuild it (Dask, a
        # result sent to another process, copy.copy).
        return (_rebuild, (type(self), str(self), self.__dict__))


class MemoryLimitError(WorkerDiedError):
    """The task's process tree used more memory than the pool's ``memory_limit``: the kernel's
    OOM killer acted in its worker's cgroup, and the worker was killed with every process in
    it. Only that task fails; the pool replaces the worker."""

    def __init__(
        self, message: str, *, limit: int, exitcode: int | None, signal: int | None
    ) -> None:
        super().__init__(message, exitcode=exitcode, signal=signal)
        #: the pool's ``memory_limit`` in bytes (only a pool with one raises this error)
        self.limit = limit


def _rebuild(cls: type[WorkerDiedError], message: str, state: dict[str, Any]) -> WorkerDiedError:
    exc = cls.__new__(cls, message)
    BrokenProcessPool.__init__(exc, message)
    exc.__dict__.update(state)
    return exc


class LauncherDiedError(BrokenProcessPool):
    """The pool's launcher is gone, so is every worker: the pool cannot serve any more."""


class PoolInitializerError(BrokenProcessPool):
    """The pool's ``initializer`` raised in a worker: the pool is broken, as in the stdlib."""


# Two plain class statements under a version check, not bases computed at run time: type
# checkers see a real class then (a computed base list makes it a subclass of Any for mypy,
# and any attribute on it would pass unchecked).
if sys.version_info >= (3, 11):

    class TaskTimeoutError(TimeoutError):
        """A task ran past its deadline; its worker and every process it started were killed."""

else:
    # 3.10's concurrent.futures has a TimeoutError of its own: be both, so that either
    # `except` catches it.
    class TaskTimeoutError(_futures.TimeoutError, TimeoutError):
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
