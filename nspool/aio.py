"""The async front, over anyio (asyncio and trio): ``open_pool`` and ``run_sync``.

It drives the same pool core and fd plumbing as ``NSPoolExecutor`` but waits on the worker
pipes in the event loop itself (``anyio.wait_readable``), with no helper thread. Cancelling a
call (``task.cancel()``, a cancel scope, ``fail_after``, a failing task group) kills the
worker running it, with its whole PID namespace, and the pool replaces the worker.
"""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
import sniffio

from ._core import serialize, sizes
from ._core.driver import Completion, Conn, PoolDriver
from ._core.launcher_link import LaunchConfig, PoolLink, cgroups_config
from ._core.pool import PoolCore, StopAction, Task, default_max_workers
from ._core.protocol import Kind
from ._core.shared_launcher import connect
from ._core.usage import TaskUsage
from .errors import BrokenProcessPool

__all__ = ["AsyncPool", "current_default_pool_limiter", "open_pool", "run_sync"]

T = TypeVar("T")

#: idle workers of the default pool exit after this many seconds (as anyio.to_process)
DEFAULT_IDLE_TIMEOUT = 300.0
#: longest a cancelled call waits for its stop's outcome (only a bug could make it wait)
STOP_GUARD = 60.0


class _Waiter:
    """One call's rendezvous: set by the fd readers, read by the awaiting caller."""

    __slots__ = ("event", "kind", "usage", "value")

    def __init__(self, event_class: Callable[[], Any]) -> None:
        # The event loop's own Event (asyncio.Event, trio.Event): anyio.Event picks the
        # backend and wraps it on every call, which costs about a microsecond per call.
        self.event = event_class()
        self.kind: Kind | None = None
        self.value: Any = None
        self.usage: TaskUsage | None = None

    def outcome(self) -> Any:
        if self.kind is Kind.OK:
            return serialize.load_result(self.value)
        if self.kind is Kind.ERR:
            raise serialize.load_error(self.value)
        raise self.value


class _CallCancelled(Exception):
    """Stands in for the caller's cancellation inside the pool (nobody sees it)."""


def _settle(done: list[Completion]) -> None:
    for waiter, kind, value in done:
        if kind is None and value is None:
            value = BrokenProcessPool("the pool was closed before the call ran")
        waiter.kind, waiter.value = kind, value
        waiter.event.set()


class _AsyncEngine(PoolDriver):
    def __init__(
        self,
        core: PoolCore,
        launcher: PoolLink,
        init_payload: bytes | None,
        tg: anyio.abc.TaskGroup,
        max_result_size: int,
    ) -> None:
        super().__init__(core, launcher, init_payload, max_result_size)
        self.tg = tg
        self.control_writing = False
        # On asyncio, a reader callback registered once per pipe is much cheaper than a task
        # that registers and unregisters the fd around every wait (anyio.wait_readable).
        self.loop: asyncio.AbstractEventLoop | None = None
        self.event_class: Callable[[], Any] = anyio.Event
        backend = sniffio.current_async_library()
        if backend == "asyncio":
            self.loop = asyncio.get_running_loop()
            self.event_class = asyncio.Event
        elif backend == "trio":
            import trio

            self.event_class = trio.Event

    # -- hooks ------------------------------------------------------------------------------------
    def _watch_result(self, conn: Conn) -> None:
        if self.loop is not None:
            self.loop.add_reader(conn.result_fd, self._read_and_settle, conn)
        else:
            self.tg.start_soon(self._reader, conn, conn.result_fd)

    def _read_and_settle(self, conn: Conn) -> None:
        if conn.result_fd < 0:
            return
        done: list[Completion] = []
        try:
            self.on_readable(conn, done)
            self.kick(done)
        except Exception as exc:  # noqa: BLE001 - a bug in nspool: stop the pool, say so
            self._failed(exc, done)

    def _failed(self, exc: Exception, done: list[Completion]) -> None:
        """nspool's own I/O raised (a bug): fail every call with a clear error instead of
        leaving them waiting, or cancelling the caller's task group (trio), or only logging
        "Exception in callback" (asyncio)."""
        traceback.print_exception(type(exc), exc, exc.__traceback__)
        if self.broken is None:
            self.break_pool(
                BrokenProcessPool(
                    f"nspool's I/O failed, so the pool stopped (a bug in nspool; please report "
                    f"it): {type(exc).__name__}: {exc}"
                ),
                done,
            )
        _settle(done)

    def _want_write(self, conn: Conn) -> None:
        conn.writing = True
        if self.loop is not None:
            self.loop.add_writer(conn.task_fd, self._write_ready, conn)
        else:
            self.tg.start_soon(self._writer, conn, conn.task_fd)

    def _write_ready(self, conn: Conn) -> None:
        """asyncio: room in ``conn``'s task pipe."""
        if self.loop is not None and conn.task_fd >= 0:
            self.loop.remove_writer(conn.task_fd)
        conn.writing = False
        if conn.task_fd >= 0:
            try:
                self.flush(conn)  # waits again if some is left; closes a retired worker's pipe
            except Exception as exc:  # noqa: BLE001
                self._failed(exc, [])

    def _release_fd(self, fd: int) -> None:
        if self.loop is not None:
            # asyncio: only the loop's own callbacks wait on worker pipes, never an anyio
            # waiter, and anyio.notify_closing() needs a task (it fails in a bare callback
            # under plain asyncio.run()).
            self.loop.remove_reader(fd)
            self.loop.remove_writer(fd)
        else:
            anyio.notify_closing(fd)  # wakes a reader or writer waiting on it

    def _want_control_write(self) -> None:
        if not self.control_writing:
            self.control_writing = True
            self.tg.start_soon(self._control_writer)

    async def _control_writer(self) -> None:
        try:
            while not self.launcher.closed and not self.launcher.flush():
                try:
                    await anyio.wait_writable(self.launcher.fileno())
                except anyio.ClosedResourceError:
                    return
        finally:
            self.control_writing = False

    # -- tasks ---------------------------------------------------------------------------------
    def kick(self, done: list[Completion] | None = None) -> None:
        """Schedule, start workers and stop doomed tasks, then settle what finished (``done``:
        completions an event already produced)."""
        done = [] if done is None else done
        self.step(done)
        _settle(done)

    async def _reader(self, conn: Conn, fd: int) -> None:
        # ``fd`` is the pipe as it was when this task was started: by the time the task runs,
        # the pool may have closed it (result_fd -1, which trio would wait on).
        while fd >= 0 and conn.result_fd == fd:
            try:
                await anyio.wait_readable(fd)
            except anyio.ClosedResourceError:
                return
            if conn.result_fd != fd:
                return  # closed by another task between the wake-up and now
            self._read_and_settle(conn)  # never raises: a failure breaks the pool instead

    async def _writer(self, conn: Conn, fd: int) -> None:
        # ``fd``: the pipe as it was when this task was started (see _reader)
        try:
            while fd >= 0 and conn.out and conn.task_fd == fd:
                try:
                    await anyio.wait_writable(fd)
                except anyio.ClosedResourceError:
                    return
                if conn.task_fd != fd:
                    return
                self.flush(conn)
        except Exception as exc:  # noqa: BLE001 - a bug: fail the calls, spare the caller's group
            self._failed(exc, [])
        finally:
            conn.writing = False
            if conn.task_fd == fd and fd >= 0 and self.broken is None:
                self.flush(conn)  # closes the pipe if the worker is being retired

    async def control(self) -> None:
        while not self.launcher.closed:
            try:
                await anyio.wait_readable(self.launcher.fileno())
            except anyio.ClosedResourceError:
                return
            done: list[Completion] = []
            try:
                self.on_control(done)
                self.kick(done)
            except Exception as exc:  # noqa: BLE001
                self._failed(exc, done)
            if self.broken is not None:
                return

    async def reap_idle(self, idle_timeout: float) -> None:
        while True:
            await anyio.sleep(max(idle_timeout / 4, 0.05))
            self.close_idle(idle_timeout)

    async def aclose(self) -> None:
        """Fail what is left, close every pipe, and wait until every process is gone."""
        self.shutdown_requested = True
        done: list[Completion] = []
        for task in self.core.drain_all():
            done.append((task.handle, None, BrokenProcessPool("the pool was closed")))
        _settle(done)
        self.close_all_fds()
        if not self.launcher.closed:
            anyio.notify_closing(self.launcher.fileno())
            self.launcher.close(wait=False)
        # The launcher kills what is left of the pool's workers; wait until they are gone
        # (a few ms) without blocking the event loop.
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.launcher.wait_closed)


class AsyncPool:
    """A pool for async code; get one from :func:`open_pool`."""

    def __init__(self, engine: _AsyncEngine) -> None:
        self._engine = engine

    @property
    def launcher_pid(self) -> int:
        """PID of the launcher process that serves this pool (killing it kills every worker
        of every pool it serves: the program's pools share one, see the README)."""
        return self._engine.launcher.pid

    def worker_pids(self) -> list[int]:
        """PIDs of the workers that are up now."""
        return [w.pid for w in self._engine.core.workers.values() if w.pid]

    async def run(self, fn: Callable[..., T], *args: Any, cancellable: bool = True) -> T:
        """Run ``fn(*args)`` in a worker and return its result.

        If the awaiting task is cancelled, the worker running the call is killed together with
        every process the call started, and the cancellation propagates once they are gone.
        With ``cancellable=False`` the call is shielded: it runs to completion, returns its
        result, and the cancellation takes effect at the caller's next checkpoint.
        """
        waiter = await self._call(fn, args, cancellable)
        return waiter.outcome()  # type: ignore[no-any-return]

    async def run_with_usage(
        self, fn: Callable[..., T], *args: Any, cancellable: bool = True
    ) -> tuple[T, TaskUsage | None]:
        """As :meth:`run`, and what the call's process tree used (see ``NSFuture.usage``):
        ``(result, usage)``, usage None unless the pool has limits or ``track_usage``. A
        call that raises raises as with :meth:`run`."""
        waiter = await self._call(fn, args, cancellable)
        return waiter.outcome(), waiter.usage

    async def _call(
        self, fn: Callable[..., Any], args: tuple[Any, ...], cancellable: bool
    ) -> _Waiter:
        engine = self._engine
        engine.check_open()
        payload = serialize.dump_task(fn, args, {})
        waiter = _Waiter(engine.event_class)
        task = Task(next(engine.task_ids), payload, waiter)
        engine.core.submit(task)
        engine.kick()
        try:
            if cancellable:
                await waiter.event.wait()
            else:
                with anyio.CancelScope(shield=True):
                    await waiter.event.wait()
        except BaseException:
            if not waiter.event.is_set():
                how = engine.kill_task(task, _CallCancelled())
                if how is StopAction.ASK_WORKER or how is StopAction.PENDING:
                    # Propagate the cancellation once the stop took effect (the task and its
                    # tree are gone, or it was skipped) or the task finished first: its
                    # worker's init answers within milliseconds. The bound only guards
                    # against a bug; it is never the normal path.
                    with anyio.CancelScope(shield=True), anyio.move_on_after(STOP_GUARD):
                        await waiter.event.wait()
            raise
        return waiter

    async def aclose(self) -> None:
        """Close the pool now: pending calls fail, every process is gone on return."""
        with anyio.CancelScope(shield=True):
            await self._engine.aclose()


@asynccontextmanager
async def open_pool(
    max_workers: int | None = None,
    *,
    initializer: Callable[..., object] | None = None,
    initargs: tuple[Any, ...] = (),
    max_tasks_per_child: int | None = None,
    preload: Iterable[str] = (),
    kill_leftovers: bool = True,
    private_proc: bool = False,
    idle_timeout: float | None = None,
    max_batch: int = 64,
    start_timeout: float = 60.0,
    memory_limit: int | str | None = None,
    pids_limit: int | None = None,
    cpu_limit: float | None = None,
    track_usage: bool = False,
    max_result_size: int | str | None = None,
) -> AsyncIterator[AsyncPool]:
    """Open a pool for async code (asyncio or trio, through anyio).

    The keywords mean what they mean for :class:`nspool.NSPoolExecutor`; ``idle_timeout``
    lets workers idle that long exit (they are started again on demand). On exit every
    process of the pool and of its tasks is gone.
    """
    init_payload = serialize.dump_initializer(initializer, initargs)
    result_limit = sizes.max_result_size(max_result_size)
    core = PoolCore(max_workers, max_tasks_per_child=max_tasks_per_child, max_batch=max_batch)
    config = LaunchConfig(
        preload=tuple(preload),
        kill_leftovers=kill_leftovers,
        private_proc=private_proc,
        cgroups=cgroups_config(memory_limit, pids_limit, cpu_limit, track_usage),
    )
    # The launcher handshake blocks for a few tens of ms: do it off the event loop.
    launcher = await anyio.to_thread.run_sync(connect, config, start_timeout)
    body_exc: BaseException | None = None
    try:
        async with anyio.create_task_group() as tg:
            engine = _AsyncEngine(core, launcher, init_payload, tg, result_limit)
            tg.start_soon(engine.control)
            if idle_timeout is not None:
                tg.start_soon(engine.reap_idle, idle_timeout)
            pool = AsyncPool(engine)
            try:
                yield pool
            except BaseException as exc:  # noqa: BLE001
                # Re-raised below, outside the task group, so that the caller sees its own
                # exception rather than an ExceptionGroup wrapping it.
                body_exc = exc
            finally:
                await pool.aclose()
                tg.cancel_scope.cancel()
        if body_exc is not None:
            raise body_exc
    finally:
        launcher.close(wait=False)
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(launcher.wait_closed)


# -- the default pool ------------------------------------------------------------------------


class _DefaultPool:
    def __init__(self) -> None:
        self.ready = anyio.Event()
        self.pool: AsyncPool | None = None
        self.error: BaseException | None = None
        self.task: Any = None  # keeps asyncio's task referenced


_default_pool: anyio.lowlevel.RunVar[_DefaultPool] = anyio.lowlevel.RunVar("nspool_default_pool")
_default_limiter: anyio.lowlevel.RunVar[anyio.CapacityLimiter] = anyio.lowlevel.RunVar(
    "nspool_default_limiter"
)


def current_default_pool_limiter() -> anyio.CapacityLimiter:
    """The capacity limiter of :func:`run_sync` (default: one token per CPU)."""
    try:
        return _default_limiter.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(default_max_workers())
        _default_limiter.set(limiter)
        return limiter


async def _default_pool_lifetime(state: _DefaultPool) -> None:
    try:
        async with open_pool(idle_timeout=DEFAULT_IDLE_TIMEOUT) as pool:
            state.pool = pool
            state.ready.set()
            await anyio.sleep_forever()
    except anyio.get_cancelled_exc_class():
        raise  # the event loop is ending: the pool is closed by now
    except BaseException as exc:  # noqa: BLE001 - reported to every caller, not lost
        state.error = exc
        state.ready.set()


def _start_lifetime(state: _DefaultPool) -> None:
    # The default pool must live as long as the event loop, not as long as the first caller:
    # it runs in a task of its own that the loop cancels when it ends.
    if sniffio.current_async_library() == "trio":
        import trio

        trio.lowlevel.spawn_system_task(_default_pool_lifetime, state, name="nspool default pool")
    else:
        import asyncio

        state.task = asyncio.get_running_loop().create_task(
            _default_pool_lifetime(state), name="nspool default pool"
        )


async def run_sync(
    fn: Callable[..., T],
    *args: Any,
    cancellable: bool = True,
    limiter: anyio.CapacityLimiter | None = None,
) -> T:
    """Run ``fn(*args)`` in the event loop's default pool (like ``anyio.to_process.run_sync``).

    The pool starts on first use, closes idle workers after ``DEFAULT_IDLE_TIMEOUT`` seconds
    and is shut down when the event loop ends. Concurrency is bounded by ``limiter`` (default:
    :func:`current_default_pool_limiter`). Cancellation works as for :meth:`AsyncPool.run`.
    """
    try:
        state = _default_pool.get()
    except LookupError:
        state = _DefaultPool()
        _default_pool.set(state)
        _start_lifetime(state)
    if not state.ready.is_set():  # waiting on a set Event would still cost a loop round
        await state.ready.wait()
    if state.pool is None:  # it could not start (e.g. NamespaceError): say why, every time
        raise BrokenProcessPool(
            f"the default nspool pool could not start: {state.error!r}"
        ) from state.error
    limiter = limiter or current_default_pool_limiter()
    if limiter.available_tokens >= 1:
        # A free token is taken without the checkpoint ``async with`` makes (a whole event
        # loop round); the call itself checkpoints (it waits for its result). (Not by catching
        # anyio.WouldBlock: on trio, anyio before 4.15 lets trio's own WouldBlock through.)
        limiter.acquire_nowait()
    else:
        await limiter.acquire()
    try:
        return await state.pool.run(fn, *args, cancellable=cancellable)
    finally:
        limiter.release()
