"""``PoolCgroups``: a pool's cgroup subtree in every hierarchy it needs, and one cgroup per
worker under it, with the pool's limits set."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterable

from .errors import CgroupBusyError, CgroupError, CgroupUnavailableError
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
from .removal import _kill_all, _procs, _remove_dir, _rmdir_quiet, _subdirs
from .worker import Usage, UsageMeter, WorkerCgroup, _parse_keyed

__all__ = ["PoolCgroups"]


class PoolCgroups:
    """A pool's cgroup subtree: ``nspool-<pid>-<hex>`` in every hierarchy it needs, and one
    cgroup per worker under it.

    ``required``: controllers that must work (those the limits need): CgroupUnavailableError
    otherwise. ``optional``: used where they work (accounting for ``usage``), else left out and
    their figures are None. Not thread-safe; meant for the single-threaded fork server.
    """

    def __init__(
        self,
        required: Iterable[str] = (),
        optional: Iterable[str] = ("memory", "cpuacct"),
        *,
        limits: Limits | None = None,
        layout: Layout | None = None,
        owner_pid: int | None = None,
        name: str | None = None,
    ) -> None:
        self.limits = limits if limits is not None else Limits()
        required_set = set(required) | set(self.limits.controllers())
        optional_set = set(optional) - required_set
        for c in required_set | optional_set:
            if c not in CONTROLLERS:
                raise ValueError(f"unknown cgroup controller {c!r}; known: {CONTROLLERS}")
        self.layout = detect_layout() if layout is None else layout
        owner = os.getpid() if owner_pid is None else owner_pid
        self.name = name if name is not None else f"{PREFIX}-{owner}-{os.urandom(4).hex()}"
        if "/" in self.name or self.name in ("", ".", ".."):
            raise ValueError(f"bad cgroup name {self.name!r}")
        #: controller -> the pool node serving it
        self.nodes: dict[str, str] = {}
        #: pool nodes made, in creation order, with their hierarchy's version
        self._created: dict[str, int] = {}
        self._versions: dict[str, int] = {}
        self._workers: dict[int, WorkerCgroup] = {}
        self._closed = False

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

        try:
            for _key, (h, base, usable) in bases.items():
                node = os.path.join(base, self.name)
                os.mkdir(node)
                self._created[node] = h.version
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
            self._remove_nodes(deadline=time.monotonic() + 1.0)
            raise CgroupError(
                e.errno or errno.EIO, f"creating the pool's cgroups failed: {e}"
            ) from e

    # ---- construction from limits

    @classmethod
    def for_limits(
        cls,
        limits: Limits,
        *,
        usage: bool = True,
        layout: Layout | None = None,
        owner_pid: int | None = None,
    ) -> PoolCgroups:
        """The subtree a pool with ``limits`` needs; with ``usage`` also the accounting
        controllers where they work."""
        return cls(
            limits.controllers(),
            ("memory", "cpuacct") if usage else (),
            limits=limits,
            layout=layout,
            owner_pid=owner_pid,
        )

    def __enter__(self) -> PoolCgroups:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def controllers(self) -> frozenset[str]:
        """The controllers in use."""
        return frozenset(self.nodes)

    def version_of(self, controller: str) -> int | None:
        return self._versions.get(controller)

    # ---- workers

    def create_worker(
        self,
        wid: int,
        memory_limit: int | str | None = None,
        pids_limit: int | None = None,
        cpu_limit: float | None = None,
    ) -> WorkerCgroup:
        """A cgroup for worker ``wid``, with the pool's limits, each overridden by the
        argument given here. A limit whose controller the pool doesn't hold raises
        CgroupUnavailableError."""
        if self._closed:
            raise CgroupError(errno.EINVAL, "the pool's cgroups are closed")
        if wid in self._workers and not self._workers[wid].removed:
            raise ValueError(f"worker {wid} already has a cgroup")
        given = Limits.parse(memory_limit, pids_limit, cpu_limit)
        limits = Limits(
            memory=given.memory if given.memory is not None else self.limits.memory,
            pids=given.pids if given.pids is not None else self.limits.pids,
            cpu=given.cpu if given.cpu is not None else self.limits.cpu,
        )
        lacking = limits.controllers() - self.controllers
        if lacking:
            raise CgroupUnavailableError(
                errno.EINVAL,
                f"this pool's cgroups have no {', '.join(sorted(lacking))} controller; "
                f"ask for the limit when the pool is made",
            )
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
            handle = WorkerCgroup(wid, dirs, limits)
            self._set_limits(handle)
        except OSError as e:
            for d in reversed(made):
                _rmdir_quiet(d)
            raise CgroupError(
                e.errno or errno.EIO, f"setting up worker {wid}'s cgroup failed: {e}"
            ) from e
        self._workers[wid] = handle
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

    def pids(self, w: WorkerCgroup) -> set[int]:
        """The processes in the worker's cgroups now."""
        result: set[int] = set()
        for d in w.unique_dirs():
            result |= _procs(d)
        return result

    # ---- accounting

    def usage(self, w: WorkerCgroup) -> Usage:
        """What the worker's cgroup used so far (see ``Usage``); compare two readings with
        ``Usage.since``."""
        user = system = total = None
        d = w.dirs.get("cpuacct")
        if d is not None:
            if self.version_of("cpuacct") == 2:
                stat = _keyed(os.path.join(d, "cpu.stat"))
                if "usage_usec" in stat:
                    total = stat["usage_usec"] / 1e6
                if "user_usec" in stat:
                    user = stat["user_usec"] / 1e6
                if "system_usec" in stat:
                    system = stat["system_usec"] / 1e6
            else:
                u = _int_file(os.path.join(d, "cpuacct.usage_user"))
                s = _int_file(os.path.join(d, "cpuacct.usage_sys"))
                if u is not None and s is not None:
                    user, system = u / 1e9, s / 1e9
                else:
                    ticks = _keyed(os.path.join(d, "cpuacct.stat"))
                    hz = os.sysconf("SC_CLK_TCK")
                    if "user" in ticks and "system" in ticks:
                        user, system = ticks["user"] / hz, ticks["system"] / hz
                t = _int_file(os.path.join(d, "cpuacct.usage"))
                total = t / 1e9 if t is not None else None
            if total is None and user is not None and system is not None:
                total = user + system
        peak = current = kills = None
        d = w.dirs.get("memory")
        if d is not None:
            if self.version_of("memory") == 2:
                current = _int_file(os.path.join(d, "memory.current"))
                if w.peak_fd is not None:
                    try:
                        peak = int(os.pread(w.peak_fd, 64, 0).split()[0])
                    except (OSError, ValueError, IndexError):
                        peak = None
                else:
                    peak = _int_file(os.path.join(d, "memory.peak"))
                kills = _keyed(os.path.join(d, "memory.events")).get("oom_kill")
            else:
                current = _int_file(os.path.join(d, "memory.usage_in_bytes"))
                peak = _int_file(os.path.join(d, "memory.max_usage_in_bytes"))
                kills = _v1_oom_kills(d)
        return Usage(user, system, total, peak, current, kills)

    def reset_peak(self, w: WorkerCgroup) -> bool:
        """Start a new memory high-water mark (call it between tasks). True if it was reset.

        v1: writes 0 to memory.max_usage_in_bytes (the peak restarts at the usage now).
        v2 on Linux >= 6.12: writes "reset" to memory.peak through an fd kept in the handle;
        the kernel keeps that reset per open file, so ``usage`` reads the peak through it.
        v2 before 6.12 (memory.peak read-only, or absent before 5.19): False; ``memory_peak``
        then stays the peak since the worker's cgroup was made (None before 5.19), an upper
        bound of what the task used, exact only for the worker's first task.
        """
        d = w.dirs.get("memory")
        if d is None:
            return False
        if self.version_of("memory") == 1:
            try:
                _write(os.path.join(d, "memory.max_usage_in_bytes"), "0")
            except OSError:
                return False
            return True
        path = os.path.join(d, "memory.peak")
        if w.peak_fd is None:
            try:
                w.peak_fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                return False
        try:
            os.write(w.peak_fd, b"reset\n")
        except OSError:
            os.close(w.peak_fd)
            w.peak_fd = None
            return False
        return True

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

    def remove(self, w: WorkerCgroup, timeout: float = 5.0, *, kill: bool = False) -> None:
        """Remove the worker's cgroup, waiting up to ``timeout`` seconds for its processes to
        be gone (killed processes take a moment to leave). With ``kill``, SIGKILL what is
        still there first (v2 cgroup.kill where present). CgroupBusyError at the deadline."""
        if w.removed:
            return
        if w.peak_fd is not None:
            os.close(w.peak_fd)
            w.peak_fd = None
        deadline = time.monotonic() + timeout
        if kill:
            for d in w.unique_dirs():
                _kill_all(d)
        for d in w.unique_dirs():
            _remove_dir(d, deadline)
        w.removed = True
        self._workers.pop(w.wid, None)

    def close(self, timeout: float = 5.0, *, kill: bool = True) -> None:
        """Remove every worker's cgroup (killing what is left, with ``kill``) and the pool's
        nodes. Idempotent. Raises CgroupBusyError naming what could not be removed."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        errors: list[str] = []
        for w in list(self._workers.values()):
            try:
                self.remove(w, max(0.0, deadline - time.monotonic()), kill=kill)
            except OSError as e:
                errors.append(str(e))
        errors += self._remove_nodes(deadline)
        if errors:
            raise CgroupBusyError(errno.EBUSY, "; ".join(errors))

    def _remove_nodes(self, deadline: float) -> list[str]:
        errors = []
        for node in reversed(list(self._created)):
            try:
                # Leftover leaves (workers whose removal failed) first.
                for sub in _subdirs(node):
                    _remove_dir(sub, deadline)
                _remove_dir(node, deadline)
            except OSError as e:
                errors.append(str(e))
        self._created.clear()
        self.nodes.clear()
        return errors

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
