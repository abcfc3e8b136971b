"""``NSPoolExecutor``: the ``concurrent.futures`` front of the pool.

One I/O thread per pool waits on every fd at once (control socket, each worker's result pipe,
task pipes with pending output, a wake-up pipe). ``submit`` pickles in the caller's thread and,
when a worker has room, writes the task straight to its pipe, so the common path has no thread
hop on the way out. Scheduling rules live in ``_pool.PoolCore``; process mechanics in
``_launch`` and ``launcher/``.
"""

from __future__ import annotations

import itertools
import os
import selectors
import signal
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, InvalidStateError
from functools import partial
from typing import Any, TypeVar

from . import _serialize
from ._launch import LaunchConfig, Launcher
from ._pool import Actions, PoolCore, Task, WorkerSlot
from ._protocol import Ctl, Frame, FrameDecoder, Kind, encode_frame, encode_header
from .errors import (
    BrokenProcessPool,
    LauncherDiedError,
    PoolInitializerError,
    TaskPicklingError,
    WorkerDiedError,
    describe_wait_status,
)

__all__ = ["NSPoolExecutor"]

T = TypeVar("T")

# (future, kind, value): kind OK/ERR carry a payload to unpickle, None carries an exception
_Completion = tuple["Future[Any]", "Kind | None", Any]


def _default_workers() -> int:
    count = getattr(os, "process_cpu_count", os.cpu_count)() or 1
    return max(count, 1)


class _Conn:
    """The program's ends of one worker's pipes."""

    __slots__ = (
        "slot",
        "task_fd",
        "result_fd",
        "decoder",
        "out",
        "writing",
        "close_after",
        "kill_reason",
    )

    def __init__(self, slot: WorkerSlot, task_fd: int, result_fd: int) -> None:
        self.slot = slot
        self.task_fd = task_fd
        self.result_fd = result_fd
        self.decoder = FrameDecoder()
        self.out: deque[memoryview] = deque()
        self.writing = False  # task_fd registered for EVENT_WRITE
        self.close_after = False  # close task_fd once ``out`` is written
        self.kill_reason: str | None = None


class _Engine:
    """Everything the I/O thread touches; the executor object only holds a reference to it, so
    an executor that is garbage-collected without shutdown still lets the thread finish."""

    def __init__(
        self,
        max_workers: int,
        max_tasks_per_child: int | None,
        init_payload: bytes | None,
        config: LaunchConfig,
        start_timeout: float,
    ) -> None:
        self.lock = threading.Lock()
        self.core = PoolCore(
            max_workers, max_tasks_per_child=max_tasks_per_child, claim=self._claim
        )
        self.init_payload = init_payload
        self.launcher = Launcher(config, start_timeout)
        self.conns: dict[int, _Conn] = {}
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.wake_pending = False
        self.shutdown_requested = False
        self.broken: BrokenProcessPool | None = None
        self.task_ids = itertools.count(1)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.wake_r, selectors.EVENT_READ, None)
        self.sel.register(self.launcher.fileno(), selectors.EVENT_READ, self.launcher)
        self.thread = threading.Thread(target=self._run, name="nspool-io", daemon=True)
        self.thread.start()
        _live_engines.add(self)

    # -- called from user threads (with self.lock held) ---------------------------------------
    @staticmethod
    def _claim(task: Task) -> bool:
        return bool(task.handle.set_running_or_notify_cancel())

    def wake(self) -> None:
        if not self.wake_pending:
            self.wake_pending = True
            try:
                os.write(self.wake_w, b"!")
            except BlockingIOError:
                pass

    def check_open(self) -> None:
        if self.broken is not None:
            raise type(self.broken)(str(self.broken))
        if self.shutdown_requested:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def enqueue(self, task: Task) -> None:
        core = self.core
        core.submit(task)
        actions = core.schedule(time.monotonic(), spawn=False)
        if actions:
            self._perform(actions)
        if core.queue and len(core.workers) < core.max_workers:
            self.wake()  # the I/O thread spawns workers

    def kill_all(self, sig: int, reason: str) -> list[_Completion]:
        """Signal every worker; fail their tasks and cancel the queued ones."""
        done: list[_Completion] = []
        for task in self.core.drain_all():
            if task.started:
                exc = WorkerDiedError(
                    f"the task's worker was stopped by {reason}", exitcode=None, signal=sig
                )
                done.append((task.handle, None, exc))
            else:
                task.handle.cancel()
        for conn in self.conns.values():
            conn.kill_reason = reason
            self.launcher.kill(conn.slot.wid, sig)
        return done

    # -- writing --------------------------------------------------------------------------------
    def _perform(self, actions: Actions) -> None:
        for slot, tasks in actions.send:
            conn = self.conns[slot.wid]
            for task in tasks:
                conn.out.append(memoryview(encode_header(Kind.TASK, task.id, len(task.payload))))
                conn.out.append(memoryview(task.payload))
            self._flush(conn)
        for slot in actions.close:
            conn = self.conns[slot.wid]
            conn.close_after = True
            self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        out = conn.out
        while out:
            try:
                n = os.writev(conn.task_fd, list(itertools.islice(out, 0, 512)))
            except BlockingIOError:
                break
            except OSError:  # EPIPE: the worker is gone; its EXITED message will follow
                out.clear()
                self.launcher.kill(conn.slot.wid, signal.SIGKILL)
                break
            while n:
                head = out[0]
                if n >= len(head):
                    n -= len(head)
                    out.popleft()
                else:
                    out[0] = head[n:]
                    n = 0
        if out and not conn.writing:
            self.wake()  # the I/O thread watches for room in the pipe
        if not out and conn.close_after and conn.task_fd >= 0:
            if conn.writing and threading.current_thread() is self.thread:
                self.sel.unregister(conn.task_fd)
                conn.writing = False
            if not conn.writing:
                os.close(conn.task_fd)
                conn.task_fd = -1

    # -- the I/O thread -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                events = self.sel.select()
                done: list[_Completion] = []
                with self.lock:
                    for key, mask in events:
                        what = key.data
                        if what is None:
                            self._drain_wake()
                        elif what is self.launcher:
                            self._on_control(done)
                        elif mask & selectors.EVENT_READ:
                            self._on_readable(what, done)
                        else:
                            self._flush(what[0])
                    finished = self._step(done)
                _complete(done)
                if finished:
                    break
        except BaseException as exc:  # noqa: BLE001 - a bug here must not hang the program
            with self.lock:
                if self.broken is None:
                    self.broken = LauncherDiedError(f"nspool's I/O thread failed: {exc!r}")
            raise
        finally:
            self._teardown()

    def _drain_wake(self) -> None:
        self.wake_pending = False
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _step(self, done: list[_Completion]) -> bool:
        """Schedule, start workers, fix fd interest; True when the thread should finish."""
        if self.broken is None:
            actions = self.core.schedule(time.monotonic())
            for slot in actions.spawn:
                try:
                    task_fd, result_fd = self.launcher.spawn(slot.wid)
                except OSError as exc:
                    self._break(LauncherDiedError(f"cannot reach the launcher: {exc}"), done)
                    return True
                conn = _Conn(slot, task_fd, result_fd)
                self.conns[slot.wid] = conn
                self.sel.register(result_fd, selectors.EVENT_READ, conn)
                if self.init_payload is not None:
                    conn.out.append(memoryview(encode_frame(Kind.INIT, 0, self.init_payload)))
            self._perform(actions)
            for conn in self.conns.values():
                if conn.out and not conn.writing:
                    self._flush(conn)
                want = bool(conn.out)
                if want != conn.writing:
                    if want:
                        self.sel.register(conn.task_fd, selectors.EVENT_WRITE, (conn,))
                    else:
                        self.sel.unregister(conn.task_fd)
                    conn.writing = want
                    self._flush(conn)
        if self.broken is not None:
            return True
        return self.shutdown_requested and self.core.idle

    def _on_readable(self, conn: _Conn, done: list[_Completion]) -> None:
        decoder = conn.decoder
        for _ in range(64):
            try:
                n = os.readv(conn.result_fd, [decoder.get_buffer()])
            except BlockingIOError:
                break
            if n == 0:
                # The worker closed its result pipe: it is exiting, or a task closed the fd.
                # Make sure it is gone; EXITED then settles its tasks.
                self.sel.unregister(conn.result_fd)
                os.close(conn.result_fd)
                conn.result_fd = -1
                self.launcher.kill(conn.slot.wid, signal.SIGKILL)
                break
            decoder.buffer_updated(n)
        now = time.monotonic()
        while (frame := decoder.next_frame()) is not None:
            self._on_frame(conn, frame, now, done)

    def _on_frame(self, conn: _Conn, frame: Frame, now: float, done: list[_Completion]) -> None:
        kind = frame.kind
        if kind is Kind.OK or kind is Kind.ERR:
            task = self.core.on_result(conn.slot.wid, frame.ident, now)
            done.append((task.handle, kind, frame.payload))
        elif kind is Kind.READY:
            self.core.on_ready(conn.slot.wid, frame.ident, now)
        elif kind is Kind.INIT_FAILED:
            tb = bytes(frame.payload).decode("utf-8", "replace")
            self._break(
                PoolInitializerError(
                    "A process in the process pool failed in its initializer; the pool is "
                    f"not usable anymore. The initializer's traceback:\n{tb}"
                ),
                done,
            )

    def _on_control(self, done: list[_Completion]) -> None:
        msgs, eof = self.launcher.receive()
        for msg in msgs:
            if msg.kind is Ctl.EXITED:
                self._on_exit(msg.wid, msg.value, done)
            elif msg.kind is Ctl.SPAWN_FAILED:
                self._on_exit(msg.wid, None, done, msg.text)
        if eof and self.broken is None:
            how = self.launcher.exit_description()
            self._break(
                LauncherDiedError(
                    f"the pool's launcher (pid {self.launcher.pid}) {how}; every worker "
                    "died with it, so the pool is not usable anymore"
                ),
                done,
            )

    def _on_exit(
        self, wid: int, status: int | None, done: list[_Completion], text: str = ""
    ) -> None:
        conn = self.conns.pop(wid, None)
        if conn is None:
            return
        if conn.result_fd >= 0:
            # Results written just before the exit are still in the pipe: read them first.
            self._on_readable(conn, done)
            if conn.result_fd >= 0:
                self.sel.unregister(conn.result_fd)
                os.close(conn.result_fd)
        if conn.task_fd >= 0:
            if conn.writing:
                self.sel.unregister(conn.task_fd)
            os.close(conn.task_fd)
        outcome = self.core.on_exit(wid)
        if status is None:
            how, code, sig = f"could not be started ({text})", None, None
        else:
            code, sig, how = describe_wait_status(status)
        if conn.kill_reason:
            how += f" (stopped by {conn.kill_reason})"
        if outcome.lost is not None:
            pid = conn.slot.pid or "?"
            exc = WorkerDiedError(
                f"the worker (pid {pid}) running this task {how}; the pool replaced it",
                exitcode=code,
                signal=sig,
            )
            done.append((outcome.lost.handle, None, exc))
        if self.core.startup_failing and self.broken is None:
            self._break(
                LauncherDiedError(f"workers keep dying during start-up: the last one {how}"),
                done,
            )

    def _break(self, exc: BrokenProcessPool, done: list[_Completion]) -> None:
        self.broken = exc
        for task in self.core.drain_all():
            done.append((task.handle, None, exc))

    def _teardown(self) -> None:
        with self.lock:
            self.shutdown_requested = True
            leftover = self.core.drain_all()
            conns = list(self.conns.values())
            self.conns.clear()
        for conn in conns:
            for fd in (conn.task_fd, conn.result_fd):
                if fd >= 0:
                    os.close(fd)
        self.sel.close()
        self.launcher.close()  # waits until the launcher and everything under it is gone
        os.close(self.wake_r)
        os.close(self.wake_w)
        err = self.broken or BrokenProcessPool("the pool shut down before the task ran")
        _complete([(t.handle, None, err) for t in leftover])
        _live_engines.discard(self)

    # -- shutdown -----------------------------------------------------------------------------
    def request_shutdown(self, cancel_futures: bool = False) -> None:
        with self.lock:
            self.shutdown_requested = True
            cancelled = self.core.cancel_queued() if cancel_futures else []
            if self.thread.is_alive():
                self.wake()
        for task in cancelled:
            task.handle.cancel()

    def join(self) -> None:
        if threading.current_thread() is not self.thread:
            self.thread.join()


def _complete(done: list[_Completion]) -> None:
    """Settle futures outside the lock (their callbacks may call back into the pool)."""
    for fut, kind, value in done:
        try:
            if kind is Kind.OK:
                try:
                    result = _serialize.load_result(value)
                except Exception as exc:  # noqa: BLE001
                    fut.set_exception(exc)
                else:
                    fut.set_result(result)
            elif kind is Kind.ERR:
                fut.set_exception(_serialize.load_error(value))
            else:
                fut.set_exception(value)
        except InvalidStateError:
            pass  # cancelled meanwhile


_live_engines: weakref.WeakSet[_Engine] = weakref.WeakSet()


def _python_exit() -> None:
    """At interpreter exit, finish pools like the stdlib does; after an uncaught Ctrl-C, kill
    their workers instead of waiting for tasks that nobody will read."""
    interrupted = isinstance(getattr(sys, "last_value", None), KeyboardInterrupt)
    engines = list(_live_engines)
    for engine in engines:
        if interrupted:
            with engine.lock:
                done = engine.kill_all(signal.SIGKILL, "Ctrl-C")
            _complete(done)
        engine.request_shutdown()
    for engine in engines:
        engine.join()


if hasattr(threading, "_register_atexit"):
    threading._register_atexit(_python_exit)  # runs before non-daemon threads are joined
else:  # pragma: no cover
    import atexit

    atexit.register(_python_exit)


def _process_chunk(fn: Callable[..., Any], chunk: list[tuple[Any, ...]]) -> list[Any]:
    return [fn(*args) for args in chunk]


class NSPoolExecutor(Executor):
    """A ``concurrent.futures.Executor`` whose workers are PID 1 of their own PID namespace.

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
        start_timeout: seconds to wait for the launcher to come up.
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
        start_timeout: float = 60.0,
    ) -> None:
        if max_workers is None:
            max_workers = _default_workers()
        elif max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if max_tasks_per_child is not None and (
            not isinstance(max_tasks_per_child, int) or max_tasks_per_child < 1
        ):
            raise ValueError("max_tasks_per_child must be >= 1")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        init_payload = None
        if initializer is not None:
            try:
                init_payload = _serialize.dumps((initializer, tuple(initargs)))
            except Exception as exc:
                raise TaskPicklingError(
                    f"cannot pickle the initializer or its arguments: {exc}"
                ) from exc
        self._max_workers = max_workers
        config = LaunchConfig(preload=tuple(preload), kill_leftovers=kill_leftovers)
        self._engine = _Engine(
            max_workers, max_tasks_per_child, init_payload, config, start_timeout
        )
        weakref.finalize(self, self._engine.request_shutdown)

    # -- introspection ------------------------------------------------------------------------
    @property
    def launcher_pid(self) -> int:
        """PID of the launcher process (killing it kills every worker)."""
        return self._engine.launcher.pid

    def worker_pids(self) -> list[int]:
        """PIDs (as this program sees them) of the workers that are up now."""
        with self._engine.lock:
            return [w.pid for w in self._engine.core.workers.values() if w.pid]

    # -- Executor API -------------------------------------------------------------------------
    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)``; an unpicklable call fails only its own future."""
        engine = self._engine
        with engine.lock:
            engine.check_open()
        fut: Future[T] = Future()
        try:
            payload = _serialize.dump_task(fn, args, kwargs)
        except TaskPicklingError as exc:
            fut.set_exception(exc)
            return fut
        with engine.lock:
            engine.check_open()
            engine.enqueue(Task(next(engine.task_ids), payload, fut))
        return fut

    def map(  # type: ignore[override]
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
            call = partial(_process_chunk, fn)
            args_iter = ((chunk,) for chunk in _chunks(args_iter, chunksize))
        head = args_iter if buffersize is None else itertools.islice(args_iter, buffersize)
        fs = deque(self.submit(call, *args) for args in head)
        executor_ref = weakref.ref(self)

        def results() -> Iterator[Any]:
            try:
                while fs:
                    fut = fs.popleft()
                    if buffersize is not None:
                        ex = executor_ref()
                        nxt = next(args_iter, None)
                        if ex is not None and nxt is not None:
                            fs.append(ex.submit(call, *nxt))
                    if end_time is None:
                        value = fut.result()
                    else:
                        value = fut.result(end_time - time.monotonic())
                    if chunksize > 1:
                        yield from value
                    else:
                        yield value
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

    def terminate_workers(self) -> None:
        """Stop every worker with SIGTERM (3.14 API), failing running tasks and cancelling
        queued ones, then shut the pool down and wait until it is gone."""
        self._force(signal.SIGTERM, "terminate_workers()")

    def kill_workers(self) -> None:
        """Like :meth:`terminate_workers` with SIGKILL."""
        self._force(signal.SIGKILL, "kill_workers()")

    def _force(self, sig: int, reason: str) -> None:
        engine = self._engine
        with engine.lock:
            done = engine.kill_all(sig, reason)
        _complete(done)
        self.shutdown(wait=True)

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            # One Ctrl-C stops everything now instead of waiting for running tasks.
            self.kill_workers()
        else:
            self.shutdown(wait=True)


def _chunks(it: Iterator[T], size: int) -> Iterator[list[T]]:
    while chunk := list(itertools.islice(it, size)):
        yield chunk
