"""The task loop: an ordinary process (the only child of its worker namespace's init) that runs
the tasks read from its task pipe and writes their results to its result pipe.

Not being PID 1, it behaves like any process: signals it sends itself act, the kernel reports
how it died, and its PID is not 1 (the init placed it at a PID unique on the machine). Just
before a task runs and just after it returns, it stores the task's seq in the state block, so
the init can stop exactly that task (see ``_init``). Between tasks it (by default) kills
whatever the task left running; the init reaps the orphans.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # CPython's C module under signal
import atexit
import errno
import fcntl
import mmap
import os
import pickle
import select
import signal
import socket
import sys
import time
import traceback
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn

from .._core import serialize, task_errors
from .._core.protocol import (
    STATE_SIZE,
    InitMsg,
    Kind,
    LoopFault,
    Op,
    ProtocolError,
    StateBlock,
    encode_header,
    encode_init_msg,
    encode_task_head,
    encode_usage,
    split_task,
)
from .._core.protocol import (
    FrameDecoder as _FrameDecoder,
)
from . import _handover, _syscalls

if TYPE_CHECKING:
    from .._cgroups.pool import PoolCgroups
    from .._cgroups.worker import Usage, UsageMeter, WorkerCgroup


class WorkerOptions(NamedTuple):
    #: kill what a task leaves running as soon as it returns
    kill_leftovers: bool = True
    #: give the worker its own mount namespace with a /proc that shows only its namespace
    private_proc: bool = False


#: how the task loop resets what it inherited from the fork server: a task sees the signal
#: dispositions of a fresh Python process
_DEFAULT_SIGNALS = (
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGCHLD,
    signal.SIGALRM,
)


def mount_private_proc() -> None:
    """Give this process a mount namespace with a /proc of its own PID namespace."""
    _syscalls.unshare(_syscalls.CLONE_NEWNS)
    # Without rprivate, the new /proc would propagate back to the host's mount table.
    _syscalls.mount("none", "/", None, _syscalls.MS_REC | _syscalls.MS_PRIVATE)
    _mount_proc()


def _mount_proc() -> None:
    _syscalls.mount(
        "proc", "/proc", "proc", _syscalls.MS_NOSUID | _syscalls.MS_NODEV | _syscalls.MS_NOEXEC
    )


def _proc_is_ours() -> bool:
    """Whether /proc shows our own PID namespace (its /proc/self is the PID we have here)."""
    try:
        return os.readlink("/proc/self") == str(os.getpid())
    except OSError:
        return False


def _write_all(fd: int, bufs: list[bytes | bytearray | memoryview]) -> None:
    # Usually one writev takes it all (a result is small, the pipe empty): check and go.
    n = os.writev(fd, bufs)
    if n == sum(memoryview(b).nbytes for b in bufs):
        return
    views = [memoryview(b).cast("B") for b in bufs if len(b)]
    while n:  # skip what the first writev took
        if n >= len(views[0]):
            n -= len(views.pop(0))
        else:
            views[0] = views[0][n:]
            n = 0
    while views:
        n = os.writev(fd, views[:512])
        while n:
            if n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][n:]
                n = 0


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:  # noqa: BLE001 - a broken stdout must not kill the worker
            pass


def _wipe_leftovers(kill: bool) -> None:
    """Kill (optionally) what the task left in the namespace, and reap our own children (the
    init reaps the rest). With ``kill``, return only once nothing else is left but the init."""
    while True:
        if kill:
            try:
                # From a process that is not PID 1: everything in the namespace but PID 1 and
                # ourselves. ESRCH once only we and the init remain, zombies included.
                os.kill(-1, signal.SIGKILL)
            except ProcessLookupError:
                kill = False
        while True:
            try:
                pid, _ = os.waitpid(-1, 0 if kill else os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
        if not kill:
            return
        select.select([], [], [], 0.0002)  # grandchildren: the init is reaping them now


def _exit_as_forked_child(exc: BaseException | None) -> NoReturn:
    """A task forked and its child came back here instead of exiting: end it the way a plain
    Python process ends (exit code, traceback, atexit handlers), never through the loop."""
    code = 0
    if isinstance(exc, SystemExit):
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code & 0xFF
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    elif exc is not None:
        try:
            sys.excepthook(type(exc), exc, exc.__traceback__)
        except BaseException:  # noqa: BLE001
            traceback.print_exception(type(exc), exc, exc.__traceback__)
        code = 1
    try:
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001
        pass
    _flush_stdio()
    if isinstance(exc, KeyboardInterrupt):
        # As CPython does: die of SIGINT, so the parent's waitpid sees the signal.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        code = 130
    os._exit(code)


#: signals whose disposition a task may change and the next task must not inherit (SIGPIPE:
#: Python ignores it at start; SIGINT raises KeyboardInterrupt; the rest as _DEFAULT_SIGNALS)
_WATCHED_SIGNALS = (signal.SIGINT, signal.SIGPIPE, *_DEFAULT_SIGNALS)


class _WorkerGone(Exception):
    """The loop cannot go on: a task took its pipes, or its task stream is not nspool's."""

    def __init__(self, fault: LoopFault, message: str) -> None:
        super().__init__(message)
        self.fault = fault


_F_GETPIPE_SZ = 1032


def _identity(fd: int) -> int:
    """What tells our pipe from what a task may have put in its place, cheaply (this runs
    after every task; ``os.fstat`` costs five times more): its buffer size, -1 for a closed fd
    or one that is no pipe (``/dev/null``, a file). Our pipes' sizes are set when made."""
    try:
        return fcntl.fcntl(fd, _F_GETPIPE_SZ)
    except OSError:
        return -1


class TaskLoop:
    def __init__(
        self,
        task_fd: int,
        result_fd: int,
        notify_fd: int,
        state: StateBlock,
        opts: WorkerOptions,
        host_pid: int,
        meter: UsageMeter | None = None,
    ) -> None:
        self.host_pid = host_pid
        #: reads this worker's cgroup around each task (pools with limits or usage)
        self.meter = meter
        self.task_fd = task_fd
        self.result_fd = result_fd
        self.notify_fd = notify_fd
        self.state = state
        self.kill_leftovers = opts.kill_leftovers
        self.private_proc = opts.private_proc
        self.pid = os.getpid()
        #: what our pipes are, to notice a task that closed or replaced one (its result would
        #: go nowhere, or somewhere else, and the program would wait for it for ever)
        self.pipes = [(fd, _identity(fd)) for fd in (task_fd, result_fd, notify_fd) if fd >= 0]
        #: the signal dispositions every task starts with (_signal's raw view: the signal
        #: module's getsignal wraps it in enums, ten times slower)
        self.dispositions = {sig: _signal.getsignal(sig) for sig in _WATCHED_SIGNALS}

    def after_task(self) -> None:
        """Undo what a task may leave for the next one on this worker: its signal mask and
        handlers, a pending alarm; and make sure it left nspool's pipes as they were."""
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in self.dispositions.items():
            if _signal.getsignal(sig) is not handler:
                signal.signal(sig, handler)
        if self.private_proc and not _proc_is_ours():
            # A task with the privilege to (root, or the owner of the worker's user namespace)
            # unmounted the private /proc, or mounted over it: the next task gets it back.
            try:
                _mount_proc()
            except OSError as exc:
                raise _WorkerGone(
                    LoopFault.PRIVATE_PROC,
                    f"a task undid the worker's private /proc, which cannot be mounted again: "
                    f"{exc}",
                ) from None
        for fd, identity in self.pipes:
            if _identity(fd) != identity:
                raise _WorkerGone(
                    LoopFault.PIPES,
                    f"the task closed or replaced nspool's pipe on fd {fd}: its worker cannot "
                    "answer any more",
                )

    def send(
        self, kind: Kind, ident: int, payload: bytes | bytearray = b"", before: bytes = b""
    ) -> None:
        """Write one frame (``before``: whole frames that go ahead of it in the same write)."""
        _write_all(self.result_fd, [before, encode_header(kind, ident, len(payload)), payload])

    def run_task(self, seq: int, timeout: float | None, data: Any) -> tuple[Kind, bytes]:
        if timeout is not None:
            deadline = time.monotonic_ns() + int(timeout * 1e9)
            os.write(self.notify_fd, encode_init_msg(InitMsg(Op.DEADLINE, seq, deadline)))
        try:
            fn, args, kwargs = serialize.loads(data)
        except BaseException as exc:  # noqa: BLE001
            err = task_errors.TaskUnpicklingError(
                f"the worker could not unpickle the task: {type(exc).__name__}: {exc}", exc
            )
            err.__traceback__ = exc.__traceback__
            return Kind.ERR, serialize.dump_error(err)
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - SystemExit too, as the stdlib pool does
            if os.getpid() != self.pid:
                _exit_as_forked_child(exc)
            return Kind.ERR, serialize.dump_error(exc)
        finally:
            del fn, args, kwargs
        if os.getpid() != self.pid:
            _exit_as_forked_child(None)
        try:
            return Kind.OK, serialize.dumps_result(result)
        except Exception as exc:  # noqa: BLE001
            perr = task_errors.TaskPicklingError(
                f"the task's result of type {type(result).__name__} could not be pickled: "
                f"{type(exc).__name__}: {exc}",
                exc,
            )
            return Kind.ERR, serialize.dump_error(perr)
        except BaseException as exc:  # noqa: BLE001 - SystemExit...: the task's outcome, as the
            return Kind.ERR, serialize.dump_error(exc)  # stdlib pool reports it

    def begin_usage(self) -> tuple[float, Usage] | None:
        """With a meter: restart the peak and read the cgroup before a task (None without)."""
        if self.meter is None:
            return None
        self.meter.reset_peak()
        return time.monotonic(), self.meter.read()

    def usage_frame(self, seq: int, begun: tuple[float, Usage], ended: float) -> bytes:
        """The USAGE frame of task ``seq``, read once its leftovers are gone; the task fails
        instead when a process of its tree was killed for memory meanwhile."""
        assert self.meter is not None
        start, before = begun
        after = self.meter.read()
        if (after.oom_kills or 0) > (before.oom_kills or 0):
            # The task came back before the pool killed the worker for it: it failed all the
            # same. Dying here (the init records it) lets the program report MemoryLimitError.
            os.kill(os.getpid(), signal.SIGKILL)
        user = system = None
        if after.cpu_user is not None and before.cpu_user is not None:
            user = max(0.0, after.cpu_user - before.cpu_user)
        if after.cpu_system is not None and before.cpu_system is not None:
            system = max(0.0, after.cpu_system - before.cpu_system)
        usage = encode_usage(ended - start, user, system, after.memory_peak)
        return encode_header(Kind.USAGE, seq, len(usage)) + usage

    def serve(self) -> int:
        decoder = _FrameDecoder()
        state = self.state
        initialized = False
        while True:
            frame = decoder.next_frame()
            if frame is None:
                n = os.readv(self.task_fd, [decoder.get_buffer()])
                if n == 0:
                    return 0  # the program closed our task pipe: we are done
                try:
                    decoder.buffer_updated(n)
                except ProtocolError as exc:
                    raise _WorkerGone(
                        LoopFault.TASK_STREAM,
                        f"the task pipe carried bytes that are not nspool's ({exc}): a task "
                        "read from or wrote to it",
                    ) from None
                continue
            kind = frame.kind
            if kind is Kind.TASK or kind is Kind.TIMED_TASK:
                seq = frame.ident
                # Store "seq runs" first, then look for a stop: the init decides with us
                # stopped, so it either sees the task running or dooms it before we look.
                state.set_started(seq, True)
                if state.is_doomed(seq):
                    state.set_started(seq, False)
                    self.send(Kind.SKIPPED, seq)
                    continue
                timeout, data = split_task(frame)
                begun = self.begin_usage()
                kind, payload = self.run_task(seq, timeout, data)
                state.set_started(seq, False)
                ended = time.monotonic() if begun is not None else 0.0
                del frame, data
                _flush_stdio()
                _wipe_leftovers(self.kill_leftovers)
                self.after_task()
                # Each result leaves at once, never held back for a batch: results answer the
                # tasks in the order they were written. A USAGE frame goes first, same write.
                head = b"" if begun is None else self.usage_frame(seq, begun, ended)
                self.send(kind, seq, payload, head)
            elif kind is Kind.INIT and not initialized:
                initialized = True
                try:
                    if len(frame.payload):
                        initializer, initargs = serialize.loads(frame.payload)
                        initializer(*initargs)
                except BaseException:  # noqa: BLE001
                    self.send(Kind.INIT_FAILED, 0, traceback.format_exc().encode())
                    return 1
                finally:
                    _flush_stdio()
                    _wipe_leftovers(self.kill_leftovers)
                # Ready only now: a task's deadline never counts the initializer.
                self.send(Kind.READY, self.host_pid)
            else:
                raise _WorkerGone(
                    LoopFault.TASK_STREAM,
                    f"the task pipe carried a {kind.name} frame, which the program never sends",
                )


def _reset_signals() -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in _DEFAULT_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)


def main(
    task_fd: int,
    result_fd: int,
    notify_fd: int,
    state: StateBlock,
    options: WorkerOptions,
    cgroup: tuple[PoolCgroups, WorkerCgroup] | None = None,
) -> NoReturn:
    """Run the task loop, then exit without running the launcher's atexit handlers."""
    code = 70
    try:
        _reset_signals()
        _syscalls.set_process_name("nspool-worker")
        # The program knows us by our PID in the host /proc: read it before a private one
        # hides it.
        host_pid = int(os.readlink("/proc/self"))
        if options.private_proc:
            try:
                mount_private_proc()
            except OSError as exc:
                msg = f"cannot mount a private /proc in the worker: {exc}".encode()
                _write_all(result_fd, [encode_header(Kind.INIT_FAILED, 0, len(msg)), msg])
                os._exit(1)
        meter = None if cgroup is None else cgroup[0].meter(cgroup[1])
        code = TaskLoop(task_fd, result_fd, notify_fd, state, options, host_pid, meter).serve()
    except BrokenPipeError:
        pass  # the pool closed its end (shut down while we started): nobody to tell
    except _WorkerGone as exc:
        # The program learns why from the state block once the worker is gone.
        state.set_fault(exc.fault)
        print(f"nspool: {exc}", file=sys.stderr)
    except OSError as exc:
        if exc.errno != errno.EBADF:
            traceback.print_exc()
        else:  # a task closed one of our pipes while it ran
            state.set_fault(LoopFault.PIPES)
            print(f"nspool: a task closed one of nspool's pipes ({exc})", file=sys.stderr)
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
    finally:
        _flush_stdio()
        os._exit(code)


def run_spare(sock: socket.socket, notify_fd: int) -> NoReturn:
    """A spare worker's task loop: wait on ``sock`` for the fork server to hand us to a pool
    (its options and setup, our fds), become that pool's worker and run :func:`main`."""
    try:
        _reset_signals()
        _rehearse()
        got = _handover.receive(sock)
        if got is None:
            os._exit(0)  # the fork server dropped us (it is gone, or so is our init)
        sock.close()
        (options, setup, targets), fds = got
        task_fd, result_fd, state_fd, *stdio = fds
        _handover.take_stdio(stdio, targets)
        setup.apply()
        state = StateBlock(mmap.mmap(state_fd, STATE_SIZE))
        os.close(state_fd)
    except BaseException:  # noqa: BLE001 - say why; the program sees the worker die
        traceback.print_exc()
        _flush_stdio()
        os._exit(70)
    main(task_fd, result_fd, notify_fd, state, options)


#: the rehearsal's task, pickled once in the fork server
_REHEARSAL_CALL = pickle.dumps((abs, (-1,), {}), serialize.PROTOCOL)


def _rehearse() -> None:
    """Run a worker's first steps once, on pipes of our own: an initializer-less INIT and a
    task calling a builtin. What the first real task touches (objects whose counts change,
    code the interpreter specialises) is then copied from the fork server's pages here, while
    we wait as a spare, not while a pool waits for our first result."""
    task_r, task_w = os.pipe()
    result_r, result_w = os.pipe()
    try:
        call = _REHEARSAL_CALL
        os.write(task_w, encode_header(Kind.INIT, 0, 0))
        os.write(task_w, encode_task_head(1, len(call), None) + call)
        os.close(task_w)
        task_w = -1
        state = StateBlock(mmap.mmap(-1, STATE_SIZE))
        loop = TaskLoop(task_r, result_w, -1, state, WorkerOptions(), 0)
        loop.serve()
        state.release()
    finally:
        for fd in (task_r, task_w, result_r, result_w):
            if fd >= 0:
                os.close(fd)
