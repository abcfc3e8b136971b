"""nspool as the process executor of every Dask worker.

::

    import dask
    from dask.distributed import Client
    from nspool.dask import NSPoolPlugin

    client = Client()
    client.register_plugin(NSPoolPlugin(task_timeout=600))   # name="nspool" by default
    with dask.annotate(executor="nspool"):
        results = client.gather(client.map(crunch, items))

``NSPoolPlugin(name="nspool", **executor_options)`` is a ``distributed.WorkerPlugin``. On every
worker, present and future, it puts an executor under ``name`` in ``worker.executors``: an
:class:`NSPoolExecutor` (``max_workers`` defaults to the worker's thread count,
``worker.state.nthreads``; every other option passes through), behind a thin front,
:class:`DaskNSPoolExecutor`, that knows which Dask key each running nspool task belongs to.
Tasks choose it with ``dask.annotate(executor=name)``. When the worker closes (or the plugin is
unregistered), the plugin's ``teardown`` kills the pool and everything its tasks started.

For workers started from a shell, ``dask worker SCHEDULER --preload nspool.dask`` installs the
same plugin (see :func:`dask_setup` for its ``--nspool-...`` options).

How a running Dask task is stopped
----------------------------------
Dask alone cannot stop a running task: ``Worker.execute`` hands it to the executor with
``loop.run_in_executor(executor, _run_task_simple, ts.run_spec, data, delay)`` and the worker's
state machine just marks the key ``cancelled`` until the call returns. nspool hooks in at
three points:

1. **Which key is this?** ``DaskNSPoolExecutor.submit`` is called synchronously from
   ``Worker.execute`` on the worker's event loop, with the task's ``run_spec`` as first
   argument. Since dask 2024.12 that is a ``dask._task_spec.Task`` that carries its ``.key``;
   the front checks it is the very ``run_spec`` of that key in ``worker.state.tasks`` and
   remembers key -> ``NSFuture``. (For older versions, where ``run_spec`` has no key, it falls
   back to the one key of this executor that ``Worker.execute`` has just added to
   ``worker.active_keys`` and that has no future yet; if that is ambiguous it does not track
   the task, which then runs to its end as under Dask alone.)
2. **Cancel, release, forget.** ``WorkerPlugin.transition(key, start, finish)`` is called
   by the worker's state machine with the state a task leaves and the state *asked for*.
   ``client.cancel(future)`` of a running task, or its key released or forgotten by the
   clients, reaches the worker as ``executing -> released`` (the task's state actually becomes
   ``cancelled``, since Dask cannot stop it; ``long-running`` likewise). On any move from
   ``executing``, ``long-running``, ``resumed`` or ``cancelled`` to ``released``,
   ``cancelled`` or ``forgotten``, the plugin calls ``NSFuture.kill(timeout=0)`` on the
   key's task: nspool kills it with its whole process tree at once (milliseconds), without
   blocking the event loop.
3. **Worker closing.** ``Worker.close`` first cancels its running ``execute`` coroutines; the
   asyncio future that ``run_in_executor`` wrapped around the front's future then cancels that
   future, and its callback kills the nspool task the same way. The plugin's ``teardown``
   then kills the pool. A worker killed outright (nanny restart, memory limit, ``kill -9``)
   takes its pool with it: nspool's launcher and workers die with the process that owns them.

The future of a task killed this way does not fail with ``CancelledError`` (asyncio would turn
it into a cancellation of the worker's own ``execute`` coroutine): for ``Worker.execute``'s
calls it resolves as if the task had raised ``distributed.Reschedule``, so the worker just
releases a cancelled key (and, should the scheduler have asked for the key again meanwhile,
it is computed again instead of failing). Other calls fail with :class:`DaskTaskKilled`.
Other nspool errors (a task that crashes its process, a ``task_timeout``) fail that task
only, as an ordinary error that Dask retries per its own rules.

Tested with distributed 2026.8.0 (dask 2026.8.0) on CPython 3.13. The transitions the plugin
sees for ``client.cancel`` of a running task there: ``executing -> released`` (kill); when
the killed task's future settles, ``cancelled -> rescheduled``; then ``released ->
forgotten``. Releasing the last future of a running key is stopped by the same hook
(tests/test_dask.py checks both within a second).
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable, Hashable
from concurrent.futures import CancelledError, Executor, Future, InvalidStateError
from typing import TYPE_CHECKING, Any, TypeVar

import click
from distributed import WorkerPlugin

from .executor import NSFuture, NSPoolExecutor

if TYPE_CHECKING:
    from distributed import Worker

__all__ = ["DaskNSPoolExecutor", "DaskTaskKilled", "NSPoolPlugin", "dask_setup"]

T = TypeVar("T")

#: Worker task states from which a running task is stopped (the task no longer wanted).
STOP_STATES = frozenset({"cancelled", "released", "forgotten"})
#: Worker task states in which the task's code may be running in the executor.
RUNNING_STATES = frozenset({"executing", "long-running", "resumed", "cancelled"})


class DaskTaskKilled(Exception):
    """The nspool task of a Dask key was killed because Dask no longer wants the key
    (cancelled, released, forgotten) or the worker closed."""


class DaskNSPoolExecutor(Executor):
    """The executor a Dask worker holds: an :class:`NSPoolExecutor` (``pool``) that knows
    which Dask key each running task belongs to, so that :meth:`kill_key` can stop it."""

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

    def running_keys(self) -> list[Hashable]:
        """The Dask keys whose task runs in this pool now."""
        with self._lock:
            return list(self._running)

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


@click.command()
@click.option(
    "--nspool-name",
    default="nspool",
    show_default=True,
    help="The executor's name, for dask.annotate(executor=NAME).",
)
@click.option(
    "--nspool-max-workers", type=int, help="nspool workers per Dask worker (default: its threads)."
)
@click.option("--nspool-task-timeout", type=float, help="A deadline in seconds for every task.")
@click.option("--nspool-preload", multiple=True, help="A module the launcher imports (repeatable).")
@click.option(
    "--nspool-kill-leftovers/--nspool-keep-leftovers",
    default=True,
    help="Kill what a task leaves running as soon as it ends (default), or keep it until "
    "its worker exits.",
)
@click.option(
    "--nspool-private-proc/--nspool-shared-proc",
    default=False,
    help="Give each nspool worker a /proc of its own.",
)
def dask_setup(
    worker: Any,
    nspool_name: str,
    nspool_max_workers: int | None,
    nspool_task_timeout: float | None,
    nspool_preload: tuple[str, ...],
    nspool_kill_leftovers: bool,
    nspool_private_proc: bool,
) -> Any:
    """``dask worker SCHEDULER --preload nspool.dask [--nspool-task-timeout 600 ...]``:
    install :class:`NSPoolPlugin` on a worker started from a shell. The options follow the
    preload on the command line (distributed hands them to this click command)."""
    from distributed import Worker

    if not isinstance(worker, Worker):
        raise TypeError("nspool.dask is a worker preload: use --preload, not --preload-nanny")
    options: dict[str, Any] = {
        "preload": nspool_preload,
        "kill_leftovers": nspool_kill_leftovers,
        "private_proc": nspool_private_proc,
    }
    if nspool_max_workers is not None:
        options["max_workers"] = nspool_max_workers
    if nspool_task_timeout is not None:
        options["task_timeout"] = nspool_task_timeout
    return worker.plugin_add(NSPoolPlugin(nspool_name, **options), catch_errors=False)
