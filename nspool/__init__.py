"""nspool: a process pool whose workers cannot leak processes.

Every worker is PID 1 of its own PID namespace, so whatever a task starts dies with the task,
the worker, the pool or the program (even after ``kill -9``).
"""

from __future__ import annotations

from .errors import (
    BrokenProcessPool,
    LauncherDiedError,
    NamespaceError,
    PoolInitializerError,
    TaskPicklingError,
    TaskTimeoutError,
    TaskUnpicklingError,
    WorkerDiedError,
)
from .executor import NSFuture, NSPoolExecutor

__all__ = [
    "AsyncPool",
    "current_default_pool_limiter",
    "open_pool",
    "run_sync",
    "BrokenProcessPool",
    "LauncherDiedError",
    "NSFuture",
    "NSPoolExecutor",
    "NamespaceError",
    "PoolInitializerError",
    "TaskPicklingError",
    "TaskTimeoutError",
    "TaskUnpicklingError",
    "WorkerDiedError",
]
__version__ = "0.1.0"

_ASYNC_NAMES = ("AsyncPool", "current_default_pool_limiter", "open_pool", "run_sync")


def __getattr__(name: str) -> object:
    # The async front imports anyio; load it only for those who use it.
    if name in _ASYNC_NAMES:
        from . import aio

        return getattr(aio, name)
    raise AttributeError(f"module 'nspool' has no attribute {name!r}")
