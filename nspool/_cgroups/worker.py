"""A worker's cgroup (``WorkerCgroup``), and what it used: ``Usage``, and the ``UsageMeter``
that the worker's task process reads around each task."""

from __future__ import annotations

import os
from typing import NamedTuple

from .limits import Limits

__all__ = ["Usage", "UsageMeter", "WorkerCgroup"]


class Usage(NamedTuple):
    """What a cgroup used so far (``UsageMeter.read``). CPU times in seconds, memory in bytes;
    ``None`` where this machine doesn't account for it. ``memory_peak`` is the high-water mark
    since the cgroup was made or since the meter's last successful ``reset_peak``.
    ``oom_kills`` is the kernel's OOM-kill counter: it rises with each kill, but is no count of
    processes (v2 with ``memory.oom.group`` counts the chosen victim twice, once alone and once
    with its group), so compare it with zero or with an earlier reading."""

    cpu_user: float | None = None
    cpu_system: float | None = None
    memory_peak: int | None = None
    oom_kills: int | None = None


class WorkerCgroup:
    """A worker's cgroup: one directory per hierarchy in use (``dirs`` by controller)."""

    __slots__ = ("dirs", "limits", "removed", "wid")

    def __init__(self, wid: int, dirs: dict[str, str], limits: Limits) -> None:
        self.wid = wid
        self.dirs = dirs
        self.limits = limits
        self.removed = False

    def __repr__(self) -> str:
        return f"WorkerCgroup({self.wid}, {self.dirs!r}, {self.limits!r})"

    def unique_dirs(self) -> list[str]:
        return list(dict.fromkeys(self.dirs.values()))


class UsageMeter:
    """Per-task readings of one worker's cgroup, cheap enough for every task: the files are
    opened once and read with ``pread`` (a fraction of a microsecond each).

    ``read()`` gives CPU user/system seconds, the memory high-water mark and the OOM kill
    count so far; ``reset_peak()`` starts a new high-water mark where the kernel allows it."""

    def __init__(self, w: WorkerCgroup, versions: dict[str, int]) -> None:
        self._fds: list[int] = []
        self._cpu_v2 = versions.get("cpuacct") == 2
        self._mem_v2 = versions.get("memory") == 2
        self._cpu: int | None = None  # v2 cpu.stat
        self._user: int | None = None  # v1 cpuacct.usage_user (ns)
        self._sys: int | None = None  # v1 cpuacct.usage_sys (ns)
        self._peak: int | None = None
        self._events: int | None = None  # v2 memory.events, v1 memory.oom_control
        self._peak_writable = False
        d = w.dirs.get("cpuacct")
        if d is not None:
            if self._cpu_v2:
                self._cpu = self._open(d, "cpu.stat")
            else:
                self._user = self._open(d, "cpuacct.usage_user")
                self._sys = self._open(d, "cpuacct.usage_sys")
        d = w.dirs.get("memory")
        if d is not None:
            name = "memory.peak" if self._mem_v2 else "memory.max_usage_in_bytes"
            self._peak = self._open(d, name, os.O_RDWR)
            self._peak_writable = self._peak is not None
            if self._peak is None:
                self._peak = self._open(d, name)
            self._events = self._open(d, "memory.events" if self._mem_v2 else "memory.oom_control")

    def _open(self, d: str, name: str, mode: int = os.O_RDONLY) -> int | None:
        try:
            fd = os.open(os.path.join(d, name), mode | os.O_CLOEXEC)
        except OSError:
            return None
        self._fds.append(fd)
        return fd

    def reset_peak(self) -> bool:
        """Start a new memory high-water mark (between tasks); True if the kernel took it.

        v1: writes 0 to memory.max_usage_in_bytes (the peak restarts at the usage now).
        v2 on Linux >= 6.12: writes "reset" to memory.peak through the meter's fd; the kernel
        keeps that reset per open file, so ``read`` sees it through the same fd. v2 before 6.12
        (memory.peak read-only, or absent before 5.19): False; ``memory_peak`` then stays the
        peak since the worker's cgroup was made (None before 5.19), an upper bound of what the
        task used, exact only for the worker's first task."""
        if not self._peak_writable or self._peak is None:
            return False
        try:
            os.pwrite(self._peak, b"reset\n" if self._mem_v2 else b"0", 0)
        except OSError:
            self._peak_writable = False
            return False
        return True

    def read(self) -> Usage:
        user = system = None
        if self._cpu is not None:
            stat = _parse_keyed(_pread(self._cpu))
            if "user_usec" in stat and "system_usec" in stat:
                user, system = stat["user_usec"] / 1e6, stat["system_usec"] / 1e6
        elif self._user is not None and self._sys is not None:
            u, s = _pread_int(self._user), _pread_int(self._sys)
            if u is not None and s is not None:
                user, system = u / 1e9, s / 1e9
        peak = None if self._peak is None else _pread_int(self._peak)
        kills = None
        if self._events is not None:
            kills = _parse_keyed(_pread(self._events)).get("oom_kill")
        return Usage(user, system, peak, kills)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        self._cpu = self._user = self._sys = self._peak = self._events = None


def _pread(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode("ascii", "replace")
    except OSError:
        return ""


def _pread_int(fd: int) -> int | None:
    try:
        return int(_pread(fd).split()[0])
    except (ValueError, IndexError):
        return None


def _parse_keyed(text: str) -> dict[str, int]:
    result = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                result[parts[0]] = int(parts[1])
            except ValueError:
                pass
    return result
