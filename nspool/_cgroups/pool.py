"""``PoolCgroups``: a pool's cgroup subtree in every hierarchy it needs, and one cgroup per
worker under it, with the pool's limits set."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterable

from .errors import CgroupError, CgroupUnavailableError
from .layout import (
    CONTROLLERS,
    HOW_TO_GET_ONE,
    PREFIX,
    Hierarchy,
    Layout,
    _read,
    _tokens,
    _v1_base,
    _v2_base,
    _v2_controller_names,
    _write,
    detect_layout,
)
from .limits import CPU_PERIOD_US, Limits
from .removal import _remove_dir, _rmdir_quiet
from .worker import UsageMeter, WorkerCgroup, _parse_keyed

__all__ = ["PoolCgroups"]


class PoolCgroups:
    """A pool's cgroup subtree: ``nspool-<pid>-<hex>`` in every hierarchy it needs, and one
    cgroup per worker under it.

    ``required``: controllers that must work (those the limits need): CgroupUnavailableError
    otherwise. ``optional``: used where they work (accounting for the ``UsageMeter``), else
    left out and their figures are None. Not thread-safe; meant for the single-threaded fork
    server. The launcher removes the whole subtree by name at its end (``removal.remove_pool``).
    """

    def __init__(
        self,
        required: Iterable[str] = (),
        optional: Iterable[str] = ("memory", "cpuacct"),
        *,
        limits: Limits | None = None,
        layout: Layout | None = None,
    ) -> None:
        self.limits = limits if limits is not None else Limits()
        required_set = set(required) | set(self.limits.controllers())
        optional_set = set(optional) - required_set
        for c in required_set | optional_set:
            if c not in CONTROLLERS:
                raise ValueError(f"unknown cgroup controller {c!r}; known: {CONTROLLERS}")
        self.layout = detect_layout() if layout is None else layout
        #: ``removal`` tells a stale subtree (its owner gone) by the PID in the name
        self.name = f"{PREFIX}-{os.getpid()}-{os.urandom(4).hex()}"
        #: controller -> the pool node serving it
        self.nodes: dict[str, str] = {}
        self._versions: dict[str, int] = {}

        problems: dict[str, str] = {}
        by_hierarchy: dict[str, tuple[Hierarchy, set[str], set[str]]] = {}
        for c in sorted(required_set | optional_set):
            h = self.layout.hierarchies.get(c)
            if h is None:
                if c in required_set:
                    problems[c] = self.layout.missing.get(c, "not mounted")
                continue
            entry = by_hierarchy.setdefault(h.key, (h, set(), set()))
            (entry[1] if c in required_set else entry[2]).add(c)

        bases: dict[str, tuple[Hierarchy, str, set[str]]] = {}
        for key, (h, req, opt) in by_hierarchy.items():
            if h.version == 1:
                base, reasons = _v1_base(h)
                if base is None:
                    for c in req:
                        problems[c] = "; ".join(reasons)
                    continue
                bases[key] = (h, base, req | opt)
                continue
            # One place for the node that passes the optional controllers down as well: a
            # v2 controller's files (memory.peak, memory.events) exist in the workers' leaves
            # only if it is enabled all the way down, and a place chosen for the required
            # ones alone (none, for usage without limits: the program's own cgroup, which
            # holds processes and so can pass nothing down) would leave them out.
            needed = _v2_controller_names(req)
            wanted = needed | _v2_controller_names(opt)
            base, reasons = _v2_base(h, wanted, enable=True)
            if base is None and wanted != needed:
                # Else the required ones alone; the optional ones' figures are then None.
                base, reasons = _v2_base(h, needed, enable=True)
            if base is None:
                for c in req:
                    problems[c] = "; ".join(reasons)
                continue
            enabled = _tokens(os.path.join(base, "cgroup.subtree_control"))
            usable = set(req) | {c for c in opt if c == "cpuacct" or c in enabled}
            bases[key] = (h, base, usable)

        if problems:
            detail = "; ".join(f"{c}: {why}" for c, why in sorted(problems.items()))
            raise CgroupUnavailableError(
                errno.EPERM,
                f"cgroup limits asked for can't be enforced here ({detail}). To get them, "
                + HOW_TO_GET_ONE,
            )

        made: list[str] = []
        try:
            for _key, (h, base, usable) in bases.items():
                node = os.path.join(base, self.name)
                os.mkdir(node)
                made.append(node)
                if h.version == 2:
                    ctl = sorted(_v2_controller_names(usable))
                    if ctl:
                        _write(
                            os.path.join(node, "cgroup.subtree_control"),
                            " ".join("+" + c for c in ctl),
                        )
                for c in usable:
                    self.nodes[c] = node
                    self._versions[c] = h.version
        except OSError as e:
            for node in reversed(made):  # new and empty: nothing to wait for
                _rmdir_quiet(node)
            raise CgroupError(
                e.errno or errno.EIO, f"creating the pool's cgroups failed: {e}"
            ) from e

    @property
    def controllers(self) -> frozenset[str]:
        """The controllers in use."""
        return frozenset(self.nodes)

    def version_of(self, controller: str) -> int | None:
        return self._versions.get(controller)

    # ---- workers

    def create_worker(self, wid: int) -> WorkerCgroup:
        """A cgroup for worker ``wid`` (``w<wid>`` under each pool node), with the pool's
        limits. CgroupError if it can't be made (nothing of it is left then)."""
        leaf = f"w{wid}"
        dirs: dict[str, str] = {}
        made: list[str] = []
        try:
            for c, node in self.nodes.items():
                d = os.path.join(node, leaf)
                if d not in made:
                    os.mkdir(d)
                    made.append(d)
                dirs[c] = d
            handle = WorkerCgroup(wid, dirs, self.limits)
            self._set_limits(handle)
        except OSError as e:
            for d in reversed(made):
                _rmdir_quiet(d)
            raise CgroupError(
                e.errno or errno.EIO, f"setting up worker {wid}'s cgroup failed: {e}"
            ) from e
        return handle

    def _set_limits(self, w: WorkerCgroup) -> None:
        lim = w.limits
        if lim.memory is not None:
            d = w.dirs["memory"]
            if self.version_of("memory") == 2:
                _write(os.path.join(d, "memory.max"), str(lim.memory))
                if os.path.exists(os.path.join(d, "memory.swap.max")):
                    _write(os.path.join(d, "memory.swap.max"), "0")
                # One OOM kill takes the whole worker (its init too, so its PID namespace):
                # a task is never left running with a child silently killed under it.
                if os.path.exists(os.path.join(d, "memory.oom.group")):
                    _write(os.path.join(d, "memory.oom.group"), "1")
            else:
                _write(os.path.join(d, "memory.limit_in_bytes"), str(lim.memory))
                # memory+swap no higher than memory: swapping does not get around the limit.
                if os.path.exists(os.path.join(d, "memory.memsw.limit_in_bytes")):
                    _write(os.path.join(d, "memory.memsw.limit_in_bytes"), str(lim.memory))
        if lim.pids is not None:
            _write(os.path.join(w.dirs["pids"], "pids.max"), str(lim.pids))
        quota = lim.cpu_quota_us
        if quota is not None:
            d = w.dirs["cpu"]
            if self.version_of("cpu") == 2:
                _write(os.path.join(d, "cpu.max"), f"{quota} {CPU_PERIOD_US}")
            else:
                _write(os.path.join(d, "cpu.cfs_period_us"), str(CPU_PERIOD_US))
                _write(os.path.join(d, "cpu.cfs_quota_us"), str(quota))

    def attach(self, w: WorkerCgroup, pid: int = 0) -> None:
        """Move process ``pid`` (as the caller's PID namespace numbers it; 0 = the caller)
        into the worker's cgroup in every hierarchy. Its later children start there; children
        it already had stay where they were, so attach right after fork, before the child runs
        anything (have it wait on a pipe)."""
        for d in w.unique_dirs():
            try:
                _write(os.path.join(d, "cgroup.procs"), str(pid))
            except OSError as e:
                raise CgroupError(
                    e.errno or errno.EIO, f"moving pid {pid} into {d} failed: {e}"
                ) from e

    # ---- accounting

    def oom_kills(self, w: WorkerCgroup) -> int | None:
        """The worker's cgroup's OOM-kill counter (None: unknown): nonzero once the OOM killer
        killed in it. v1: one per process killed (before Linux 4.13: memory.failcnt, how often
        the limit was hit). v2: the kernel's ``oom_kill``, which counts each process a group
        kill takes plus the victim once more (``memory.oom.group`` kills the victim, then the
        whole group, the victim again among them): one hog alone reads 2."""
        d = w.dirs.get("memory")
        if d is None:
            return None
        if self.version_of("memory") == 2:
            return _keyed(os.path.join(d, "memory.events")).get("oom_kill")
        return _v1_oom_kills(d)

    def oom_killed(self, w: WorkerCgroup) -> bool:
        """Did the OOM killer kill anything in the worker's cgroup? (v2: memory.events
        oom_kill; v1: memory.oom_control oom_kill, Linux >= 4.13, else memory.failcnt > 0,
        which counts hitting the limit, a near proxy). Read it before ``remove``."""
        return bool(self.oom_kills(w))

    def watch_oom(self, w: WorkerCgroup) -> int | None:
        """An eventfd that becomes readable when the worker's cgroup runs out of memory
        (v1: ``cgroup.event_control`` on ``memory.oom_control``); None where there is no such
        notification (v2 needs none: ``memory.oom.group`` kills the whole worker at once)
        or no memory controller. The caller polls it and closes it."""
        d = w.dirs.get("memory")
        if d is None or self.version_of("memory") != 1:
            return None
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            ofd = os.open(os.path.join(d, "memory.oom_control"), os.O_RDONLY | os.O_CLOEXEC)
            try:
                _write(os.path.join(d, "cgroup.event_control"), f"{efd} {ofd}")
            finally:
                os.close(ofd)  # the kernel holds its own reference from here on
        except OSError as e:
            os.close(efd)
            raise CgroupError(
                e.errno or errno.EIO, f"watching worker {w.wid}'s cgroup for OOM failed: {e}"
            ) from e
        return efd

    def meter(self, w: WorkerCgroup) -> UsageMeter:
        """A :class:`UsageMeter` of the worker's cgroup (for the process that runs its tasks)."""
        return UsageMeter(w, {c: v for c, v in self._versions.items() if c in w.dirs})

    # ---- removal

    def remove(self, w: WorkerCgroup, timeout: float = 5.0) -> None:
        """Remove the worker's cgroup once its processes are gone, waiting up to ``timeout``
        seconds for them (killed processes take a moment to leave): CgroupBusyError at the
        deadline, and a later call tries again. Idempotent."""
        if w.removed:
            return
        deadline = time.monotonic() + timeout
        for d in w.unique_dirs():
            _remove_dir(d, deadline)
        w.removed = True

    def __repr__(self) -> str:
        nodes = ", ".join(sorted(set(self.nodes.values())))
        return f"<PoolCgroups {self.name} [{nodes}]>"


# --------------------------------------------------------------------------------------------
# File helpers


def _int_file(path: str) -> int | None:
    try:
        return int(_read(path).split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _keyed(path: str) -> dict[str, int]:
    """A flat keyed file (``key value`` per line) as a dict; {} when unreadable."""
    try:
        return _parse_keyed(_read(path))
    except OSError:
        return {}


def _v1_oom_kills(d: str) -> int | None:
    ctl = _keyed(os.path.join(d, "memory.oom_control"))
    if "oom_kill" in ctl:
        return ctl["oom_kill"]
    return _int_file(os.path.join(d, "memory.failcnt"))
