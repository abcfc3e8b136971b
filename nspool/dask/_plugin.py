"""The Dask worker plugin and the executor it gives each worker: ``NSPoolPlugin`` and
``DaskNSPoolExecutor`` (the package docstring, ``nspool/dask/__init__.py``, says how they stop
a running task)."""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable, Hashable
from concurrent.futures import CancelledError, Executor, Future, InvalidStateError
from typing import TYPE_CHECKING, Any, TypeVar

from distributed import WorkerPlugin

from ..executor import NSFuture, NSPoolExecutor

if TYPE_CHECKING:
    from distributed import Worker

__all__ = ["DaskNSPoolExecutor", "DaskTaskKilled", "NSPoolPlugin"]

T = TypeVar("T")

#: Worker task states from which a running task is stopped (the task no longer wanted).
STOP_STATES = frozenset({"cancelled", "released", "forgotten"})
#: Worker task states in which the task's code may be running in the executor.
RUNNING_STATES = frozenset({"executing", "long-running", "resumed", "cancelled"})


class DaskTaskKilled(Exception):
    """The nspool task of a Dask key was killed because Dask no longer wants the key
    (cancelled, released, forgotten) or the worker closed."""

    # Public as nspool.dask.DaskTaskKilled, as the other classes here: tracebacks and reprs
    # name them so, and pickle finds them there (the package re-exports them).
    __module__ = "nspool.dask"


class DaskNSPoolExecutor(Executor):
    """The executor a Dask worker holds: an :class:`NSPoolExecutor` (``pool``) that knows
    which Dask key each running task belongs to, so that :meth:`kill_key` can stop it."""

    __module__ = "nspool.dask"

    def __init__(self, worker: Worker, name: str, **options: Any) -> None:
        options.setdefault("max_workers", worker.state.nthreads)
        self.name = name
        self.pool = NSPoolExecutor(**options)
        self._worker = weakref.ref(worker)
        self._lock = threading.Lock()
        self._running: dict[Hashable, NSFuture[Any]] = {}

    # -- Executor API -------------------------------------------------------------------------
    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Run ``fn(*args, **kwargs)`` in the pool. Returns a plain future that fails with
        :class:`DaskTaskKilled` (not ``CancelledError``) when the task is killed; cancelling
        the returned future kills the running task."""
        from_dask = getattr(fn, "__module__", None) == "distributed.worker"
        key = self._dask_key(fn, args) if from_dask else None
        inner = self.pool.submit(fn, *args, **kwargs)
        outer: Future[T] = Future()
        if key is not None:
            with self._lock:
                self._running[key] = inner

        def settle(f: Future[T]) -> None:
            if key is not None:
                with self._lock:
                    if self._running.get(key) is f:
                        del self._running[key]
            try:
                if f.cancelled():
                    outer.set_exception(DaskTaskKilled(f"task {key!r} was cancelled"))
                    return
                exc = f.exception()
                if isinstance(exc, CancelledError) and from_dask:
                    outer.set_result(_rescheduled())  # type: ignore[arg-type]
                elif isinstance(exc, CancelledError):
                    killed = DaskTaskKilled(f"task {key!r} was killed with its process tree")
                    killed.__cause__ = exc
                    outer.set_exception(killed)
                elif exc is not None:
                    outer.set_exception(exc)
                else:
                    outer.set_result(f.result())
            except InvalidStateError:
                pass  # the outer future was cancelled meanwhile

        def cancelled(o: Future[T]) -> None:
            if o.cancelled():  # asyncio cancelled the execute() coroutine (worker closing)
                _kill_now(inner)

        outer.add_done_callback(cancelled)
        inner.add_done_callback(settle)
        return outer

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.pool.shutdown(wait=wait, cancel_futures=cancel_futures)

    def kill_workers(self) -> None:
        """Kill every task and worker of the pool, then wait until all are gone."""
        self.pool.kill_workers()

    # -- keys ---------------------------------------------------------------------------------
    def kill_key(self, key: Hashable) -> bool:
        """Stop the task running for ``key``, with its process tree, without waiting.
        Returns True if there was such a task still running."""
        with self._lock:
            fut = self._running.get(key)
        return fut is not None and _kill_now(fut)

    def _dask_key(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Hashable | None:
        """The key ``Worker.execute`` runs this call for, or None if it is not such a call
        or it cannot be told for sure."""
        worker = self._worker()
        if worker is None or not args:
            return None
        tasks = worker.state.tasks
        run_spec = args[0]
        key = getattr(run_spec, "key", None)
        if key is not None:
            ts = tasks.get(key)
            return key if ts is not None and ts.run_spec is run_spec else None
        # Older distributed: the one key of this executor just marked active with no future.
        with self._lock:
            candidates = [
                k
                for k in worker.active_keys
                if k not in self._running
                and k in tasks
                and (tasks[k].annotations or {}).get("executor", "default") == self.name
            ]
        return candidates[0] if len(candidates) == 1 else None


def _rescheduled() -> dict[str, Any]:
    """What ``Worker.execute`` expects back from ``_run_task_simple`` for a task that raised
    ``distributed.Reschedule``: the key is released (a cancelled one) or computed again (one
    the scheduler wants back meanwhile), never reported as an error. Should that private
    format change, ``Worker.execute`` fails on it and reports an ordinary task failure."""
    from distributed import Reschedule

    return {
        "op": "task-erred",
        "status": "error",
        "actual_exception": Reschedule(),
        "thread": threading.get_ident(),
    }


def _kill_now(fut: NSFuture[Any]) -> bool:
    """Ask nspool to stop ``fut``'s task now; never waits for the outcome."""
    if fut.done():
        return False
    try:
        return fut.kill(timeout=0)
    except TimeoutError:
        return True  # the stop is under way: the worker's init kills the task tree


class NSPoolPlugin(WorkerPlugin):
    """Gives every Dask worker an :class:`NSPoolExecutor` under ``name`` in
    ``worker.executors`` (route tasks to it with ``dask.annotate(executor=name)``).

    ``executor_options`` go to ``NSPoolExecutor`` (``max_workers`` defaults to the worker's
    thread count). A running task is killed with its process tree when Dask cancels,
    releases or forgets its key, and the pool is killed when the worker closes.
    """

    __module__ = "nspool.dask"

    def __init__(self, name: str = "nspool", **executor_options: Any) -> None:
        if name == "default":
            raise ValueError(
                "name='default' would replace the worker's own thread pool, which Dask "
                "needs for its internal work; pick another name"
            )
        self.name = name  # also the plugin's name: registering again replaces it
        self.executor_options = executor_options
        self._executor: DaskNSPoolExecutor | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name, "executor_options": self.executor_options, "_executor": None}

    def setup(self, worker: Worker) -> None:
        old = worker.executors.get(self.name)
        if isinstance(old, DaskNSPoolExecutor):
            old.kill_workers()
        ex = DaskNSPoolExecutor(worker, self.name, **self.executor_options)
        self._executor = ex
        worker.executors[self.name] = ex

    async def teardown(self, worker: Worker) -> None:
        ex, self._executor = self._executor, None
        if ex is None:
            return
        if worker.executors.get(self.name) is ex:
            del worker.executors[self.name]  # else Worker.close would shut it down again
        await asyncio.to_thread(ex.kill_workers)

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        ex = self._executor
        if ex is not None and finish in STOP_STATES and start in RUNNING_STATES:
            ex.kill_key(key)
