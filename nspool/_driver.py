"""The pool's fd plumbing, shared by both fronts: non-blocking writes of task frames, reads of
result frames, worker start and exit handling, hard kills. It never blocks and never waits:
each front decides *how* to wait (a selector in a thread, or the event loop) through the hooks
at the bottom of :class:`PoolDriver`, and settles the returned completions its own way.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
import weakref
from collections import deque
from typing import Any

from ._launch import Launcher
from ._pool import Actions, PoolCore, Task, WorkerSlot
from ._protocol import Ctl, Frame, FrameDecoder, Kind, encode_frame, encode_header
from .errors import (
    BrokenProcessPool,
    LauncherDiedError,
    PoolInitializerError,
    WorkerDiedError,
    describe_wait_status,
)

_live_drivers: weakref.WeakSet[PoolDriver] = weakref.WeakSet()


def _forget_pools_in_child() -> None:
    for driver in list(_live_drivers):
        driver.forget_in_child()


os.register_at_fork(after_in_child=_forget_pools_in_child)

#: (the front's handle, OK/ERR with a payload to unpickle, or None with an exception)
Completion = tuple[Any, "Kind | None", Any]


class Conn:
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
        self.writing = False  # the front waits for room in the task pipe
        self.close_after = False  # close task_fd once ``out`` is written
        self.kill_reason: str | None = None


class PoolDriver:
    """Connects a :class:`PoolCore` to the launcher and the worker pipes."""

    def __init__(self, core: PoolCore, launcher: Launcher, init_payload: bytes | None) -> None:
        self.core = core
        self.launcher = launcher
        self.init_payload = init_payload
        self.conns: dict[int, Conn] = {}
        self.broken: BrokenProcessPool | None = None
        self.shutdown_requested = False
        self.task_ids = itertools.count(1)
        _live_drivers.add(self)

    def forget_in_child(self) -> None:
        """In a child forked from the program: drop our copies of the pool's fds without a
        word, so that the pool's life stays tied to the program that created it (the launcher
        must see EOF when *that* program dies, not when its last forked child does)."""
        for conn in self.conns.values():
            for fd in (conn.task_fd, conn.result_fd):
                if fd >= 0:
                    os.close(fd)
            conn.task_fd = conn.result_fd = -1
        self.conns = {}
        self.launcher.forget()
        self.broken = BrokenProcessPool("this pool belongs to the parent process")

    # -- submitting -----------------------------------------------------------------------------
    def check_open(self) -> None:
        if self.broken is not None:
            raise type(self.broken)(str(self.broken))
        if self.shutdown_requested:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def step(self, done: list[Completion], *, spawn: bool = True) -> float | None:
        """Hand queued tasks to workers, start missing workers, stop tasks that must die.
        Returns when the next task deadline falls due (None: no deadline pending)."""
        if self.broken is not None:
            return None
        now = time.monotonic()
        actions = self.core.schedule(now, spawn=spawn)
        for slot in actions.spawn:
            try:
                task_fd, result_fd = self.launcher.spawn(slot.wid)
            except OSError as exc:
                self.break_pool(LauncherDiedError(f"cannot reach the launcher: {exc}"), done)
                return None
            conn = Conn(slot, task_fd, result_fd)
            self.conns[slot.wid] = conn
            self._watch_result(conn)
            if self.init_payload is not None:
                conn.out.append(memoryview(encode_frame(Kind.INIT, 0, self.init_payload)))
        self._perform(actions)
        kill, next_due = self.core.heads_to_kill(now)
        for slot in kill:
            self.launcher.kill(slot.wid, signal.SIGKILL)
        return next_due

    def close_idle(self, idle_timeout: float) -> None:
        """Let workers that have been idle for ``idle_timeout`` seconds exit."""
        for slot in self.core.idle_workers(time.monotonic(), idle_timeout):
            conn = self.conns[slot.wid]
            conn.close_after = True
            self.flush(conn)

    def kill_task(self, task: Task, exc: BaseException) -> str:
        """Hard-cancel one task: drop it if still queued, else kill its worker's namespace.

        Returns ``"dequeued"``, ``"killing"`` (its worker is being killed; the task's
        completion follows the worker's exit), ``"deferred"`` (it waits behind another task in
        a worker's pipe and is killed the moment it starts) or ``"done"`` (too late)."""
        found = self.core.take_task(task.id)
        if found is None:
            return "done"
        _, slot = found
        if slot is None:
            task.fail_with = exc
            return "dequeued"
        self.core.doom(task, exc)
        if slot.inflight[0] is task:
            slot.killing = True
            self.launcher.kill(slot.wid, signal.SIGKILL)
            return "killing"
        return "deferred"

    def kill_all(self, sig: int, reason: str) -> list[Completion]:
        """Signal every worker; fail their tasks and return the queued ones' cancellations."""
        done: list[Completion] = []
        for task in self.core.drain_all():
            if task.started:
                exc = WorkerDiedError(
                    f"the task's worker was stopped by {reason}", exitcode=None, signal=sig
                )
                done.append((task.handle, None, exc))
            else:
                done.append((task.handle, None, None))  # None, None: cancel
        for conn in self.conns.values():
            conn.kill_reason = reason
            self.launcher.kill(conn.slot.wid, sig)
        return done

    # -- writing ----------------------------------------------------------------------------------
    def _perform(self, actions: Actions) -> None:
        for slot, tasks in actions.send:
            conn = self.conns[slot.wid]
            for task in tasks:
                conn.out.append(memoryview(encode_header(Kind.TASK, task.id, len(task.payload))))
                conn.out.append(memoryview(task.payload))
            self.flush(conn)
        for slot in actions.close:
            conn = self.conns[slot.wid]
            conn.close_after = True
            self.flush(conn)

    def flush(self, conn: Conn) -> None:
        """Write what the pipe takes; ask the front to wait for room if some is left."""
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
        if out:
            if not conn.writing:
                self._want_write(conn)
        elif conn.close_after and conn.task_fd >= 0 and not conn.writing:
            os.close(conn.task_fd)  # the worker finishes what it has, then exits on EOF
            conn.task_fd = -1

    # -- reading ----------------------------------------------------------------------------------
    def on_readable(self, conn: Conn, done: list[Completion]) -> None:
        """Read what a worker sent and dispatch the complete frames."""
        decoder = conn.decoder
        for _ in range(64):
            try:
                n = os.readv(conn.result_fd, [decoder.get_buffer()])
            except BlockingIOError:
                break
            if n == 0:
                # The worker closed its result pipe: it is exiting, or a task closed the fd.
                # Make sure it is gone; its EXITED message then settles its tasks.
                self._close_result(conn)
                self.launcher.kill(conn.slot.wid, signal.SIGKILL)
                break
            decoder.buffer_updated(n)
        now = time.monotonic()
        while (frame := decoder.next_frame()) is not None:
            self._on_frame(conn, frame, now, done)

    def _on_frame(self, conn: Conn, frame: Frame, now: float, done: list[Completion]) -> None:
        kind = frame.kind
        if kind is Kind.OK or kind is Kind.ERR:
            task = self.core.on_result(conn.slot.wid, frame.ident, now)
            if task.fail_with is None:
                done.append((task.handle, kind, frame.payload))
        elif kind is Kind.READY:
            self.core.on_ready(conn.slot.wid, frame.ident, now)
        elif kind is Kind.INIT_FAILED:
            tb = bytes(frame.payload).decode("utf-8", "replace")
            self.break_pool(
                PoolInitializerError(
                    "A process in the process pool failed in its initializer; the pool is "
                    f"not usable anymore. The initializer's traceback:\n{tb}"
                ),
                done,
            )

    def on_control(self, done: list[Completion]) -> None:
        """Handle what the launcher said (worker exits, failed spawns, its own death)."""
        msgs, eof = self.launcher.receive()
        for msg in msgs:
            if msg.kind is Ctl.EXITED:
                self._on_exit(msg.wid, msg.value, done)
            elif msg.kind is Ctl.SPAWN_FAILED:
                self._on_exit(msg.wid, None, done, msg.text)
        if eof and self.broken is None:
            how = self.launcher.exit_description()
            self.break_pool(
                LauncherDiedError(
                    f"the pool's launcher (pid {self.launcher.pid}) {how}; every worker "
                    "died with it, so the pool is not usable anymore"
                ),
                done,
            )

    def _on_exit(
        self, wid: int, status: int | None, done: list[Completion], text: str = ""
    ) -> None:
        conn = self.conns.pop(wid, None)
        if conn is None:
            return
        if conn.result_fd >= 0:
            # Results written just before the exit are still in the pipe: read them first.
            self.on_readable(conn, done)
            self._close_result(conn)
        self._close_task(conn)
        conn.out.clear()
        outcome = self.core.on_exit(wid)
        if status is None:
            how, code, sig = f"could not be started ({text})", None, None
        else:
            code, sig, how = describe_wait_status(status)
        if conn.kill_reason:
            how += f" (stopped by {conn.kill_reason})"
        lost = outcome.lost
        if lost is not None:
            exc = lost.fail_with or WorkerDiedError(
                f"the worker (pid {conn.slot.pid or '?'}) running this task {how}; the pool "
                "replaced it",
                exitcode=code,
                signal=sig,
            )
            done.append((lost.handle, None, exc))
        if self.core.startup_failing and self.broken is None:
            self.break_pool(
                LauncherDiedError(f"workers keep dying during start-up: the last one {how}"),
                done,
            )

    def _close_result(self, conn: Conn) -> None:
        if conn.result_fd >= 0:
            self._release_fd(conn.result_fd)
            os.close(conn.result_fd)
            conn.result_fd = -1

    def _close_task(self, conn: Conn) -> None:
        if conn.task_fd >= 0:
            self._release_fd(conn.task_fd)
            os.close(conn.task_fd)
            conn.task_fd = -1

    def break_pool(self, exc: BrokenProcessPool, done: list[Completion]) -> None:
        """The pool cannot serve any more: fail every task with ``exc``."""
        self.broken = exc
        for task in self.core.drain_all():
            done.append((task.handle, None, task.fail_with or exc))

    def close_all_fds(self) -> None:
        """Close every worker pipe (the pool is being torn down)."""
        for conn in self.conns.values():
            self._close_result(conn)
            self._close_task(conn)
        self.conns.clear()

    # -- hooks for the fronts ---------------------------------------------------------------------
    def _watch_result(self, conn: Conn) -> None:
        """Start waiting for ``conn.result_fd`` to be readable; call :meth:`on_readable`."""
        raise NotImplementedError

    def _want_write(self, conn: Conn) -> None:
        """``conn.out`` is not empty and the pipe is full: set ``conn.writing``, wait for room,
        call :meth:`flush`, and clear ``conn.writing`` (then flush once more) when done."""
        raise NotImplementedError

    def _release_fd(self, fd: int) -> None:
        """``fd`` is about to be closed: stop waiting on it."""
        raise NotImplementedError
