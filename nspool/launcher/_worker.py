"""The worker: PID 1 of its own PID namespace, running tasks read from its task pipe.

Because it is PID 1, every process a task leaves behind ends up as its descendant, and when it
exits the kernel SIGKILLs the whole namespace. Between tasks it (by default) kills whatever the
task left running with one ``kill(-1, SIGKILL)`` and reaps the orphans, so zombies never pile up
and a task's ``subprocess`` calls keep their exit codes (nothing is reaped while a task runs).
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from typing import NamedTuple, NoReturn

from .. import _serialize
from .._protocol import Frame, FrameDecoder, Kind, encode_header
from .._task_errors import TaskPicklingError, TaskUnpicklingError
from . import _syscalls


class WorkerOptions(NamedTuple):
    #: kill what a task leaves running as soon as it returns
    kill_leftovers: bool = True
    #: give the worker its own mount namespace with a /proc that shows only its namespace
    private_proc: bool = False


def mount_private_proc() -> None:
    """Give this process (PID 1 of a fresh PID namespace) a /proc of its own namespace."""
    _syscalls.unshare(_syscalls.CLONE_NEWNS)
    # Without rprivate, the new /proc would propagate back to the host's mount table.
    _syscalls.mount("none", "/", None, _syscalls.MS_REC | _syscalls.MS_PRIVATE)
    _syscalls.mount(
        "proc", "/proc", "proc", _syscalls.MS_NOSUID | _syscalls.MS_NODEV | _syscalls.MS_NOEXEC
    )


def _write_all(fd: int, bufs: list[bytes | bytearray | memoryview]) -> None:
    views = [memoryview(b).cast("B") for b in bufs if len(b)]
    while views:
        n = os.writev(fd, views[:512])
        while n:
            if n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][n:]
                n = 0


def _wipe_leftovers(kill: bool) -> None:
    """Kill (optionally) and reap everything else in this namespace."""
    if kill:
        try:
            os.kill(-1, signal.SIGKILL)  # from PID 1: every other process in the namespace
        except ProcessLookupError:
            return  # nothing else exists, so nothing to reap either
        while True:
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                return
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:  # noqa: BLE001 - a broken stdout must not kill the worker
            pass


def _on_sigterm(signum: int, frame: object) -> None:
    # PID 1 cannot die of its own SIGTERM (the kernel ignores it), so exit the way a
    # terminated process would report it to a shell.
    _flush_stdio()
    os._exit(128 + signum)


def _run_task(frame: Frame) -> tuple[Kind, bytes]:
    try:
        fn, args, kwargs = _serialize.loads(frame.payload)
    except BaseException as exc:  # noqa: BLE001
        err = TaskUnpicklingError(
            f"the worker could not unpickle the task: {type(exc).__name__}: {exc}"
        )
        err.__traceback__ = exc.__traceback__
        return Kind.ERR, _serialize.dump_error(err)
    try:
        result = fn(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - SystemExit too, as the stdlib pool does
        return Kind.ERR, _serialize.dump_error(exc)
    finally:
        del fn, args, kwargs
    try:
        return Kind.OK, _serialize.dumps_result(result)
    except BaseException as exc:  # noqa: BLE001
        perr = TaskPicklingError(
            f"the task's result of type {type(result).__name__} could not be pickled: "
            f"{type(exc).__name__}: {exc}"
        )
        return Kind.ERR, _serialize.dump_error(perr)


def _serve(task_fd: int, result_fd: int, options: WorkerOptions) -> int:
    kill_leftovers = options.kill_leftovers
    # The program knows us by our PID in the host /proc: read it before a private one hides it.
    host_pid = int(os.readlink("/proc/self"))
    if options.private_proc:
        try:
            mount_private_proc()
        except OSError as exc:
            msg = f"cannot mount a private /proc in the worker: {exc}".encode()
            _write_all(result_fd, [encode_header(Kind.INIT_FAILED, 0, len(msg)), msg])
            return 1
    _write_all(result_fd, [encode_header(Kind.READY, host_pid, 0)])
    decoder = FrameDecoder()
    while True:
        frame = decoder.next_frame()
        if frame is None:
            n = os.readv(task_fd, [decoder.get_buffer()])
            if n == 0:
                return 0  # the program closed our task pipe: we are done
            decoder.buffer_updated(n)
            continue
        if frame.kind is Kind.TASK:
            kind, payload = _run_task(frame)
            if os.getpid() != 1:
                # A task forked and its child returned instead of exiting: it must not go on
                # serving (it would write a second answer into our result pipe).
                _flush_stdio()
                os._exit(0)
            _flush_stdio()
            _wipe_leftovers(kill_leftovers)
            # Each result leaves at once, never held back for a batch: the program relies on
            # "the oldest unanswered task is the one running" to tell which task a crash
            # killed (and to requeue the others).
            _write_all(result_fd, [encode_header(kind, frame.ident, len(payload)), payload])
        elif frame.kind is Kind.INIT:
            try:
                initializer, initargs = _serialize.loads(frame.payload)
                initializer(*initargs)
            except BaseException:  # noqa: BLE001
                tb = traceback.format_exc().encode()
                _write_all(result_fd, [encode_header(Kind.INIT_FAILED, 0, len(tb)), tb])
                return 1
            finally:
                _flush_stdio()
                _wipe_leftovers(kill_leftovers)
        else:
            raise RuntimeError(f"worker got an unexpected {frame.kind.name} frame")


def main(task_fd: int, result_fd: int, options: WorkerOptions) -> NoReturn:
    """Run the worker loop, then exit without running the launcher's atexit handlers."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    code = 70
    try:
        code = _serve(task_fd, result_fd, options)
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
    finally:
        _flush_stdio()
        os._exit(code)
