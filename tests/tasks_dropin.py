"""Task functions for test_dropin.py (ProcessPoolExecutor drop-in behaviours), importable by
workers by reference."""

from __future__ import annotations

import os
import pickle
import threading
import time
from typing import Any, NoReturn


def fill_proxies(q: Any, d: Any, x: int) -> int:
    """Use a ``multiprocessing.Manager()`` queue and dict passed in as arguments."""
    q.put(x)
    d[x] = x * 10
    return x


class Obj:
    """A small object whose lifetime the free-reference tests watch with a weak reference."""

    def __init__(self, n: int) -> None:
        self.n = n


def make_obj(n: int = 0) -> Obj:
    return Obj(n)


def echo(x: object) -> object:
    return x


def return_lock() -> object:
    """A result that cannot be pickled (pickling raises TypeError), made in the worker."""
    return threading.Lock()


class ReduceRaisesPicklingError:
    """Pickling it raises ``pickle.PicklingError`` itself."""

    def __reduce__(self) -> NoReturn:
        raise pickle.PicklingError("ReduceRaisesPicklingError refuses to be pickled")


class ExitOnReduce:
    """Pickling it raises ``SystemExit(3)`` (in the worker, when it is a task's result)."""

    def __reduce__(self) -> NoReturn:
        raise SystemExit(3)


def return_exit_on_reduce() -> ExitOnReduce:
    return ExitOnReduce()


def _fail_at_load(message: str) -> NoReturn:
    raise ValueError(message)


class FailsOnLoad:
    """Pickles fine; unpickling it (in the worker) raises ValueError."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_fail_at_load, ("FailsOnLoad cannot be rebuilt",))


def raise_with_marker() -> NoReturn:
    raise ValueError("raised-by-the-task")  # MARKER-LINE-7f3a


def sleep_a_tenth() -> None:
    time.sleep(0.1)


def sleep_then_pid(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def wait_for_peers(folder: str, i: int, n: int) -> tuple[int, bool]:
    """Create ``folder/i``, then wait (at most 10 s) until ``n`` such files exist: only tasks
    that run at the same time all see them. Returns (this worker's PID, whether all were
    seen)."""
    with open(os.path.join(folder, str(i)), "w") as f:
        f.write("x")
    deadline = time.monotonic() + 10
    while True:
        if len(os.listdir(folder)) >= n:
            return os.getpid(), True
        if time.monotonic() >= deadline:
            return os.getpid(), False
        time.sleep(0.005)  # polling a folder with a deadline, not synchronisation


def send_through(conn: Any, x: object) -> int:
    """Send ``x`` through a ``multiprocessing`` Connection passed in as an argument."""
    conn.send(x)
    conn.close()
    return os.getpid()
