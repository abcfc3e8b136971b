"""Task functions for test_worker_shape*.py (issue 8): they must be importable by reference in
the workers, so they live here and not in the test modules.

Synchronisation between a task and the test goes through files in the test's ``tmp_path``
(the task polls for a file with a deadline, never forever), so no multiprocessing object
crosses the pool."""

from __future__ import annotations

import faulthandler
import os
import resource
import signal
import time
import uuid

# -- file-based synchronisation ----------------------------------------------------------------


def wait_for_path(path: str, timeout: float) -> bool:
    """Poll until ``path`` exists or ``timeout`` passes; True if it appeared."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.002)  # polling a file with a deadline
    return True


def touch(path: str, text: str = "") -> None:
    """Create ``path`` atomically (write a temporary file, then rename it into place)."""
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, path)


# -- item A: a task that kills itself with a signal ---------------------------------------------


def die_by(how: str) -> str:
    """End this task the way ``how`` says; returns only if the signal was dropped (which is
    what happens to a task that runs as PID 1 of its namespace)."""
    # No core file, whatever the host's limit says (SIGSEGV, SIGABRT and SIGQUIT dump core).
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif how == "sigsegv":
        faulthandler._sigsegv()
    elif how == "abort":
        os.abort()
    elif how == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
    elif how == "sigusr1":
        os.kill(os.getpid(), signal.SIGUSR1)
    elif how == "sigquit":
        os.kill(os.getpid(), signal.SIGQUIT)
    elif how == "sigint":
        signal.raise_signal(signal.SIGINT)
    else:
        raise ValueError(how)
    # A signal a process sends itself is delivered before kill() returns: still here means
    # it was dropped.
    return f"survived {how} (pid {os.getpid()})"


def block_until(started: str, go: str, timeout: float, value: object) -> object:
    """Say "started" through a file, wait (bounded) for the test's go file, return ``value``."""
    touch(started)
    if not wait_for_path(go, timeout):
        raise TimeoutError(f"no go signal at {go} within {timeout} s")
    return value


# -- item B: PIDs ---------------------------------------------------------------------------------


def pid_rendezvous(directory: str, n: int, token: str, timeout: float) -> tuple[int, str, int]:
    """Write ``token`` to ``directory/pid-<getpid()>``, wait until ``n`` tasks have arrived
    (each leaves a uniquely named marker; bounded by ``timeout``), then read the pid file back.

    Returns (os.getpid(), what the pid file held when read back, how many tasks had arrived)."""
    pid = os.getpid()
    path = os.path.join(directory, f"pid-{pid}")
    with open(path, "w") as f:
        f.write(token)
    touch(os.path.join(directory, f"arrived-{uuid.uuid4().hex}"))
    deadline = time.monotonic() + timeout
    while True:
        arrived = sum(1 for name in os.listdir(directory) if name.startswith("arrived-"))
        if arrived >= n or time.monotonic() >= deadline:
            break
        time.sleep(0.002)  # polling the directory with a deadline
    # Everybody has written their pid file by now: read ours back.
    with open(path) as f:
        seen = f.read()
    return pid, seen, arrived


# -- item C: orphans while a task runs ----------------------------------------------------------


def make_orphans(count: int, spawned: str, go: str, timeout: float) -> int:
    """Leave ``count`` orphans behind (child forks a grandchild and exits at once; the
    grandchild exits at once; only the child is waited for), say so through ``spawned``, then
    wait (bounded) for the test's ``go``. Returns how many children were waited for."""
    waited = 0
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            try:
                if os.fork() == 0:
                    os._exit(0)  # grandchild
            finally:
                os._exit(0)  # child: its grandchild becomes an orphan
        os.waitpid(pid, 0)
        waited += 1
    touch(spawned, str(waited))
    if not wait_for_path(go, timeout):
        raise TimeoutError(f"no go signal at {go} within {timeout} s")
    return waited


# -- item D: a forked child whose exception leaves the task function ----------------------------


def fork_child_raises(kind: str) -> int:
    """Fork; the child lets an exception escape the task function (it is not caught here), the
    parent waits for it and returns its exit code."""
    pid = os.fork()
    if pid == 0:
        if kind == "exit3":
            raise SystemExit(3)
        raise ValueError("boom-marker")
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


# -- items E / F ----------------------------------------------------------------------------------


def sleep_return(seconds: float, value: object) -> object:
    time.sleep(seconds)
    return value


def slow_init(seconds: float) -> None:
    time.sleep(seconds)  # the initializer's own work: the deadline must not count it


# -- item E7: results and exceptions that cannot be unpickled in the program ---------------------


class CustomBaseError(BaseException):
    """A BaseException that is neither Exception, SystemExit nor KeyboardInterrupt."""


def _raise_system_exit() -> None:
    raise SystemExit("raised while unpickling in the program")


def _raise_custom_base() -> None:
    raise CustomBaseError("raised while unpickling in the program")


_RAISERS = {"SystemExit": _raise_system_exit, "CustomBaseError": _raise_custom_base}


class ExplodesOnUnpickle:
    """Pickles fine; unpickling it calls a function that raises a BaseException."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (_RAISERS[self.what], ())


class ErrorExplodesOnUnpickle(Exception):
    """An exception (raised by a task) whose unpickling raises a BaseException."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (_RAISERS[self.what], ())


def return_explodes_on_unpickle(what: str) -> ExplodesOnUnpickle:
    return ExplodesOnUnpickle(what)


def raise_explodes_on_unpickle(what: str) -> None:
    raise ErrorExplodesOnUnpickle(what)
