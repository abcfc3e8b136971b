"""``NSPoolExecutor``: the ``concurrent.futures`` front of the pool.

One I/O thread per pool waits on every fd at once (control socket, each worker's result pipe,
task pipes with pending output, a wake-up pipe). ``submit`` pickles in the caller's thread and,
when a worker has room, writes the task straight to its pipe, so the common path has no thread
hop on the way out. Scheduling rules live in ``_core.pool.PoolCore``; process mechanics in
``_core.launcher_link`` and ``launcher/``.
"""

from __future__ import annotations

import enum
import itertools
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import CancelledError, Executor, Future, wait
from functools import partial
from typing import Any, Literal, ParamSpec, TypeVar

from ._core import serialize, sizes
from ._core.chunks import process_chunk
from ._core.driver import Completion, Conn
from ._core.io_thread import _IN_WORKER, _complete, _Engine
from ._core.launcher_link import LaunchConfig, cgroups_config
from ._core.pool import StopAction, Task
from ._core.usage import TaskUsage
from .errors import TaskPicklingError, WorkerDiedError

__all__ = ["NSPoolExecutor"]

T = TypeVar("T")
P = ParamSpec("P")


class _Default(enum.Enum):
    """``schedule``'s default deadline: a sentinel, since ``timeout=None`` means "none"."""

    POOL = "the pool's task_timeout"

    def __repr__(self) -> str:
        return f"<{self.value}>"  # what help() shows as the default


class NSFuture(Future[T]):
    """The future ``NSPoolExecutor`` returns: a stdlib ``Future`` plus :meth:`kill`."""

    # A weak reference: the task refers to this future, and a strong one back would make a
    # cycle that keeps every call's payload alive until the garbage collector runs.
    _nspool: tuple[_Engine, weakref.ref[Task]] | None = None
    #: what the task's process tree used (wall and CPU time, peak memory), once the future
    #: is done, on pools with resource limits or ``track_usage=True``; else None. Tasks
    #: that were killed (``kill()``, a deadline, a limit) have none.
    usage: TaskUsage | None = None

    def result(self, timeout: float | None = None) -> T:
        """As ``Future.result``; waiting for a task that a worker runs reads its result
        straight from the worker (see ``_Engine.try_lead``)."""
        if self._nspool is not None and not self.done():
            timeout = self._lead(timeout)
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """As ``Future.exception``, reading straight from the worker like :meth:`result`."""
        if self._nspool is not None and not self.done():
            timeout = self._lead(timeout)
        return super().exception(timeout)

    def _lead(self, timeout: float | None) -> float | None:
        """Wait for the outcome by reading the worker's result pipe in this thread while
        possible; returns the time left of ``timeout``."""
        assert self._nspool is not None
        engine, task_ref = self._nspool
        end = None if timeout is None else time.monotonic() + timeout
        conn: Conn | None = None
        try:
            while True:
                done: list[Completion] = []
                with engine.lock:
                    if conn is not None:
                        engine.read_led(conn, done)
                        task = task_ref()
                        if (
                            done
                            or task is None
                            or task.state not in _IN_WORKER
                            or conn.result_fd < 0
                            or conn.close_deferred
                        ):
                            # Settled, moved, the worker gone, or callbacks to run: never
                            # run them holding the pipe (one of them may wait on it).
                            engine.unlead(conn)
                            conn = None
                    if conn is None and not done and not self.done():
                        conn = engine.try_lead(task_ref())
                _complete(done)
                if conn is None:
                    if done and not self.done():
                        continue  # others' outcomes came first: lead again
                    break  # settled, or it must be waited for the usual way
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    break
                # A result, the pipe's end (the worker is gone) or an error wakes us.
                conn.poller.poll(None if left is None else max(1, int(left * 1000 + 0.999)))
        finally:
            if conn is not None:
                with engine.lock:
                    engine.unlead(conn)
        return None if end is None else max(0.0, end - time.monotonic())

    def kill(self, timeout: float | None = 10.0) -> bool:
        """Hard-cancel: stop this task even if it is running, and wait for the outcome.

        A queued task is cancelled (as by ``cancel()``). A task in a worker is stopped
        exactly: if it runs, its worker's init kills it with every process it started (the
        pool replaces the worker); if it waits in the worker behind others, the worker skips
        it. The future then fails with ``CancelledError``. If the task finished before the
        stop could take effect, the future keeps its result.

        Returns True if this call stopped the task, False if the task had already finished
        (or was stopped before). Waits at most ``timeout`` seconds (None: as long as it
        takes) for the outcome and raises ``TimeoutError`` if it is still unknown then; called
        from a callback on nspool's I/O thread it cannot wait and returns True once the stop
        is asked.
        """
        if self._nspool is None or self.done():
            return False
        engine, task_ref = self._nspool
        stop = CancelledError("the task was killed by Future.kill()")
        with engine.lock:
            task = task_ref()
            # No task: it left the pool and its future is being settled right now.
            how = StopAction.TOO_LATE if task is None else engine.kill_task(task, stop)
        if how is StopAction.DEQUEUED:
            # Never sent: settle it here (cancel() fails only if it was already claimed).
            _complete([(self, None, stop if task is not None and task.claimed else None)])
        elif threading.current_thread() is engine.thread:
            return how is StopAction.ASK_WORKER  # the outcome needs this thread: no waiting
        if not wait([self], timeout).done:
            raise TimeoutError(f"the task's stop had no outcome within {timeout} s")
        return self.cancelled() or self.exception() is stop


class NSPoolExecutor(Executor):
    """A ``concurrent.futures.Executor`` whose workers are each a PID namespace of their own.

    Drop-in for ``ProcessPoolExecutor``. Nothing a task starts outlives the task (unless
    ``kill_leftovers=False``), the worker, the pool, or the program, even after ``kill -9``.

    Args:
        max_workers: most worker processes at once (default: the usable CPU count).
        mp_context: accepted for drop-in compatibility and ignored: workers are always forked
            from the launcher, a fresh single-threaded interpreter.
        initializer, initargs: called in each worker before its first task; if it raises, the
            pool is broken (``PoolInitializerError``), as in the stdlib.
        max_tasks_per_child: replace a worker after it ran this many tasks.
        preload: modules imported once in the launcher so that workers start warm.
        kill_leftovers: kill what a task left running (daemons, un-waited ``Popen``) as soon as
            the task ends. With False, such processes live until their worker exits.
        private_proc: give each worker its own mount namespace and a /proc that shows only
            its own PID namespace (``ps`` and ``psutil`` in a task see only the task's tree).
        task_timeout: a deadline in seconds for every task, counted from when a worker starts
            it; a task past it is killed with its whole process tree and its future fails with
            ``TaskTimeoutError`` (a ``TimeoutError``). ``schedule(..., timeout=)`` replaces it
            for one task (``timeout=None``: no deadline for that task).
        max_batch: most tasks one worker may hold at once when tasks are short (they travel
            several to a write); 1 turns batching off, for workloads where fast and slow tasks
            mix and no task should wait behind another in a busy worker.
        start_timeout: seconds to wait for the launcher to come up.
        memory_limit: most memory (bytes, or a string like ``"512M"``) that one worker's
            whole process tree may use, the task and everything it starts, enforced by the
            kernel (cgroups). A task past it is killed with its tree and its future fails with
            ``MemoryLimitError``; the pool replaces the worker.
        pids_limit: most processes (threads count too, as the kernel counts them) a task's
            tree may hold at once, its own process included; past it ``fork`` fails in the
            task with ``EAGAIN`` (``BlockingIOError``).
        cpu_limit: CPU time a worker's tree may use, as a fraction of one CPU (``0.5``: half
            a CPU, ``2``: two CPUs); past it, the kernel throttles it.
        track_usage: measure each task's usage (``NSFuture.usage``) even without limits.
            Any limit turns it on too.
        max_result_size: the largest result (or exception) a task may send back, in bytes or
            a string like ``"4G"``; default: this machine's memory. A worker claiming more
            fails its task before the program makes room for it (and the pool replaces the
            worker), as does any byte on the result pipe that is not nspool's.

    Limits and usage need cgroups: root, or a delegated cgroup v2 subtree when unprivileged.
    Where they can't be had, the constructor raises ``CgroupUnavailableError`` saying why and
    how to get them; a pool never runs without a limit it was asked for.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: Any = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        max_tasks_per_child: int | None = None,
        preload: Iterable[str] = (),
        kill_leftovers: bool = True,
        private_proc: bool = False,
        task_timeout: float | None = None,
        max_batch: int = 64,
        start_timeout: float = 60.0,
        memory_limit: int | str | None = None,
        pids_limit: int | None = None,
        cpu_limit: float | None = None,
        track_usage: bool = False,
        max_result_size: int | str | None = None,
    ) -> None:
        init_payload = serialize.dump_initializer(initializer, initargs)
        if task_timeout is not None and task_timeout <= 0:
            raise ValueError("task_timeout must be None or > 0")
        result_limit = sizes.max_result_size(max_result_size)
        self._task_timeout = task_timeout
        config = LaunchConfig(
            preload=tuple(preload),
            kill_leftovers=kill_leftovers,
            private_proc=private_proc,
            cgroups=cgroups_config(memory_limit, pids_limit, cpu_limit, track_usage),
        )
        self._engine = _Engine(
            max_workers,
            max_tasks_per_child,
            init_payload,
            config,
            start_timeout,
            max_batch,
            result_limit,
        )
        self._max_workers = self._engine.core.max_workers  # as the stdlib pool names it
        weakref.finalize(self, self._engine.request_shutdown)

    # -- introspection ------------------------------------------------------------------------
    @property
    def launcher_pid(self) -> int:
        """PID of the launcher process that serves this pool (killing it kills every worker
        of every pool it serves: the program's pools share one, see the README)."""
        return self._engine.launcher.pid

    def worker_pids(self) -> list[int]:
        """PIDs (as this program sees them) of the workers that are up now."""
        with self._engine.lock:
            return [w.pid for w in self._engine.core.workers.values() if w.pid]

    # -- Executor API -------------------------------------------------------------------------
    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> NSFuture[T]:
        """Schedule ``fn(*args, **kwargs)``; an unpicklable call fails only its own future."""
        return self.schedule(fn, args, kwargs)

    def schedule(
        self,
        fn: Callable[..., T],
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timeout: float | None | Literal[_Default.POOL] = _Default.POOL,
    ) -> NSFuture[T]:
        """Like :meth:`submit`, with a deadline of its own: once a worker starts the task, it
        may run ``timeout`` seconds; then it is killed with every process it started and the
        future fails with ``TaskTimeoutError``. Without ``timeout``, the pool's
        ``task_timeout`` holds (as for :meth:`submit`); ``timeout=None``: no deadline for this
        task, whatever the pool's."""
        if timeout is _Default.POOL:
            timeout = self._task_timeout
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be None or > 0")
        engine = self._engine
        engine.check_open()  # early, unlocked: fail fast before pickling
        fut: NSFuture[T] = NSFuture()
        try:
            payload = serialize.dump_task(fn, tuple(args), kwargs or {})
        except TaskPicklingError as exc:
            fut.set_exception(exc)
            return fut
        task = Task(next(engine.task_ids), payload, fut, timeout=timeout)
        fut._nspool = (engine, weakref.ref(task))
        with engine.lock:
            engine.check_open()
            engine.enqueue(task)
        return fut

    def map(  # type: ignore[override,unused-ignore]
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
    ) -> Iterator[T]:
        """Like ``ProcessPoolExecutor.map`` (with 3.14's ``buffersize``): results in order;
        ``chunksize`` sends that many calls per task; ``buffersize`` bounds how many tasks are
        submitted ahead of the results consumed."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if buffersize is not None:
            if not isinstance(buffersize, int):
                raise TypeError("buffersize must be an integer or None")
            if buffersize < 1:
                raise ValueError("buffersize must be None or > 0")
        end_time = None if timeout is None else timeout + time.monotonic()
        args_iter: Iterator[tuple[Any, ...]] = zip(*iterables)  # noqa: B905 - map stops at the shortest
        call: Callable[..., Any] = fn
        if chunksize > 1:
            call = partial(process_chunk, fn)
            args_iter = ((chunk,) for chunk in _chunks(args_iter, chunksize))
        head = args_iter if buffersize is None else itertools.islice(args_iter, buffersize)
        fs = deque(self.submit(call, *args) for args in head)
        executor_ref = weakref.ref(self)

        def results() -> Iterator[Any]:
            # No reference to a future or a value may live across a ``yield``: the caller
            # decides when a result dies (as the stdlib's map does).
            try:
                while fs:
                    if buffersize is not None:
                        ex = executor_ref()
                        nxt = next(args_iter, None)
                        if ex is not None and nxt is not None:
                            fs.append(ex.submit(call, *nxt))
                        del ex, nxt
                    if chunksize > 1:
                        chunk = _result_or_cancel(fs.popleft(), end_time)
                        chunk.reverse()
                        while chunk:
                            yield chunk.pop()
                    else:
                        yield _result_or_cancel(fs.popleft(), end_time)
            finally:
                for f in fs:
                    f.cancel()

        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting tasks; with ``wait``, return once every task has finished and every
        process of the pool (and of its tasks) is gone."""
        self._engine.request_shutdown(cancel_futures)
        if wait:
            self._engine.join()

    def terminate_workers(self, grace: float = 2.0) -> None:
        """Stop every worker (3.14's API) and return at once, as the stdlib's does: queued
        tasks are cancelled, and every task in a worker fails now with ``WorkerDiedError`` (a
        ``BrokenProcessPool``; its result, should it still come, is dropped). Each task
        process gets SIGTERM; a worker still there ``grace`` seconds later (its task ignores
        or blocks SIGTERM) is killed whole by its init. The pool is shut down;
        ``shutdown(wait=True)`` (or leaving the ``with`` block) waits until its processes are
        gone."""
        if grace < 0:
            raise ValueError("grace must be >= 0")
        self._force(signal.SIGTERM, "terminate_workers()", grace)

    def kill_workers(self) -> None:
        """Like :meth:`terminate_workers` with SIGKILL, to every worker's whole tree at once."""
        self._force(signal.SIGKILL, "kill_workers()", None)

    def _force(self, sig: int, reason: str, grace: float | None) -> None:
        engine = self._engine
        with engine.lock:
            done = engine.kill_all(sig, reason, grace)
            # Failed now, not when their workers are gone: a task that ignores SIGTERM must not
            # keep its caller waiting, nor win with a result after the pool was stopped. The
            # tasks stay in their workers' books until those exit, where their late outcomes
            # find the futures settled and are dropped.
            for slot in engine.core.workers.values():
                done += [
                    (
                        task.handle,
                        None,
                        WorkerDiedError(
                            f"the task was in a worker (pid {slot.pid or '?'}) when {reason} "
                            f"stopped the pool's workers ({signal.Signals(sig).name})",
                            exitcode=None,
                            signal=sig,
                        ),
                    )
                    for task in slot.inflight
                ]
        _complete(done)
        self.shutdown(wait=False)

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            # One Ctrl-C stops everything now instead of waiting for running tasks.
            self.kill_workers()
        self.shutdown(wait=True)


def _result_or_cancel(fut: Future[T], end_time: float | None) -> T:
    """``fut``'s result by ``end_time``; a future given up on is cancelled (as the stdlib's)."""
    try:
        try:
            return fut.result(None if end_time is None else end_time - time.monotonic())
        finally:
            fut.cancel()
    finally:
        del fut  # the frame may outlive this call in a traceback


def _chunks(it: Iterator[T], size: int) -> Iterator[list[T]]:
    while chunk := list(itertools.islice(it, size)):
        yield chunk
