"""Task functions for the race tests (``test_races.py``), importable by workers by reference.

Each task leaves two time marks (``time.monotonic()``, the same clock in the test and in every
worker: nspool does not create time namespaces) in a file the test maps too, one 16-byte
record per task: when it started and when it was about to return. The test reads them to aim
its kills at the moment a task completes, to tell how close each stop came to that moment, and
to prove that a task whose cancellation succeeded never ran.
"""

from __future__ import annotations

import mmap
import os
import struct
import time

RECORD = struct.Struct("dd")  # (started, finished); 0.0 = not yet

_maps: dict[str, mmap.mmap] = {}


def map_file(path: str, length: int = 0) -> mmap.mmap:
    """Map ``path`` shared, read-write, without keeping a file descriptor open."""
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            return mmap.mmap(fd, length, trackfd=False)  # type: ignore[call-arg]
        except TypeError:  # Python < 3.13: the map holds a dup of fd until it is closed
            return mmap.mmap(fd, length)
    finally:
        os.close(fd)


def _marks(path: str) -> mmap.mmap:
    m = _maps.get(path)
    if m is None:
        m = _maps[path] = map_file(path)
    return m


def work(path: str, index: int, duration: float, spin: bool, token: object) -> object:
    """Run for ``duration`` seconds (busy-spinning or sleeping), then return ``token``."""
    m = _marks(path)
    started = time.monotonic()
    struct.pack_into("d", m, index * RECORD.size, started)
    if spin:
        until = started + duration
        while time.monotonic() < until:
            pass
    elif duration > 0:
        time.sleep(duration)
    struct.pack_into("d", m, index * RECORD.size + 8, time.monotonic())
    return token


def spin(duration: float, token: object) -> object:
    """Busy-spin ``duration`` seconds, then return ``token``."""
    until = time.monotonic() + duration
    while time.monotonic() < until:
        pass
    return token


def die(duration: float, code: int = 7) -> None:
    """Busy-spin ``duration`` seconds, then exit the worker's task process with ``code``."""
    spin(duration, None)
    os._exit(code)
