"""Resource limits for one worker's cgroup, validated as a user passed them."""

from __future__ import annotations

import math
from typing import NamedTuple

from .._core.sizes import parse_size

__all__ = [
    "CPU_MIN_QUOTA_US",
    "CPU_PERIOD_US",
    "Limits",
    "parse_cpu_limit",
    "parse_memory_limit",
    "parse_pids_limit",
]

#: ``cpu_limit`` is written as a quota per this period (the kernel's default, 100 ms)
CPU_PERIOD_US = 100_000
#: the kernel refuses a CFS quota below 1 ms
CPU_MIN_QUOTA_US = 1_000


def parse_memory_limit(value: int | str) -> int:
    """Bytes from an int or a string: ``"512M"``, ``"2G"``, ``"1.5g"``, ``"64MiB"``, ``"4096"``
    (K/M/G/T/P are binary multiples: 1K = 1024). Raises ValueError for anything else, or for a
    limit below one page (4 KiB)."""
    return parse_size(value, "memory_limit", minimum=4096)


def parse_pids_limit(value: int) -> int:
    """A process count >= 1 (the worker's init counts: a worker needs at least 2)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"pids_limit must be an int, not {value!r}")
    if value < 1:
        raise ValueError(f"pids_limit must be at least 1, not {value}")
    return value


def parse_cpu_limit(value: float) -> float:
    """A positive fraction of one CPU (``0.5`` = half a CPU, ``2`` = two CPUs), at least 0.01
    (the kernel's smallest quota is 1 ms per 100 ms period)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"cpu_limit must be a number (a fraction of one CPU), not {value!r}")
    if not math.isfinite(value) or value < CPU_MIN_QUOTA_US / CPU_PERIOD_US:
        raise ValueError(
            f"cpu_limit must be a finite fraction of one CPU >= "
            f"{CPU_MIN_QUOTA_US / CPU_PERIOD_US}, not {value!r}"
        )
    return float(value)


class Limits(NamedTuple):
    """Validated limits for one worker's cgroup; ``None`` means no limit."""

    memory: int | None = None
    pids: int | None = None
    cpu: float | None = None

    @classmethod
    def parse(
        cls,
        memory_limit: int | str | None = None,
        pids_limit: int | None = None,
        cpu_limit: float | None = None,
    ) -> Limits:
        """Validate what a user passed; ValueError with the reason for bad input."""
        return cls(
            memory=None if memory_limit is None else parse_memory_limit(memory_limit),
            pids=None if pids_limit is None else parse_pids_limit(pids_limit),
            cpu=None if cpu_limit is None else parse_cpu_limit(cpu_limit),
        )

    def controllers(self) -> frozenset[str]:
        """The controllers these limits need."""
        wanted = {"memory": self.memory, "pids": self.pids, "cpu": self.cpu}
        return frozenset(name for name, v in wanted.items() if v is not None)

    @property
    def cpu_quota_us(self) -> int | None:
        if self.cpu is None:
            return None
        return max(CPU_MIN_QUOTA_US, round(self.cpu * CPU_PERIOD_US))

    def __bool__(self) -> bool:
        return bool(self.controllers())
