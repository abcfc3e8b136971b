"""The executor's I/O thread: ``_Engine``, the pool driver plus one thread that waits on every
fd at once (the control socket, each worker's result pipe, task pipes with pending output, a
wake-up pipe), and the readers that wait in ``NSFuture.result()`` (leader/follower).

``NSPoolExecutor`` (``nspool.executor``) holds an engine; ``_complete`` settles futures outside
the engine's lock; ``_python_exit`` finishes every live engine at the interpreter's exit.
"""

from __future__ import annotations

import os
import select
import selectors
import signal
import sys
import threading
import traceback
import weakref
from concurrent.futures import CancelledError, InvalidStateError

from ..errors import BrokenProcessPool, TaskUnpicklingError
from . import serialize
from .driver import Completion, Conn, PoolDriver
from .launcher_link import LaunchConfig
from .pool import PoolCore, Task, TState
from .protocol import Kind
from .shared_launcher import connect

#: a task in these states has a worker, whose result pipe will answer it
_IN_WORKER = (TState.SENT, TState.STOPPING)


class _Engine(PoolDriver):
    """The driver plus the I/O thread. The executor object only holds a reference to it, so
    an executor that is garbage-collected without shutdown still lets the thread finish."""

    def __init__(
        self,
        max_workers: int | None,
        max_tasks_per_child: int | None,
        init_payload: bytes | None,
        config: LaunchConfig,
        start_timeout: float,
        max_batch: int,
        max_result_size: int,
    ) -> None:
        core = PoolCore(
            max_workers,
            max_tasks_per_child=max_tasks_per_child,
            claim=self._claim,
            max_batch=max_batch,
        )
        super().__init__(core, connect(config, start_timeout), init_payload, max_result_size)
        # Re-entrant: a garbage-collected executor asks for shutdown from wherever the
        # collection ran, possibly the I/O thread while it holds this lock.
        self.lock = threading.RLock()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.wake_pending = False
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.wake_r, selectors.EVENT_READ, None)
        self.sel.register(self.launcher.fileno(), selectors.EVENT_READ, self.launcher)
        self.control_writing = False  # also waiting for room in the control socket
        self.thread = threading.Thread(target=self._run, name="nspool-io", daemon=True)
        self.thread.start()
        _live_engines.add(self)

    def forget_in_child(self) -> None:
        """Also, in a forked child: the I/O thread does not exist here, and a lock it held at
        the fork would stay held for ever, so take a fresh lock and leave the exit handler
        alone: the child exits at once and never touches the parent's pool."""
        super().forget_in_child()
        self.lock = threading.RLock()
        _live_engines.discard(self)

    # -- called from user threads (with self.lock held) ---------------------------------------
    @staticmethod
    def _claim(task: Task) -> bool:
        return bool(task.handle.set_running_or_notify_cancel())

    def wake(self) -> None:
        # wake_w is -1 once the I/O thread has ended (its number may name another file by now)
        if not self.wake_pending and self.wake_w >= 0:
            self.wake_pending = True
            try:
                os.write(self.wake_w, b"!")
            except BlockingIOError:
                pass

    def enqueue(self, task: Task) -> None:
        """Queue a task and, when a worker has room, write it from this thread right away."""
        core = self.core
        backlog = bool(core.queue)
        core.submit(task)
        if not backlog:
            # With a backlog every worker is already full (the I/O thread hands out more as
            # results arrive): queueing is all there is to do, so 20,000 submits stay O(1).
            done: list[Completion] = []
            self.step(done, spawn=False)
            assert not done  # only spawning can fail the pool
        if core.queue and core.can_grow():
            self.wake()  # the I/O thread starts workers

    # -- hooks ------------------------------------------------------------------------------------
    def _watch_result(self, conn: Conn) -> None:
        self.sel.register(conn.result_fd, selectors.EVENT_READ, conn)

    def _want_write(self, conn: Conn) -> None:
        if threading.current_thread() is self.thread:
            self.sel.register(conn.task_fd, selectors.EVENT_WRITE, (conn,))
            conn.writing = True
        else:
            self.wake()  # the I/O thread picks the conn up in its next round

    def _release_fd(self, fd: int) -> None:
        try:
            self.sel.unregister(fd)
        except KeyError:
            pass

    def _want_control_write(self) -> None:
        if threading.current_thread() is not self.thread:
            self.wake()  # the I/O thread sees the outbox at the end of its next round

    def _watch_control(self) -> None:
        """Wait for room in the control socket exactly while the launcher's outbox is full."""
        want = bool(self.launcher.outbox)
        if want != self.control_writing and not self.launcher.closed:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
            self.sel.modify(self.launcher.fileno(), events, self.launcher)
            self.control_writing = want

    # -- the I/O thread -------------------------------------------------------------------------
    def _run(self) -> None:
        done: list[Completion] = []
        try:
            while True:
                events = self.sel.select()
                done = []
                with self.lock:
                    for key, mask in events:
                        what = key.data
                        if what is None:
                            self._drain_wake()
                        elif what is self.launcher:
                            if mask & selectors.EVENT_WRITE:
                                self.launcher.flush()
                            if mask & selectors.EVENT_READ:
                                self.on_control(done)
                        elif isinstance(what, Conn):
                            # A pipe a waiting thread reads (it took it after this select
                            # returned) is left to that thread: its poll would miss the data.
                            if what.result_fd >= 0 and what.reader is None:
                                self.on_readable(what, done)
                        else:  # room in a task pipe
                            conn = what[0]
                            self.sel.unregister(conn.task_fd)
                            conn.writing = False
                            self.flush(conn)
                    for conn in list(self.conns.values()):
                        if conn.out and not conn.writing:
                            self.flush(conn)
                    self.step(done)
                    self._watch_control()
                    finished = self.broken is not None or (
                        self.shutdown_requested and self.core.idle
                    )
                _complete(done)
                done = []  # a future kept here would keep its result alive while we wait
                if finished:
                    break
        except BaseException as exc:  # noqa: BLE001 - a bug here must not hang the program
            with self.lock:
                if self.broken is None:
                    self.broken = BrokenProcessPool(
                        f"nspool's I/O thread failed, so the pool stopped (a bug in nspool; "
                        f"please report it): {type(exc).__name__}: {exc}"
                    )
            _complete(done)  # what it had learned still settles (InvalidStateError if twice)
            raise
        finally:
            self._teardown()

    # -- a waiting caller reads its result itself (leader/follower) ---------------------------
    # (Only that thread reads a pipe it took: were the I/O thread to read the data its poll
    # waits for, nothing would wake it. A task settled any other way is one whose worker
    # died, which ends the pipe, and that wakes the poll too.)
    # A thread that waits in ``NSFuture.result()`` for a task a worker has takes that worker's
    # result pipe from the I/O thread's selector, waits on it in ``poll`` and reads and settles
    # what comes, itself, under the lock. The common path (one call at a time) then has no
    # thread hop: the worker's write wakes the caller directly, as in a plain pipe. Only one
    # thread reads a pipe at a time (``Conn.reader``); a pipe that must close meanwhile is
    # closed by that thread (``Conn.close_deferred``), and whatever settles a task another
    # way (its worker's exit, a stop, a broken pool) also ends or closes its pipe, which
    # wakes the reader. No reader ever runs callbacks while it holds a pipe.

    def try_lead(self, task: Task | None) -> Conn | None:
        """Take ``task``'s worker's result pipe from the I/O thread (lock held); None when
        that can't be (the task is queued or done, another thread reads that pipe, this is
        the I/O thread, or the pool is broken or a child's)."""
        if task is None or task.state not in _IN_WORKER or self.broken is not None:
            return None
        conn = self.conns.get(task.wid)
        if conn is None or conn.reader is not None or conn.result_fd < 0:
            return None
        me = threading.current_thread()
        if me is self.thread:
            return None
        conn.reader = me
        self._release_fd(conn.result_fd)
        if conn.poller is None:
            conn.poller = select.poll()
            conn.poller.register(conn.result_fd, select.POLLIN)
        return conn

    def read_led(self, conn: Conn, done: list[Completion]) -> None:
        """Read what the worker sent, as the I/O thread would (lock held)."""
        try:
            if conn.result_fd >= 0 and not conn.close_deferred:
                self.on_readable(conn, done)
            self.step(done, spawn=False)
        except Exception as exc:  # noqa: BLE001 - a bug in nspool: stop the pool, say so
            traceback.print_exc()  # the I/O thread's own failure shows the same way
            if self.broken is None:
                self.break_pool(
                    BrokenProcessPool(
                        f"nspool's I/O failed in a thread waiting for a result, so the pool "
                        f"stopped (a bug in nspool; please report it): "
                        f"{type(exc).__name__}: {exc}"
                    ),
                    done,
                )
        core = self.core
        if (
            self.broken is not None
            or self.shutdown_requested
            or self.launcher.outbox
            or (core.queue and core.can_grow())
        ):
            self.wake()  # the I/O thread starts workers, or finishes the pool

    def unlead(self, conn: Conn) -> None:
        """Give the result pipe back to the I/O thread, or close it if it had to close."""
        conn.reader = None
        if conn.close_deferred:
            self._close_result(conn)
        elif conn.result_fd >= 0:
            self.sel.register(conn.result_fd, selectors.EVENT_READ, conn)

    def _drain_wake(self) -> None:
        self.wake_pending = False
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _teardown(self) -> None:
        with self.lock:
            self.shutdown_requested = True
            leftover = self.core.drain_all()
            self.close_all_fds()
        self.sel.close()
        self.launcher.close()  # waits until the launcher and everything under it is gone
        with self.lock:  # wake() runs under the lock: it sees the pipe open, or -1
            wake_r, wake_w = self.wake_r, self.wake_w
            self.wake_r = self.wake_w = -1
        os.close(wake_r)
        os.close(wake_w)
        err = self.broken or BrokenProcessPool("the pool shut down before the task ran")
        _complete([(t.handle, None, t.stop_error or err) for t in leftover])
        _live_engines.discard(self)

    # -- shutdown -----------------------------------------------------------------------------
    def request_shutdown(self, cancel_futures: bool = False) -> None:
        with self.lock:
            self.shutdown_requested = True
            cancelled = self.core.cancel_queued() if cancel_futures else []
            if self.thread.is_alive():
                self.wake()
        _complete([(task.handle, None, None) for task in cancelled])

    def join(self) -> None:
        if threading.current_thread() is not self.thread:
            self.thread.join()


def _complete(done: list[Completion]) -> None:
    """Settle futures outside the lock (their callbacks may call back into the pool)."""
    for fut, kind, value in done:
        try:
            if value is None and kind is None:
                if fut.cancel():
                    # As an executor must: CANCELLED -> CANCELLED_AND_NOTIFIED, or wait() and
                    # as_completed() would not count it as done.
                    fut.set_running_or_notify_cancel()
                else:  # already running: fail it the same way
                    fut.set_exception(CancelledError("the task was cancelled before it ran"))
            elif kind is Kind.OK:
                try:
                    result = serialize.load_result(value)
                except TaskUnpicklingError as exc:
                    fut.set_exception(exc)
                else:
                    fut.set_result(result)
            elif kind is Kind.ERR:
                fut.set_exception(serialize.load_error(value))
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
