"""The init of a worker's PID namespace: PID 1 there, and it never runs user code.

It forks the task loop (at a PID unique on the machine; see docs/architecture.md, "How the
namespaces are made") and then only does what PID 1 must (tini's shape):

* reaps every orphan as it dies, so zombies never pile up while a task runs;
* carries out stops exactly: a stop request from the program (its stop pipe) or the running
  task's deadline (announced by the task loop on the notify pipe). It stops the task loop
  (SIGSTOP + waitpid), reads from the state block which task runs, and either wipes the
  namespace (that task is running), marks the task to be skipped (not started yet), or lets
  the loop go on (it already finished): a stop never hits another task;
* relays signals (a signal sent to it from outside) to the loop, and for
  ``terminate_workers()`` sends SIGTERM and kills the whole worker once its grace is over;
* when the task loop ends, kills what is left, stores how the loop ended and which task it
  stopped in the state block, and exits: the kernel then takes the namespace down.
"""

from __future__ import annotations

import mmap
import os
import select
import signal
import socket
import sys
import time
import traceback
from typing import TYPE_CHECKING, Any, NoReturn

from .._core.protocol import (
    STATE_SIZE,
    InitMsg,
    Op,
    ProtocolError,
    StateBlock,
    StopReason,
    decode_init_msgs,
)
from . import _handover, _syscalls

if TYPE_CHECKING:
    from .._cgroups.pool import PoolCgroups
    from .._cgroups.worker import WorkerCgroup
    from ._taskloop import WorkerOptions

#: signals passed on to the task loop, as tini does (from outside the namespace they would
#: otherwise not reach PID 1 at all). Not SIGINT: nobody outside sends it to a worker (Ctrl-C
#: reaches the program's own process group), while a task's kill(0, SIGINT) reaches its init
#: too, and relayed it would hit the task a second time while it handles the first.
RELAYED = (
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)


def _noop(signum: int, frame: object) -> None:
    pass


class Init:
    def __init__(
        self, loop: int, stop_fd: int, notify_fd: int, wake_fd: int, state: StateBlock
    ) -> None:
        self.loop = loop
        self.loop_status: int | None = None
        self.stop_fd = stop_fd
        self.notify_fd = notify_fd
        self.wake_fd = wake_fd
        self.state = state
        self.pending = {stop_fd: b"", notify_fd: b""}  # partial messages
        #: the running task's deadline: (seq, CLOCK_MONOTONIC ns)
        self.deadline: tuple[int, int] | None = None
        #: when the worker must be gone after a TERMINATE (CLOCK_MONOTONIC ns)
        self.kill_at: int | None = None
        for sig in RELAYED:
            signal.signal(sig, self._relay)

    def _relay(self, signum: int, frame: object) -> None:
        self.signal_loop(signum)

    def signal_loop(self, sig: int) -> None:
        if self.loop_status is None:
            try:
                os.kill(self.loop, sig)
            except ProcessLookupError:
                pass

    # -- the loop -----------------------------------------------------------------------------
    def serve(self) -> NoReturn:
        poller = select.poll()
        for fd in (self.stop_fd, self.notify_fd, self.wake_fd):
            poller.register(fd, select.POLLIN)
        while True:
            self.reap()
            timeout_ms = None
            due = [t for t in (self.kill_at, self.deadline and self.deadline[1]) if t]
            if due:
                left = min(due) - time.monotonic_ns()
                timeout_ms = max(0, -(-left // 1_000_000))
            for fd, _ in poller.poll(timeout_ms):
                if fd == self.wake_fd:
                    try:
                        os.read(self.wake_fd, 4096)
                    except BlockingIOError:
                        pass
                    continue
                try:
                    msgs = self.read_msgs(fd)
                except ProtocolError as exc:
                    self.corrupted(exc)
                if msgs is None:
                    poller.unregister(fd)
                    if fd == self.stop_fd:
                        self.finish()  # the program is done with this worker
                    continue
                for msg in msgs:
                    if fd == self.notify_fd and msg.op is not Op.DEADLINE:
                        # The task loop only ever announces deadlines: anything else on its
                        # pipe was written by the task (or a library it called).
                        self.corrupted(ProtocolError(f"a {msg.op.name} message"))
                    self.on_msg(msg)
            now = time.monotonic_ns()
            if self.kill_at is not None and now >= self.kill_at:
                self.finish()  # the grace after SIGTERM is over
            if self.deadline is not None and now >= self.deadline[1]:
                seq = self.deadline[0]
                self.deadline = None
                self.stop(seq, StopReason.TIMEOUT)

    def read_msgs(self, fd: int) -> list[InitMsg] | None:
        data = os.read(fd, 4096)
        if not data:
            return None
        msgs, self.pending[fd] = decode_init_msgs(self.pending[fd] + data)
        return msgs

    def corrupted(self, exc: ProtocolError) -> NoReturn:
        """The task loop's notify pipe carried what the loop never writes: the task wrote to
        nspool's pipe. That worker cannot be trusted any more: end it, and say why."""
        print(
            f"nspool: a task wrote to its worker's notify pipe ({exc}); the worker is killed",
            file=sys.stderr,
            flush=True,
        )
        self.finish(reason=StopReason.PROTOCOL)

    def on_msg(self, msg: InitMsg) -> None:
        if msg.op is Op.STOP:
            self.stop(msg.seq, StopReason(msg.value))
        elif msg.op is Op.SIGNAL:
            self.signal_loop(msg.value)
        elif msg.op is Op.DEADLINE:
            self.deadline = (msg.seq, msg.value)  # only the running task's deadline matters
        elif msg.op is Op.TERMINATE:
            self.signal_loop(signal.SIGTERM)
            kill_at = time.monotonic_ns() + max(0, msg.value)
            self.kill_at = kill_at if self.kill_at is None else min(self.kill_at, kill_at)

    def reap(self) -> None:
        """Reap every dead child: orphans, and the task loop (then finish)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid == self.loop:
                self.loop_status = status
        if self.loop_status is not None:
            self.finish()

    # -- stopping a task ----------------------------------------------------------------------
    def stop(self, seq: int, reason: StopReason) -> None:
        """Stop task ``seq`` if it has not finished: wipe the namespace if it runs, mark it to
        be skipped if it has not started; nothing if it already finished."""
        if self.loop_status is not None:
            return
        started, running = self.state.started()
        if started > seq or (started == seq and not running):
            return  # finished (seqs only grow): no need to stop the loop to know that
        # It runs or has not started yet: look again with the loop stopped, so that it cannot
        # start or finish the task between our look and our action.
        os.kill(self.loop, signal.SIGSTOP)
        _, status = os.waitpid(self.loop, os.WUNTRACED)  # stopped, or ended meanwhile
        if not os.WIFSTOPPED(status):
            self.loop_status = status  # it ended meanwhile
            self.finish()
        started, running = self.state.started()
        if started == seq and running:
            self.finish(stopped=seq, reason=reason)
        if started < seq and reason is StopReason.KILL:
            self.state.doom(seq)  # the loop skips it when it gets there
        os.kill(self.loop, signal.SIGCONT)

    def finish(self, stopped: int = 0, reason: StopReason = StopReason.NONE) -> NoReturn:
        """Kill everything else in the namespace, reap it, record how the loop ended, exit."""
        try:
            os.kill(-1, signal.SIGKILL)  # from PID 1: every other process of the namespace
        except ProcessLookupError:
            pass
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            if pid == self.loop:
                self.loop_status = status
        if self.loop_status is not None:
            self.state.write_record(self.loop_status, stopped, reason)
        os._exit(0)


def _prepare() -> tuple[int, int, int, int]:
    """Our pipes (notify from the loop, wake on SIGCHLD) and the next PID, before the loop's
    fork: (notify_r, notify_w, wake_r, wake_w)."""
    notify_r, notify_w = os.pipe()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, _noop)  # only to wake our polls (set_wakeup_fd)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    # The task loop gets our host PID as its PID in here: unique among live workers on the
    # machine (our host PID is ours alone), so pid-named files never collide.
    _syscalls.set_next_pid(int(os.readlink("/proc/self")))
    return notify_r, notify_w, wake_r, wake_w


def _map_state(state_fd: int) -> StateBlock:
    state_map = mmap.mmap(state_fd, STATE_SIZE)
    os.close(state_fd)
    return StateBlock(state_map)


def run(
    task_fd: int,
    result_fd: int,
    stop_fd: int,
    state_fd: int,
    options: WorkerOptions,
    cgroup: tuple[PoolCgroups, WorkerCgroup] | None = None,
) -> NoReturn:
    """Body of a new worker namespace's PID 1 (just forked by the fork server)."""
    try:
        state = _map_state(state_fd)
        notify_r, notify_w, wake_r, wake_w = _prepare()
        loop = os.fork()
        if loop == 0:
            signal.set_wakeup_fd(-1)
            for fd in (stop_fd, notify_r, wake_r, wake_w):
                os.close(fd)
            from . import _taskloop

            _taskloop.main(task_fd, result_fd, notify_w, state, options, cgroup)
        for fd in (task_fd, result_fd, notify_w):
            os.close(fd)
        _syscalls.set_process_name("nspool-init")
        Init(loop, stop_fd, notify_r, wake_r, state).serve()
    except BaseException:  # noqa: BLE001 - a bug here: say so; exiting kills the namespace
        traceback.print_exc()
    os._exit(70)


def run_spare(sock: socket.socket, loop_sock: socket.socket) -> NoReturn:
    """Body of a spare worker's PID 1: fork the task loop now (it waits on ``loop_sock``),
    then wait on ``sock`` for the pool that takes us (see ``_handover``). Exit if the fork
    server closes it first, or if the loop dies before a pool took us."""
    try:
        notify_r, notify_w, wake_r, wake_w = _prepare()
        loop = os.fork()
        if loop == 0:
            signal.set_wakeup_fd(-1)
            sock.close()
            for fd in (notify_r, wake_r, wake_w):
                os.close(fd)
            from . import _taskloop

            _taskloop.run_spare(loop_sock, notify_w)
        loop_sock.close()
        os.close(notify_w)

        def relay(signum: int, frame: object) -> None:
            try:
                os.kill(loop, signum)
            except ProcessLookupError:
                pass

        for sig in RELAYED:  # as Init does, until it does
            signal.signal(sig, relay)
        loop_status, (targets, fds) = _wait_for_pool(sock, wake_r, loop)
        sock.close()
        stop_fd, state_fd, *stdio = fds
        _handover.take_stdio(stdio, targets)  # our tracebacks go where the pool's workers write
        state = _map_state(state_fd)
        _syscalls.set_process_name("nspool-init")
        init = Init(loop, stop_fd, notify_r, wake_r, state)
        init.loop_status = loop_status
        init.serve()
    except BaseException:  # noqa: BLE001 - a bug here: say so; exiting kills the namespace
        traceback.print_exc()
    os._exit(70)


def _wait_for_pool(
    sock: socket.socket, wake_r: int, loop: int
) -> tuple[int | None, tuple[Any, list[int]]]:
    """Block until the fork server hands us to a pool: (the loop's wait status if it died
    meanwhile, the fds it sent). Exit (our namespace with us) if it closes our socket first,
    or if the loop dies with no pool's hand-over waiting (the server drops a spare that
    exits; it sends ours before the loop's, so a loop that died as a pool's worker finds
    ours here)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    loop_status = None
    while True:
        events = poller.poll()
        for fd, _ in events:
            if fd == wake_r:
                try:
                    os.read(wake_r, 4096)
                except BlockingIOError:
                    pass
                pid, status = os.waitpid(loop, os.WNOHANG)
                if pid:
                    loop_status = status
        if any(fd == sock.fileno() for fd, _ in events):
            got = _handover.receive(sock)
            if got is None:
                os._exit(0)
            return loop_status, got
        if loop_status is not None:
            os._exit(0)
