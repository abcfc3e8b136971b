"""Tasks that misbehave the way real code does (tests/test_containment.py), and the innocent
task that runs beside them. Importable by workers: they run in nspool's task processes."""

from __future__ import annotations

import gc
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

#: how long an innocent task waits for the test to let it finish (it never should)
INNOCENT_PATIENCE = 60.0


def innocent(folder: str, name: str) -> str:
    """Say it started, then wait until the test says "go" (a file), and return ``name``."""
    Path(folder, f"{name}.started").touch()
    go = Path(folder, "go")
    end = time.monotonic() + INNOCENT_PATIENCE
    while not go.exists():
        if time.monotonic() > end:
            raise TimeoutError(f"{name} was never told to go")
        time.sleep(0.002)
    return name


def square(x: int) -> int:
    return x * x


# -- signals --------------------------------------------------------------------------------


def signal_self(sig: int) -> str:
    os.kill(os.getpid(), sig)
    time.sleep(0.2)  # a fatal signal ends us here; any other lets us return
    return "survived"


def signal_group(sig: int) -> str:
    os.kill(0, sig)
    time.sleep(0.2)
    return "survived"


def killpg_of_a_child(sig: int) -> str:
    """As code does that started a child without a session of its own and then kills "its"
    process group: the group is the task's."""
    child = subprocess.Popen(["sleep", "30"])
    os.killpg(os.getpgid(child.pid), sig)
    child.wait()
    time.sleep(0.2)
    return "survived"


def bash_trap_kill_0() -> str:
    """The common shell idiom: `trap 'kill 0' EXIT` kills the script's process group."""
    subprocess.run(["bash", "-c", "trap 'kill 0' EXIT; sleep 30 & true"], check=False)
    time.sleep(0.2)
    return "survived"


def signal_everyone(sig: int) -> str:
    """kill(-1): every process the task may signal; in its namespace that is its own
    children only (never PID 1, never itself)."""
    child = subprocess.Popen(["sleep", "30"])
    os.kill(-1, sig)
    status = child.wait()
    return f"child ended {status}"


def signal_parent(sig: int) -> str:
    """The task's parent is its worker's init, PID 1 of the namespace."""
    os.kill(os.getppid(), sig)
    time.sleep(0.2)
    return f"survived, parent {os.getppid()}"


def new_session() -> int:
    return os.setsid()


def new_group() -> int:
    os.setpgid(0, 0)
    return os.getpgid(0)


def exit_now(code: int) -> None:
    os._exit(code)


# -- file descriptors -----------------------------------------------------------------------


def _fds() -> list[int]:
    return sorted(int(fd) for fd in os.listdir("/proc/self/fd") if int(fd) > 2)


def close_every_fd() -> str:
    for fd in _fds():
        try:
            os.close(fd)
        except OSError:
            pass
    return "closed"


def dup2_over_every_fd() -> str:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in _fds():
        if fd != null:
            try:
                os.dup2(null, fd)
            except OSError:
                pass
    return "replaced"


def _loop() -> Any:
    """The task loop running us (nspool's own object), to find its pipes as a task that went
    looking for them would."""
    for obj in gc.get_objects():
        if type(obj).__name__ == "TaskLoop" and type(obj).__module__.endswith("_taskloop"):
            return obj
    raise RuntimeError("no TaskLoop in this process")


#: little-endian: payload length (u64), kind (u8), ident (u64): nspool's frame header
_HEADER = struct.Struct("<QBQ")


def write_result_pipe(data: bytes) -> str:
    os.write(_loop().result_fd, data)
    time.sleep(0.5)  # the program kills us once it reads them
    return "wrote"


def write_notify_pipe(data: bytes) -> str:
    os.write(_loop().notify_fd, data)
    time.sleep(0.5)  # the init kills us once it reads them
    return "wrote"


STRAY = b"\xff" * 64
HUGE_HEADER = _HEADER.pack(1000 << 30, 3, 1)  # an OK frame of 1000 GiB
FOUR_GIB_HEADER = _HEADER.pack(4 << 30, 3, 0)  # an OK frame of 4 GiB, for no task
FORGED_READY = _HEADER.pack(0, 5, 1)
FORGED_INIT_FAILED = _HEADER.pack(5, 6, 0) + b"boom!"
FORGED_OK_FOR_ANOTHER = _HEADER.pack(4, 3, 1000) + b"\x80\x05N."
#: op (u8), seq (u64), value (i64): the init's messages; 9 is no op, 4 asks it to terminate
NOTIFY_GARBAGE = b"\x09" + b"\xff" * 16
NOTIFY_TERMINATE = struct.pack("<BQq", 4, 0, 0)


# -- what one task leaves for the next ------------------------------------------------------


def leave_signal_state() -> str:
    """Block SIGTERM and SIGUSR1, ignore SIGTERM, handle SIGUSR2, arm an alarm, and return:
    none of it may reach the next task on this worker."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR1})
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, lambda signum, frame: None)
    signal.alarm(30)
    return "left"


def signal_state() -> tuple[list[int], bool, bool, int]:
    """(blocked signals, SIGTERM default, SIGUSR2 default, seconds left on an alarm)."""
    blocked = sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))
    return (
        blocked,
        signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
        signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL,
        signal.alarm(0),
    )


# -- processes ------------------------------------------------------------------------------


def fork_and_return_in_both() -> str:
    """A forked child that returns from the task instead of exiting."""
    pid = os.fork()
    if pid == 0:
        return "child"  # nspool ends it as a plain process ends, never through the loop
    os.waitpid(pid, 0)
    return "parent"


def fork_bomb() -> None:
    while True:
        try:
            os.fork()
        except OSError:
            pass


def flood_stdout(mib: int) -> str:
    line = "x" * 1023 + "\n"
    for _ in range(mib * 1024):
        sys.stdout.write(line)
    sys.stdout.flush()
    return "flooded"


def ignore_sigterm_then_sleep(path: str, seconds: float) -> str:
    """A task that will not stop for SIGTERM (it ignores it, and blocks it too)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    Path(path).touch()
    time.sleep(seconds)
    return "finished"


def unmount_proc() -> bool:
    """As a root task can: detach the worker's private /proc; then the host's shows."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(b"/proc", 2) != 0:  # MNT_DETACH
        raise OSError(ctypes.get_errno(), "umount2 /proc")
    return proc_is_private()


def proc_is_private() -> bool:
    return os.readlink("/proc/self") == str(os.getpid())
