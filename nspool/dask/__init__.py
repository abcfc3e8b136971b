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

from ._plugin import DaskNSPoolExecutor, DaskTaskKilled, NSPoolPlugin
from ._preload import dask_setup  # what `--preload nspool.dask` looks for in this module

__all__ = ["DaskNSPoolExecutor", "DaskTaskKilled", "NSPoolPlugin", "dask_setup"]
