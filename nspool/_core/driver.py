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
from concurrent.futures import CancelledError
from threading import current_thread as _current_thread
from typing import Any

from ..errors import (
    BrokenProcessPool,
    LauncherDiedError,
    MemoryLimitError,
    PoolInitializerError,
    TaskTimeoutError,
    WorkerDiedError,
    describe_wait_status,
)
from .launcher_link import PoolLink
from .pool import Actions, Fate, PoolCore, StopAction, Task, WorkerEnd, WorkerSlot
from .protocol import (
    EXIT_MEMORY_LIMIT,
    USAGE,
    Ctl,
    Frame,
    FrameDecoder,
    InitMsg,
    Kind,
    LoopFault,
    Op,
    ProtocolError,
    StateBlock,
    StopReason,
    decode_usage,
    encode_frame,
    encode_init_msg,
    encode_task_head,
)
from .sizes import describe as _size
from .usage import TaskUsage

_live_drivers: weakref.WeakSet[PoolDriver] = weakref.WeakSet()


def _forget_pools_in_child() -> None:
    for driver in list(_live_drivers):
        driver.forget_in_child()


os.register_at_fork(after_in_child=_forget_pools_in_child)

#: (the front's handle, OK/ERR with a payload to unpickle, or None with an exception)
Completion = tuple[Any, "Kind | None", Any]


class Conn:
    """The program's ends of one worker: its pipes and its state block."""

    __slots__ = (
        "slot",
        "task_fd",
        "result_fd",
        "stop_fd",
        "state_map",
        "decoder",
        "out",
        "writing",
        "close_after",
        "usage",
        "reader",
        "close_deferred",
        "poller",
        "answered",
        "ready_seen",
        "corrupt",
    )

    def __init__(
        self,
        slot: WorkerSlot,
        task_fd: int,
        result_fd: int,
        stop_fd: int,
        state_map: Any,
        max_payload: int,
    ) -> None:
        self.slot = slot
        self.task_fd = task_fd
        self.result_fd = result_fd
        self.stop_fd = stop_fd
        self.state_map = state_map
        # Nothing a worker sends is trusted: its task may have written to the pipe too.
        self.decoder = FrameDecoder(max_payload=max_payload, check=self.check_header)
        self.out: deque[memoryview] = deque()
        self.writing = False  # the front waits for room in the task pipe
        self.close_after = False  # close task_fd once ``out`` is written
        self.usage: tuple[int, TaskUsage] | None = None  # (seq, usage) of the next result
        #: a thread of the front's that reads this worker's results for now (it waits on one
        #: of them; see ``executor``), or None: then the front's usual reader does
        self.reader: object | None = None
        #: the result pipe was to be closed while ``reader`` was using it: it closes it
        self.close_deferred = False
        self.poller: Any = None  # the reader's poll object for the result pipe
        #: seq of the last task whose answer's header was read (answers come in order)
        self.answered = 0
        self.ready_seen = False
        #: why the result pipe was given up (bytes that are not the task loop's), and the seq of
        #: the task that was to answer next then: the one that wrote them
        self.corrupt: tuple[str, int] | None = None

    def check_header(self, kind: Kind, ident: int, length: int) -> None:
        """Refuse a frame header the task loop would not send next (before any room is made
        for its payload): ProtocolError."""
        if kind is Kind.OK or kind is Kind.ERR or kind is Kind.SKIPPED or kind is Kind.USAGE:
            want = self.answered + 1
            if not self.ready_seen or ident != want or ident > self.slot.last_seq:
                raise ProtocolError(
                    f"a {kind.name} frame for task {ident} where the next answer is for task "
                    f"{want}" + ("" if self.ready_seen else ", before the worker was ready")
                )
            if kind is not Kind.USAGE:
                self.answered = ident
            elif length != USAGE.size:
                raise ProtocolError(f"a USAGE frame of {length} bytes")
        elif kind is Kind.READY:
            if self.ready_seen or length:
                raise ProtocolError("a second READY frame")
            self.ready_seen = True
        elif kind is Kind.INIT_FAILED:
            if self.ready_seen:
                raise ProtocolError("an INIT_FAILED frame after the worker was ready")
        else:
            raise ProtocolError(f"a {kind.name} frame, which workers never send")


class PoolDriver:
    """Connects a :class:`PoolCore` to the launcher and the worker pipes."""

    def __init__(
        self,
        core: PoolCore,
        launcher: PoolLink,
        init_payload: bytes | None,
        max_result_size: int,
    ) -> None:
        self.core = core
        self.launcher = launcher
        self.init_payload = init_payload
        #: the largest frame a worker may send (a result, an exception)
        self.max_result_size = max_result_size
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
            for fd in (conn.task_fd, conn.result_fd, conn.stop_fd):
                if fd >= 0:
                    os.close(fd)
            conn.task_fd = conn.result_fd = conn.stop_fd = -1
        self.conns = {}
        self.launcher.forget()
        self.broken = BrokenProcessPool("this pool belongs to the parent process")

    # -- submitting -----------------------------------------------------------------------------
    def check_open(self) -> None:
        if self.broken is not None:
            raise type(self.broken)(str(self.broken))
        if self.shutdown_requested:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def step(self, done: list[Completion], *, spawn: bool = True) -> None:
        """Hand queued tasks to workers and start missing workers. (Deadlines need nothing
        from here: each worker's init keeps its running task's deadline.)"""
        if self.broken is not None or not self.core.queue:
            return  # with nothing queued there is nothing to hand out or start
        actions = self.core.schedule(time.monotonic(), spawn=spawn)
        for slot in actions.spawn:
            try:
                ends = self.launcher.spawn(slot.wid)
            except OSError as exc:
                self.break_pool(
                    BrokenProcessPool(
                        f"cannot start a worker: {exc} (each worker holds 4 file descriptors "
                        "in this process: raise the limit on open files or lower max_workers)"
                    ),
                    done,
                )
                return
            conn = Conn(
                slot, ends.task_fd, ends.result_fd, ends.stop_fd, ends.state, self.max_result_size
            )
            self.conns[slot.wid] = conn
            self._watch_result(conn)
            # Always first: the worker says READY only after its initializer ran.
            conn.out.append(memoryview(encode_frame(Kind.INIT, 0, self.init_payload or b"")))
            self.flush(conn)
        if self.launcher.outbox:
            self._want_control_write()
        self._perform(actions)

    def close_idle(self, idle_timeout: float) -> None:
        """Let workers that have been idle for ``idle_timeout`` seconds exit."""
        for slot in self.core.idle_workers(time.monotonic(), idle_timeout):
            conn = self.conns[slot.wid]
            conn.close_after = True
            self.flush(conn)

    def kill_task(self, task: Task, exc: BaseException) -> StopAction:
        """Hard-cancel one task. Queued: it is dropped (DEQUEUED: the caller settles it).
        Sent: its worker's init is asked to stop it, and the outcome arrives in order with
        the worker's answers: its result (too late), a SKIPPED frame, or the worker's exit."""
        how = self.core.stop(task, exc)
        if how is StopAction.ASK_WORKER:
            self._tell_init(task.wid, InitMsg(Op.STOP, task.seq, StopReason.KILL))
        return how

    def _tell_init(self, wid: int, msg: InitMsg) -> None:
        conn = self.conns.get(wid)
        if conn is None or conn.stop_fd < 0:
            return  # the worker is gone: its exit settles its tasks
        try:
            os.write(conn.stop_fd, encode_init_msg(msg))
        except BlockingIOError:
            # Thousands of unread stops: the init is stuck. Kill the worker whole; its state
            # block still tells which task ran.
            self.launcher.kill(wid, signal.SIGKILL)
            if self.launcher.outbox:
                self._want_control_write()
        except OSError:
            pass  # EPIPE: the init is gone; its exit follows

    def kill_all(self, sig: int, reason: str, grace: float | None = None) -> list[Completion]:
        """Signal the task process of every worker and let no worker take or requeue work;
        returns the cancellations of the queued tasks. The running tasks' futures settle as
        their workers exit (a task that already finished keeps its result). With ``grace``
        (SIGTERM), each worker's init kills the whole worker once ``grace`` seconds have
        passed, whatever the task does with the signal."""
        done: list[Completion] = [(t.handle, None, None) for t in self.core.force(reason)]
        for conn in self.conns.values():
            if grace is not None and sig == signal.SIGTERM:
                msg = InitMsg(Op.TERMINATE, 0, max(0, int(grace * 1e9)))
            else:
                msg = InitMsg(Op.SIGNAL, 0, sig)
            self._tell_init(conn.slot.wid, msg)
            if sig == signal.SIGKILL:
                # Also straight to the init: a worker still starting has no task loop yet.
                self.launcher.kill(conn.slot.wid, sig)
        if self.launcher.outbox:
            self._want_control_write()
        return done

    # -- writing ----------------------------------------------------------------------------------
    def _perform(self, actions: Actions) -> None:
        for slot, tasks in actions.send:
            conn = self.conns[slot.wid]
            for task in tasks:
                head = encode_task_head(task.seq, len(task.payload), task.timeout)
                conn.out.append(memoryview(head))
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
            except OSError:  # EPIPE: the task loop is gone; the worker's exit will follow
                out.clear()
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
    def on_readable(self, conn: Conn, done: list[Completion], reads: int | None = 64) -> None:
        """Read what a worker sent (at most ``reads`` reads; None: all there is) and dispatch
        the complete frames."""
        if self.broken is not None:
            # The pool broke earlier in this round (its launcher's EOF, a failed initializer):
            # every task is settled already, so a result still in a pipe has no task.
            return
        decoder = conn.decoder
        count = itertools.count() if reads is None else range(reads)
        for _ in count:
            buf = decoder.get_buffer()
            try:
                n = os.readv(conn.result_fd, [buf])
            except BlockingIOError:
                break
            if n == 0:
                # The task loop and everything it started are gone (or a task closed the
                # fd): the worker's exit, which the launcher reports, settles the rest.
                self._close_result(conn)
                break
            try:
                decoder.buffer_updated(n)
            except ProtocolError as exc:
                self._corrupt(conn, exc)  # the frames read before the bad bytes still count
                break
            if n < len(buf) and reads is not None:
                # A pipe read returns less than asked only when the pipe is empty: no need
                # to ask again (that read would fail with EAGAIN). What comes later wakes
                # the reader again (level-triggered). A dead worker's pipe is read to EOF.
                break
        now = time.monotonic()
        while (frame := decoder.next_frame()) is not None:
            self._on_frame(conn, frame, now, done)

    def _corrupt(self, conn: Conn, exc: ProtocolError) -> None:
        """A worker's result pipe carried bytes the task loop never writes: a task (or a
        library it called) wrote to nspool's pipe. Nothing more can be read from it: kill the
        worker; its exit fails the task that was to answer next (the one that wrote them),
        and only it, unless another had started on that worker meanwhile."""
        conn.corrupt = (str(exc), conn.answered + 1)
        self._close_result(conn)
        self.launcher.kill(conn.slot.wid, signal.SIGKILL)
        if self.launcher.outbox:
            self._want_control_write()

    def _on_frame(self, conn: Conn, frame: Frame, now: float, done: list[Completion]) -> None:
        kind = frame.kind
        if kind is Kind.OK or kind is Kind.ERR:
            # A result settles its task even if a stop was asked: the stop came too late.
            task = self.core.on_result(conn.slot.wid, frame.ident, now)
            if conn.usage is not None and conn.usage[0] == frame.ident:
                task.handle.usage = conn.usage[1]  # before it settles: seen with the result
                conn.usage = None
            done.append((task.handle, kind, frame.payload))
        elif kind is Kind.USAGE:
            conn.usage = (frame.ident, TaskUsage(*decode_usage(frame.payload)))
        elif kind is Kind.SKIPPED:
            task = self.core.on_skipped(conn.slot.wid, frame.ident, now)
            done.append((task.handle, None, task.stop_error))
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
                oom = bool(msg.value & EXIT_MEMORY_LIMIT)
                self._on_exit(msg.wid, msg.value & 0xFFFFFFFF, done, memory_limit=oom)
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
        self,
        wid: int,
        status: int | None,
        done: list[Completion],
        text: str = "",
        *,
        memory_limit: bool = False,
    ) -> None:
        conn = self.conns.pop(wid, None)
        if conn is None:
            return
        if conn.result_fd >= 0:
            # Every process of the worker is gone, so what it wrote is all in the pipe, up to
            # EOF: read it all first, so the exit only decides tasks that got no answer.
            self.on_readable(conn, done, reads=None)
            self._close_result(conn)
        self._close_task(conn)
        self._close_stop(conn)
        conn.out.clear()
        state = StateBlock(conn.state_map)
        record = state.read_record()
        state.release()
        conn.state_map.close()
        outcome = self.core.on_exit(
            wid,
            WorkerEnd(record.started, record.stopped, record.reason is StopReason.TIMEOUT),
        )
        if record.status is not None:
            status = record.status  # how the task process ended, not its init
        if status is None:
            how, code, sig = f"could not be started ({text})", None, None
        else:
            code, sig, how = describe_wait_status(status)
        if conn.slot.forced:
            how += f" (stopped by {conn.slot.forced})"
        if record.fault is LoopFault.PIPES:
            how += (
                ", because the task closed or replaced nspool's pipes (its result could not "
                "reach this program)"
            )
        elif record.fault is LoopFault.PRIVATE_PROC:
            how += ", because the task undid its private /proc, which could not be mounted again"
        elif record.fault is LoopFault.TASK_STREAM:
            how += (
                ", because its task pipe carried bytes that are not nspool's: a task read from "
                "or wrote to it"
            )
        if record.reason is StopReason.PROTOCOL:
            how += (
                " by its init, because the task wrote to nspool's notify pipe what the task "
                "loop never writes"
            )
        corrupt_seq = 0
        if conn.corrupt is not None:
            why, corrupt_seq = conn.corrupt
            wrote = (
                f"; nspool killed it because its result pipe carried bytes that are not "
                f"nspool's ({why})"
            )
        # MemoryLimitError names the pool's limit. A pool without one (track_usage alone) sees
        # OOM kills in its workers' memory cgroups too, from a limit that is not the pool's: a
        # plain worker death, which says who killed it.
        limit = self.launcher.memory_limit
        if memory_limit and not isinstance(limit, int):
            how += " (by the kernel's OOM killer)"
        for task, fate in outcome.ended:
            exc: BaseException | None
            if fate is Fate.DIED and memory_limit and isinstance(limit, int):
                exc = MemoryLimitError(
                    f"the task's processes used more memory than the pool's memory_limit "
                    f"({_size(limit)}): the kernel's OOM killer acted in "
                    f"its worker (pid {conn.slot.pid or '?'}), which was killed with every "
                    "process it held; the pool replaced it",
                    limit=limit,
                    exitcode=code,
                    signal=sig,
                )
            elif fate is Fate.DIED:
                also = ""
                if corrupt_seq and task.seq == corrupt_seq:
                    also = wrote + ": this task, or a library it called, wrote to that pipe"
                elif corrupt_seq:
                    also = wrote + ": the task before this one on that worker wrote to it"
                exc = WorkerDiedError(
                    f"the worker (pid {conn.slot.pid or '?'}) running this task {how}{also}; "
                    "the pool replaced it",
                    exitcode=code,
                    signal=sig,
                )
            elif fate is Fate.TIMED_OUT:
                exc = TaskTimeoutError(
                    f"the task ran longer than its {task.timeout:g} s deadline; it and every "
                    "process it started were killed"
                )
            elif fate is Fate.STOPPED:
                exc = task.stop_error
            else:  # CANCELLED: it never started
                exc = task.stop_error or CancelledError(
                    f"the task never started: its worker was stopped by {conn.slot.forced}"
                )
            done.append((task.handle, None, exc))
        if self.core.startup_failing and self.broken is None:
            self.break_pool(
                LauncherDiedError(f"workers keep dying during start-up: the last one {how}"),
                done,
            )

    def _close_result(self, conn: Conn) -> None:
        if conn.result_fd >= 0:
            if conn.reader is not None and conn.reader is not _current_thread():
                # Another thread waits on this pipe right now (outside the lock): closing it
                # could hand its number to a new file under that wait. That thread closes it.
                conn.close_deferred = True
                return
            self._release_fd(conn.result_fd)
            os.close(conn.result_fd)
            conn.result_fd = -1

    def _close_task(self, conn: Conn) -> None:
        if conn.task_fd >= 0:
            self._release_fd(conn.task_fd)
            os.close(conn.task_fd)
            conn.task_fd = -1

    def _close_stop(self, conn: Conn) -> None:
        if conn.stop_fd >= 0:
            os.close(conn.stop_fd)
            conn.stop_fd = -1

    def break_pool(self, exc: BrokenProcessPool, done: list[Completion]) -> None:
        """The pool cannot serve any more: fail every task with ``exc``."""
        self.broken = exc
        for task in self.core.drain_all():
            done.append((task.handle, None, exc))

    def close_all_fds(self) -> None:
        """Close every worker pipe and state block (the pool is being torn down)."""
        for conn in self.conns.values():
            self._close_result(conn)
            self._close_task(conn)
            self._close_stop(conn)
            conn.state_map.close()
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

    def _want_control_write(self) -> None:
        """``launcher.outbox`` is not empty: wait for the control socket to be writable and
        call ``launcher.flush()`` until it returns True."""
        raise NotImplementedError

