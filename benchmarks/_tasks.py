"""Functions the benchmarks run in workers (importable by reference from every pool)."""

from __future__ import annotations

import os
import time


def noop(x: object = None) -> object:
    return x


def echo(data: bytes) -> bytes:
    return data


def crash() -> None:
    os._exit(3)


def load(module: str | None, pause: float = 0.0) -> int:
    """Import ``module`` (if any), sleep ``pause`` s, and return this process's PID as the host
    sees it (inside an nspool worker ``os.getpid()`` is 1; the host's /proc says who we are)."""
    if module:
        __import__(module)
    time.sleep(pause)
    return int(os.readlink("/proc/self"))
