"""Task functions used by the end-to-end tests (importable by workers by reference)."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time


def host_pid() -> int:
    """This process's PID as the host (the test) sees it."""
    return int(os.readlink("/proc/self"))


def ns_pid_and_host_pid() -> tuple[int, int]:
    return os.getpid(), host_pid()


def square(x: int) -> int:
    return x * x


def echo(x: object) -> object:
    return x


def raise_value_error(msg: str) -> None:
    raise ValueError(msg)


def spawn_daemon() -> int:
    """Double-fork a setsid'd, SIGTERM-ignoring daemon; return its host PID."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            if os.fork() == 0:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                os.close(r)
                os.write(w, str(host_pid()).encode())
                os.close(w)
                os.execvp("sleep", ["sleep", "1000"])
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    data = b""
    while chunk := os.read(r, 64):
        data += chunk
    os.close(r)
    return int(data)


def spawn_tree(children: int) -> list[int]:
    """Start ``children`` un-waited ``sleep`` processes plus a daemon; return host PIDs."""
    procs = [subprocess.Popen(["sleep", "1000"]) for _ in range(children)]
    me = host_pid()
    # Host PIDs of our children, read from the host's /proc (still mounted in the worker).
    pids: list[int] = []
    for tid in os.listdir(f"/proc/{me}/task"):
        with open(f"/proc/{me}/task/{tid}/children") as f:
            pids += [int(p) for p in f.read().split()]
    assert len(pids) >= len(procs)
    return pids + [spawn_daemon()]


def touch_then_sleep_forever(path: str) -> None:
    """Say "started" (create ``path``), then block until killed."""
    with open(path, "w"):
        pass
    sleep_forever()


def sleep_forever() -> None:
    while True:
        time.sleep(1000)


def block_on_fd(fd_path: str) -> str:
    """Block until the test writes to (or closes) a FIFO; used as a controllable long task."""
    with open(fd_path) as f:
        return f.read()


def segfault() -> None:
    ctypes.string_at(0)


def hard_exit(code: int) -> None:
    os._exit(code)


def call_sys_exit(code: int) -> None:
    sys.exit(code)


def print_and_return(text: str) -> str:
    print(text)
    print(text, file=sys.stderr)
    return text


def subprocess_exit_code(code: int) -> int:
    return subprocess.run(["sh", "-c", f"exit {code}"]).returncode


def leave_orphan_zombie() -> int:
    """Leave a child and a grandchild that have both exited; return the task's host PID.
    The grandchild is an orphan: the worker's init reaps it at once; the child stays a
    zombie of this process."""
    r, w = os.pipe()
    if os.fork() == 0:
        if os.fork() == 0:
            os._exit(0)  # grandchild: exits, reparented to PID 1 first
        os._exit(0)
    os.close(w)
    while os.read(r, 64):  # EOF once child and grandchild have both closed the pipe
        pass
    os.close(r)
    deadline = time.monotonic() + 10
    while children_states() != ["Z"] and time.monotonic() < deadline:
        time.sleep(0.001)
    assert children_states() == ["Z"], children_states()
    return host_pid()


def children_states() -> list[str]:
    """States of the worker's direct children, from the host /proc."""
    me = host_pid()
    out = []
    for tid in os.listdir(f"/proc/{me}/task"):
        with open(f"/proc/{me}/task/{tid}/children") as f:
            for pid in f.read().split():
                with open(f"/proc/{pid}/stat") as s:
                    out.append(s.read().rsplit(")", 1)[1].split()[0])
    return out


_initialized: list[object] = []


def init_store(value: object) -> None:
    _initialized.append(value)


def read_store() -> list[object]:
    return list(_initialized)


def init_fail() -> None:
    raise RuntimeError("initializer exploded")


def modules_loaded(names: list[str]) -> dict[str, bool]:
    return {n: n in sys.modules for n in names}


class Unpicklable:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        raise TypeError("Unpicklable refuses to be pickled")


def return_unpicklable() -> Unpicklable:
    return Unpicklable()


class UnpicklableError(Exception):
    def __init__(self) -> None:
        super().__init__("carries a lock")
        import threading

        self.lock = threading.Lock()


def raise_unpicklable_error() -> None:
    raise UnpicklableError()


class NotUnpicklableError(Exception):
    """Pickles fine but cannot be rebuilt: __init__ needs two arguments."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(a)
        self.b = b


def raise_not_unpicklable() -> None:
    raise NotUnpicklableError(1, 2)


def exhaust_memory_in_cgroup(cgroup_dir: str) -> None:
    """Move this worker into a memory-limited cgroup, then allocate until the OOM killer
    strikes."""
    with open(os.path.join(cgroup_dir, "cgroup.procs"), "w") as f:
        f.write("0")  # "0" means the writing process
    hog = []
    while True:
        hog.append(bytearray(8 * 1024 * 1024))
        hog[-1][::4096] = b"x" * len(hog[-1][::4096])  # touch every page


def spawn_daemon_then_sleep(pid_file: str, seconds: float) -> None:
    """Start a daemon (it must die with the task), write its PID to ``pid_file``, sleep."""
    pid = spawn_daemon()
    with open(pid_file + ".tmp", "w") as f:
        f.write(str(pid))
    os.rename(pid_file + ".tmp", pid_file)
    time.sleep(seconds)


def sleep_then_square(seconds: float, x: int) -> int:
    time.sleep(seconds)
    return x * x


def sleep_then_touch(seconds: float, path: str) -> None:
    time.sleep(seconds)
    with open(path, "w") as f:
        f.write("done")


def proc_view() -> tuple[list[int], list[int]]:
    """PIDs visible in /proc, alone (the init and the task) and with one child running."""
    alone = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    child = subprocess.Popen(["sleep", "1000"])
    with_child = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    child.kill()
    child.wait()
    return alone, with_child


def write_file(path: str) -> None:
    with open(path, "w") as f:
        f.write("x")


def fork_and_return_in_child() -> str:
    """A careless task: its forked child returns instead of exiting."""
    pid = os.fork()
    if pid == 0:
        return "child"
    os.waitpid(pid, 0)
    return "parent"
