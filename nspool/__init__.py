"""nspool: a process pool whose workers cannot leak processes.

Every worker is a PID namespace of its own, so whatever a task starts dies with the task,
the worker, the pool or the program (even after ``kill -9``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Names are loaded on first use: the launcher imports this package too, and must start fast
# (no concurrent.futures, multiprocessing or anyio in it).
_LAZY = {
    "NSPoolExecutor": "executor",
    "NSFuture": "executor",
    "AsyncPool": "aio",
    "current_default_pool_limiter": "aio",
    "open_pool": "aio",
    "run_sync": "aio",
    "BrokenProcessPool": "errors",
    "CgroupUnavailableError": "errors",
    "MemoryLimitError": "errors",
    "TaskUsage": "_core.usage",
    "LauncherDiedError": "errors",
    "NamespaceError": "errors",
    "PoolInitializerError": "errors",
    "TaskPicklingError": "errors",
    "TaskTimeoutError": "errors",
    "TaskUnpicklingError": "errors",
    "WorkerDiedError": "errors",
    "close_shared_launcher": "_core.shared_launcher",
}

__all__ = [
    "AsyncPool",
    "BrokenProcessPool",
    "CgroupUnavailableError",
    "LauncherDiedError",
    "MemoryLimitError",
    "NSFuture",
    "NSPoolExecutor",
    "NamespaceError",
    "PoolInitializerError",
    "TaskPicklingError",
    "TaskTimeoutError",
    "TaskUnpicklingError",
    "TaskUsage",
    "WorkerDiedError",
    "close_shared_launcher",
    "current_default_pool_limiter",
    "open_pool",
    "run_sync",
]

if TYPE_CHECKING:
    from ._core.shared_launcher import close_shared_launcher
    from ._core.usage import TaskUsage
    from .aio import AsyncPool, current_default_pool_limiter, open_pool, run_sync
    from .errors import (
        BrokenProcessPool,
        CgroupUnavailableError,
        LauncherDiedError,
        MemoryLimitError,
        NamespaceError,
        PoolInitializerError,
        TaskPicklingError,
        TaskTimeoutError,
        TaskUnpicklingError,
        WorkerDiedError,
    )
    from .executor import NSFuture, NSPoolExecutor


# Hidden from type checkers: they see the imports above, and a module-level __getattr__ would
# make them accept any name (`from nspool import NSPoolExecuter` typed as `object`).
if not TYPE_CHECKING:

    def __getattr__(name: str) -> object:
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module 'nspool' has no attribute {name!r}")
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
