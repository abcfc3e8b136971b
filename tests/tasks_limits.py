"""Task functions for the resource-limit tests (importable by workers)."""

from __future__ import annotations

import errno
import os
import random
import time

MiB = 1 << 20


def _touch(n_mib: int) -> bytearray:
    block = bytearray(n_mib * MiB)
    block[::4096] = b"x" * len(block[::4096])  # make every page resident
    return block


def _hog() -> None:
    """Allocate 8 MiB after 8 MiB for ever (until the OOM killer ends it)."""
    hog = []
    while True:
        hog.append(_touch(8))


def allocate(n_mib: int) -> int:
    """Make ``n_mib`` MiB resident in the task process itself; return the bytes."""
    return len(_touch(n_mib))


def hog_in_child(spin_us: int = 0) -> int:
    """Fork a child that allocates without end, wait for it, spin ``spin_us`` microseconds,
    then return the child's wait status: a task that would go on after its child was killed
    for memory, as most would."""
    pid = os.fork()
    if pid == 0:
        try:
            _hog()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    end = time.perf_counter() + spin_us / 1e6
    while time.perf_counter() < end:
        pass
    return status


def hog_under_own_limit(n_mib: int) -> None:
    """Put a memory limit of ``n_mib`` MiB on this task's own memory cgroup (its worker's),
    as a limit the pool did not set would, then allocate until the OOM killer ends it."""
    from nspool._cgroups.layout import detect_layout

    h = detect_layout().hierarchies["memory"]
    if h.version == 2:
        settings = {"memory.max": n_mib * MiB, "memory.swap.max": 0}
    else:
        settings = {"memory.limit_in_bytes": n_mib * MiB}
    for name, value in settings.items():
        with open(os.path.join(h.own_dir, name), "w") as f:
            f.write(str(value))
    _hog()


def wait_for_file(path: str, timeout: float = 30.0) -> str:
    """Poll until ``path`` exists (the test creates it); return ``"done"``."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.005)
    return "done"


def fork_until_refused() -> tuple[int, int]:
    """Fork children that wait (on a pipe) until fork fails; return (children, errno)."""
    r, w = os.pipe()
    kids = []
    code = 0
    try:
        while len(kids) < 10_000:
            try:
                pid = os.fork()
            except OSError as exc:
                code = exc.errno or 0
                break
            if pid == 0:
                os.close(w)
                os.read(r, 1)
                os._exit(0)
            kids.append(pid)
    finally:
        os.close(w)  # the children read EOF and exit
        os.close(r)
        for pid in kids:
            os.waitpid(pid, 0)
    return len(kids), code


def fork_bomb(refusals: int = 200) -> int:
    """A real fork bomb: every process forks as fast as it can, for ever. Return once this
    process saw ``refusals`` forks refused; the bomb's processes are left running."""
    refused = 0
    while refused < refusals:
        try:
            pid = os.fork()
        except BlockingIOError:
            refused += 1
            continue
        if pid == 0:
            while True:  # a bomb process: fork, forever, and ignore refusals
                try:
                    os.fork()
                except OSError:
                    time.sleep(0.001)
    return errno.EAGAIN


def busy(seconds: float) -> float:
    """Burn ``seconds`` of CPU in this process; return the CPU seconds it took."""
    start = time.process_time()
    end = start + seconds
    while time.process_time() < end:
        for _ in range(20_000):  # a clock read is a system call: read it seldom
            pass
    return time.process_time() - start


def busy_in_child(seconds: float) -> int:
    """Burn ``seconds`` of CPU in a child process, wait for it; return its wait status."""
    pid = os.fork()
    if pid == 0:
        try:
            busy(seconds)
        finally:
            os._exit(0)
    return os.waitpid(pid, 0)[1]


def spin_for(seconds: float) -> float:
    """Spin for ``seconds`` of wall time; return the CPU seconds this process got."""
    start = time.process_time()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(2_000):
            pass
    return time.process_time() - start


def random_spin_us(limit: int) -> int:
    return random.randrange(limit)
