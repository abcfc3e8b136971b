"""``TaskUsage``: what one task's process tree used, as the kernel accounted it."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TaskUsage"]


@dataclass(frozen=True)
class TaskUsage:
    """What a task and every process it started used, read from its worker's cgroup.

    Measured for pools with resource limits or ``track_usage=True``, for tasks that returned a
    result or raised (not for tasks that were killed). The worker's cgroup holds that task's
    tree alone while it runs, so the figures are the task's, children and daemons included.
    """

    #: seconds from the worker starting the task to its result being pickled
    wall_time: float
    #: CPU seconds in user mode, of the whole tree (None: this machine does not account it)
    cpu_user: float | None
    #: CPU seconds in the kernel, of the whole tree (None: not accounted)
    cpu_system: float | None
    #: the tree's memory high-water mark in bytes, page cache included (None: not accounted).
    #: It restarts at each task where the kernel allows (cgroup v1; v2 from Linux 6.12);
    #: on older v2 kernels it is the peak since the worker started.
    memory_peak: int | None

    @property
    def cpu_time(self) -> float | None:
        """User plus system CPU seconds (None where either is unknown)."""
        if self.cpu_user is None or self.cpu_system is None:
            return None
        return self.cpu_user + self.cpu_system
