"""cgroups for nspool: resource limits per worker and what each task used.

One concern: files under a cgroup filesystem. No threads, no forking, no knowledge of the pool;
the fork server (root, or the owner of a user namespace) drives it:

    limits = Limits.parse(memory_limit="512M", pids_limit=64, cpu_limit=0.5)  # ValueError early
    cg = PoolCgroups.for_limits(limits)        # makes nspool-<pid>-<hex> in each hierarchy
    w = cg.create_worker(1)                    # a cgroup per worker, the pool's limits set
    cg.attach(w, pid)                          # right after fork, before the child runs code
    cg.reset_peak(w); before = cg.usage(w)     # around each task
    ...; spent = cg.usage(w).since(before)
    cg.oom_killed(w)                           # after the worker died: was it the OOM killer?
    cg.remove(w)                               # when the worker is gone (waits until empty)
    cg.close()                                 # at shutdown: the whole subtree

Layouts. Each controller (``memory``, ``pids``, ``cpu``; ``cpuacct`` stands for CPU-time
accounting) is served either by the unified v2 hierarchy (a ``cgroup2`` mount whose
``cgroup.controllers`` lists it; CPU time is read from ``cpu.stat``, present in every v2 cgroup
with or without the cpu controller) or by a v1 hierarchy (a ``cgroup`` mount with the controller
among its options, possibly co-mounted like ``cpu,cpuacct``). Each process's own cgroup per
hierarchy comes from ``/proc/self/cgroup``; its directory is the mount point plus that path
relative to the mount's root (``/proc/self/mountinfo``, field 4).

Placement. v1: the pool node goes under the process's own cgroup (v1 allows processes in inner
nodes), which must be writable (root; v1 has no delegation). v2: processes can't live in a
cgroup that has controllers enabled for its children (except in the root), so the pool node
``P`` holds no process: ``P/cgroup.subtree_control`` enables the controllers, and each worker
is a leaf ``P/w<wid>``. ``P`` goes under the first of (own cgroup, its parent) that is writable
and passes the controllers down (already enabled in its ``cgroup.subtree_control``, or enabled
there by us where that is allowed: the hierarchy root, or a cgroup without processes). That is
systemd's user delegation: ``systemd-run --user --scope -p Delegate=yes ...`` gives a scope
owned by the user inside ``app.slice``, whose controllers are enabled for its children.
"The controllers" are the required ones and the optional ones (memory, for usage) together
where some place passes them all, else the required ones alone: a v2 controller's interface
files (``memory.peak``, ``memory.events``) exist in a cgroup only when its parent enables it,
so memory must be enabled in ``P``'s and its base's ``cgroup.subtree_control`` for the
leaves to account it even when no limit needs it. ``cpu.stat`` is a core file, everywhere.

Nothing asked for is silently dropped: a limit whose controller can't be used raises
``CgroupUnavailableError`` saying why and how to get one. Usage figures that can't be read
(an accounting controller that isn't there) are ``None``.
"""

from __future__ import annotations

import errno
import math
import os
import re
import signal
import time
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from .._cgroup_errors import CgroupBusyError, CgroupError, CgroupUnavailableError
from .._core.sizes import parse_size

__all__ = [
    "CONTROLLERS",
    "CgroupBusyError",
    "CgroupError",
    "CgroupUnavailableError",
    "Hierarchy",
    "Layout",
    "Limits",
    "Mount",
    "PoolCgroups",
    "Usage",
    "UsageMeter",
    "WorkerCgroup",
    "check",
    "detect_layout",
    "parse_cpu_limit",
    "parse_memory_limit",
    "parse_mountinfo",
    "parse_pids_limit",
    "parse_proc_cgroup",
    "remove_pool",
    "remove_stale",
]

#: controllers this layer uses; ``cpuacct`` means CPU-time accounting (v1 cpuacct, v2 cpu.stat)
CONTROLLERS = ("memory", "pids", "cpu", "cpuacct")

#: ``cpu_limit`` is written as a quota per this period (the kernel's default, 100 ms)
CPU_PERIOD_US = 100_000
#: the kernel refuses a CFS quota below 1 ms
CPU_MIN_QUOTA_US = 1_000

PREFIX = "nspool"
_POOL_NAME = re.compile(r"^nspool-(\d+)-[0-9a-f]+$")

HOW_TO_GET_ONE = (
    "run as root, or unprivileged inside a delegated cgroup v2 subtree, for example "
    "`systemd-run --user --scope -p Delegate=yes python your_program.py` "
    "(needs a systemd user session and cgroup v2; the controllers must be delegated to the "
    "user, which systemd does by default for memory, pids and cpu)"
)


# --------------------------------------------------------------------------------------------
# Limits


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


# --------------------------------------------------------------------------------------------
# Detection


# NamedTuples and plain classes, not dataclasses: the launcher imports this module when a
# pool has limits, and each dataclass costs about a millisecond to define.


class Mount(NamedTuple):
    """One line of /proc/self/mountinfo for a cgroup filesystem."""

    root: str  # the part of the hierarchy mounted here
    mountpoint: str
    fstype: str  # "cgroup" (v1) or "cgroup2"
    options: frozenset[str]  # super options: v1 controllers, "name=systemd", "rw"/"ro"
    readonly: bool


def _unescape(field_: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (``\\040``)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_)


def parse_mountinfo(text: str) -> list[Mount]:
    """The cgroup and cgroup2 mounts in a /proc/<pid>/mountinfo text, in order."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if sep < 6 or len(fields) < sep + 4:
            continue
        fstype = fields[sep + 1]
        if fstype not in ("cgroup", "cgroup2"):
            continue
        mount_opts = fields[5].split(",")
        super_opts = frozenset(fields[sep + 3].split(","))
        mounts.append(
            Mount(
                root=_unescape(fields[3]),
                mountpoint=_unescape(fields[4]),
                fstype=fstype,
                options=super_opts,
                readonly="ro" in mount_opts or "ro" in super_opts,
            )
        )
    return mounts


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """/proc/<pid>/cgroup as {controller: path}; the v2 hierarchy's key is ``""``. Co-mounted
    v1 controllers (``4:cpu,cpuacct:/x``) each get the path; named hierarchies keep their
    ``name=...`` key."""
    result: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if path.endswith(" (deleted)"):
            path = path[: -len(" (deleted)")]
        if controllers == "":
            result[""] = path
        else:
            for name in controllers.split(","):
                result[name] = path
    return result


class Hierarchy(NamedTuple):
    """A cgroup hierarchy as this process sees it."""

    version: int  # 1 or 2
    mountpoint: str
    own_dir: str  # the directory of this process's own cgroup in it
    controllers: frozenset[str]  # which of CONTROLLERS it serves (v2: cpuacct via cpu.stat)
    readonly: bool = False

    @property
    def key(self) -> str:
        return self.mountpoint


class Layout:
    """Which hierarchy serves each controller here; absent ones are in ``missing`` with why."""

    def __init__(
        self, hierarchies: dict[str, Hierarchy], missing: dict[str, str] | None = None
    ) -> None:
        self.hierarchies = hierarchies
        self.missing = {} if missing is None else missing

    def __repr__(self) -> str:
        return f"Layout({self.hierarchies!r}, {self.missing!r})"

    def describe(self) -> list[str]:
        """One line per controller, for ``python -m nspool doctor``."""
        lines = []
        for name in CONTROLLERS:
            h = self.hierarchies.get(name)
            if h is None:
                lines.append(f"{name}: unavailable ({self.missing.get(name, 'not mounted')})")
            else:
                lines.append(f"{name}: cgroup v{h.version} at {h.own_dir}")
        return lines


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, text: str) -> None:
    # O_CREAT only matters on scratch trees: a cgroup filesystem refuses to create files.
    with open(path, "w") as f:
        f.write(text)


def _own_dir(mount: Mount, cgroup_path: str) -> str | None:
    """The directory of ``cgroup_path`` under ``mount``, or None when the mount doesn't show
    it (a bind mount of another part of the hierarchy)."""
    root = mount.root.rstrip("/") or "/"
    if root == "/":
        rel = cgroup_path.lstrip("/")
    elif cgroup_path == root or cgroup_path.startswith(root + "/"):
        rel = cgroup_path[len(root) :].lstrip("/")
    else:
        return None
    return os.path.join(mount.mountpoint, rel) if rel else mount.mountpoint


def detect_layout(mountinfo: str | None = None, proc_cgroup: str | None = None) -> Layout:
    """Which hierarchy serves each of CONTROLLERS for this process. The texts default to
    /proc/self/mountinfo and /proc/self/cgroup (pass them to look at a scratch tree).

    v2 wins for a controller that its root's ``cgroup.controllers`` lists; otherwise a v1
    mount with the controller in its options. CPU-time accounting (``cpuacct``) comes from a
    v1 cpuacct hierarchy where one is mounted, else from v2's ``cpu.stat``."""
    if mountinfo is None:
        mountinfo = _read("/proc/self/mountinfo")
    if proc_cgroup is None:
        proc_cgroup = _read("/proc/self/cgroup")
    mounts = parse_mountinfo(mountinfo)
    paths = parse_proc_cgroup(proc_cgroup)
    found: dict[str, Hierarchy] = {}
    missing: dict[str, str] = {}

    v2: Hierarchy | None = None
    if "" in paths:
        for m in mounts:
            if m.fstype != "cgroup2":
                continue
            own = _own_dir(m, paths[""])
            if own is None:
                continue
            try:
                avail = frozenset(_read(os.path.join(m.mountpoint, "cgroup.controllers")).split())
            except OSError:
                avail = frozenset()
            served = (avail & set(CONTROLLERS)) | {"cpuacct"}
            v2 = Hierarchy(2, m.mountpoint, own, frozenset(served), m.readonly)
            break

    for name in CONTROLLERS:
        if v2 is not None and name in v2.controllers and name != "cpuacct":
            found[name] = v2
            continue
        for m in mounts:
            if m.fstype == "cgroup" and name in m.options and name in paths:
                own = _own_dir(m, paths[name])
                if own is None:
                    continue
                served = frozenset(m.options & set(CONTROLLERS))
                found[name] = Hierarchy(1, m.mountpoint, own, served, m.readonly)
                break
        else:
            if name == "cpuacct" and v2 is not None:
                found[name] = v2
            elif v2 is not None:
                missing[name] = (
                    f"the cgroup v2 hierarchy at {v2.mountpoint} does not have the {name} "
                    f"controller and no cgroup v1 hierarchy mounts it"
                )
            else:
                missing[name] = f"no cgroup hierarchy with the {name} controller is mounted"
    return Layout(found, missing)


# --------------------------------------------------------------------------------------------
# Placement


def _writable(path: str) -> bool:
    return os.access(path, os.W_OK) and os.access(os.path.join(path, "cgroup.procs"), os.W_OK)


def _has_procs(path: str) -> bool:
    try:
        return bool(_read(os.path.join(path, "cgroup.procs")).split())
    except OSError:
        return False


def _tokens(path: str) -> set[str]:
    try:
        return {t.lstrip("+") for t in _read(path).split()}
    except OSError:
        return set()


def _v2_base(h: Hierarchy, needed: set[str], *, enable: bool) -> tuple[str | None, list[str]]:
    """Where the pool node goes in v2: the first of (own cgroup, its parent) that is writable
    and passes ``needed`` down to its children, enabling them in its subtree_control where
    that is allowed (``enable``) and needed. Returns (directory or None, reasons for each
    candidate refused)."""
    candidates = [h.own_dir]
    if os.path.normpath(h.own_dir) != os.path.normpath(h.mountpoint):
        candidates.append(os.path.dirname(os.path.normpath(h.own_dir)))
    reasons = []
    uid = os.geteuid()
    for cand in candidates:
        if h.readonly:
            reasons.append(f"{h.mountpoint} is mounted read-only")
            break
        if not _writable(cand):
            reasons.append(f"{cand} is not writable by uid {uid} (not delegated to it)")
            continue
        enabled = _tokens(os.path.join(cand, "cgroup.subtree_control"))
        lacking = needed - enabled
        if not lacking:
            return cand, reasons
        available = _tokens(os.path.join(cand, "cgroup.controllers"))
        if lacking - available:
            reasons.append(
                f"{cand} does not get the controller(s) {', '.join(sorted(lacking - available))}"
                f" from its parent"
            )
            continue
        if not _is_v2_root(h, cand) and _has_procs(cand):
            reasons.append(
                f"{cand} holds processes, so its children can't get the controller(s) "
                f"{', '.join(sorted(lacking))} (cgroup v2 allows no processes in inner nodes)"
            )
            continue
        if not enable:
            return cand, reasons
        try:
            _write(
                os.path.join(cand, "cgroup.subtree_control"),
                " ".join("+" + c for c in sorted(lacking)),
            )
        except OSError as e:
            reasons.append(f"enabling {', '.join(sorted(lacking))} in {cand} failed: {e}")
            continue
        return cand, reasons
    return None, reasons


def _is_v2_root(h: Hierarchy, path: str) -> bool:
    """Is ``path`` the root of the v2 hierarchy, the one cgroup that may hold processes and
    enable controllers for its children? The mount's root is not always it: in a container with
    its own cgroup namespace it is the container's cgroup. The real root alone has no
    ``cgroup.type``."""
    at_mount_root = os.path.normpath(path) == os.path.normpath(h.mountpoint)
    return at_mount_root and not os.path.exists(os.path.join(path, "cgroup.type"))


def _v1_base(h: Hierarchy) -> tuple[str | None, list[str]]:
    if h.readonly:
        return None, [f"{h.mountpoint} is mounted read-only"]
    if not _writable(h.own_dir):
        return None, [
            f"{h.own_dir} (cgroup v1) is not writable by uid {os.geteuid()}; "
            f"cgroup v1 has no delegation to unprivileged users"
        ]
    return h.own_dir, []


def _v2_controller_names(controllers: Iterable[str]) -> set[str]:
    # cpuacct is cpu.stat on v2, a core file: no controller needed.
    return {c for c in controllers if c != "cpuacct"}


def check(controllers: Iterable[str], layout: Layout | None = None) -> dict[str, str | None]:
    """Without writing anything: for each controller, None when a pool could use it here,
    else the reason why not (for ``doctor``)."""
    layout = detect_layout() if layout is None else layout
    result: dict[str, str | None] = {}
    for name in controllers:
        h = layout.hierarchies.get(name)
        if h is None:
            result[name] = layout.missing.get(name, "not mounted")
            continue
        if h.version == 1:
            base, reasons = _v1_base(h)
        else:
            base, reasons = _v2_base(h, _v2_controller_names([name]), enable=False)
        result[name] = None if base is not None else "; ".join(reasons)
    return result


# --------------------------------------------------------------------------------------------
# The pool's subtree


class Usage(NamedTuple):
    """What a cgroup used. CPU times in seconds, memory in bytes; ``None`` where this machine
    doesn't account for it. ``memory_peak`` is the high-water mark since the cgroup was made or
    since the last successful ``reset_peak``. ``oom_kills`` is the kernel's OOM-kill counter:
    it rises with each kill, but is no count of processes (v2 with ``memory.oom.group`` counts
    the chosen victim twice, once alone and once with its group), so compare it with zero or
    with an earlier reading."""

    cpu_user: float | None = None
    cpu_system: float | None = None
    cpu_total: float | None = None
    memory_peak: int | None = None
    memory_current: int | None = None
    oom_kills: int | None = None

    def since(self, before: Usage) -> Usage:
        """CPU time and OOM kills between ``before`` and this reading; memory figures as now."""

        def sub(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else max(0.0, a - b)

        kills = None
        if self.oom_kills is not None and before.oom_kills is not None:
            kills = self.oom_kills - before.oom_kills
        return Usage(
            cpu_user=sub(self.cpu_user, before.cpu_user),
            cpu_system=sub(self.cpu_system, before.cpu_system),
            cpu_total=sub(self.cpu_total, before.cpu_total),
            memory_peak=self.memory_peak,
            memory_current=self.memory_current,
            oom_kills=kills,
        )

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "cpu_user": self.cpu_user,
            "cpu_system": self.cpu_system,
            "cpu_total": self.cpu_total,
            "memory_peak": self.memory_peak,
            "memory_current": self.memory_current,
            "oom_kills": self.oom_kills,
        }


class WorkerCgroup:
    """A worker's cgroup: one directory per hierarchy in use (``dirs`` by controller)."""

    __slots__ = ("dirs", "limits", "peak_fd", "removed", "wid")

    def __init__(self, wid: int, dirs: dict[str, str], limits: Limits) -> None:
        self.wid = wid
        self.dirs = dirs
        self.limits = limits
        #: v2 only: an fd of memory.peak on which "reset" was written (the reset is per open
        #: file)
        self.peak_fd: int | None = None
        self.removed = False

    def __repr__(self) -> str:
        return f"WorkerCgroup({self.wid}, {self.dirs!r}, {self.limits!r})"

    def unique_dirs(self) -> list[str]:
        return list(dict.fromkeys(self.dirs.values()))


class UsageMeter:
    """Per-task readings of one worker's cgroup, cheap enough for every task: the files are
    opened once and read with ``pread`` (a fraction of a microsecond each).

    ``read()`` gives CPU user/system seconds, the memory high-water mark and the OOM kill
    count so far (``memory_current`` is not read); ``reset_peak()`` starts a new high-water
    mark where the kernel allows it (see :meth:`PoolCgroups.reset_peak`)."""

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
        """Start a new memory high-water mark; True if the kernel took it."""
        if not self._peak_writable or self._peak is None:
            return False
        try:
            os.pwrite(self._peak, b"reset\n" if self._mem_v2 else b"0", 0)
        except OSError:
            self._peak_writable = False
            return False
        return True

    def read(self) -> Usage:
        user = system = total = None
        if self._cpu is not None:
            stat = _parse_keyed(_pread(self._cpu))
            if "user_usec" in stat and "system_usec" in stat:
                user, system = stat["user_usec"] / 1e6, stat["system_usec"] / 1e6
            total = stat["usage_usec"] / 1e6 if "usage_usec" in stat else None
        elif self._user is not None and self._sys is not None:
            u, s = _pread_int(self._user), _pread_int(self._sys)
            if u is not None and s is not None:
                user, system = u / 1e9, s / 1e9
        if total is None and user is not None and system is not None:
            total = user + system
        peak = None if self._peak is None else _pread_int(self._peak)
        kills = None
        if self._events is not None:
            kills = _parse_keyed(_pread(self._events)).get("oom_kill")
        return Usage(user, system, total, peak, None, kills)

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


def _procs(d: str) -> set[int]:
    try:
        return {int(p) for p in _read(os.path.join(d, "cgroup.procs")).split()}
    except FileNotFoundError:
        return set()


def _subdirs(d: str) -> Iterator[str]:
    try:
        entries = list(os.scandir(d))
    except FileNotFoundError:
        return
    for e in entries:
        if e.is_dir(follow_symlinks=False):
            yield e.path


def _kill_all(d: str) -> None:
    kill_file = os.path.join(d, "cgroup.kill")
    if os.path.exists(kill_file):
        try:
            _write(kill_file, "1")
            return
        except OSError:
            pass
    for pid in _procs(d):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _rmdir(d: str) -> None:
    """rmdir on a cgroup filesystem (its control files go with the directory). A seam for
    tests on scratch trees."""
    os.rmdir(d)


def _rmdir_quiet(d: str) -> None:
    try:
        _rmdir(d)
    except OSError:
        pass


def _remove_dir(d: str, deadline: float) -> None:
    """Wait (until ``deadline``) for cgroup ``d`` to hold no process, then rmdir it; retry
    EBUSY (a process on its way out) until the deadline too."""
    delay = 0.001
    while True:
        try:
            if not _procs(d):
                _rmdir(d)
                return
            why = f"processes {sorted(_procs(d))} still in it"
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise CgroupError(e.errno or errno.EIO, f"removing cgroup {d} failed: {e}") from e
            why = "the kernel says busy"
        left = deadline - time.monotonic()
        if left <= 0:
            raise CgroupBusyError(errno.EBUSY, f"cgroup {d} not removed: {why}")
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.05)


def remove_stale(layout: Layout | None = None, *, alive: int | None = None) -> list[str]:
    """Remove empty pool subtrees (``nspool-<pid>-<hex>``) left by owners that are gone (a
    ``kill -9`` of a fork server), in every hierarchy's own cgroup and its parent. Returns the
    directories removed. A subtree whose owner PID is alive, or that still holds processes, is
    left alone. ``alive``: a PID to treat as alive (this pool's owner)."""
    layout = detect_layout() if layout is None else layout
    removed = []
    places: set[str] = set()
    for h in layout.hierarchies.values():
        places.add(h.own_dir)
        places.add(os.path.dirname(os.path.normpath(h.own_dir)))
    for place in sorted(places):
        for sub in _subdirs(place):
            m = _POOL_NAME.match(os.path.basename(sub))
            if m is None:
                continue
            pid = int(m.group(1))
            if pid == alive or _pid_alive(pid):
                continue
            try:
                for leaf in _subdirs(sub):
                    if not _procs(leaf):
                        _rmdir(leaf)
                if not _procs(sub):
                    _rmdir(sub)
                    removed.append(sub)
            except OSError:
                continue
    return removed


def remove_pool(name: str, layout: Layout | None = None, timeout: float = 5.0) -> list[str]:
    """Remove pool subtree ``name`` from every hierarchy (its owner is gone): SIGKILL what is
    still in it, wait until it is empty, rmdir leaves then the node. Returns the directories
    removed; raises CgroupBusyError naming what could not be removed by ``timeout``."""
    if _POOL_NAME.match(name) is None:
        raise ValueError(f"not an nspool pool cgroup name: {name!r}")
    layout = detect_layout() if layout is None else layout
    deadline = time.monotonic() + timeout
    places: set[str] = set()
    for h in layout.hierarchies.values():
        places.add(h.own_dir)
        places.add(os.path.dirname(os.path.normpath(h.own_dir)))
    removed, errors = [], []
    for place in sorted(places):
        node = os.path.join(place, name)
        if not os.path.isdir(node):
            continue
        try:
            for leaf in _subdirs(node):
                _kill_all(leaf)
                _remove_dir(leaf, deadline)
            _kill_all(node)
            _remove_dir(node, deadline)
            removed.append(node)
        except OSError as e:
            errors.append(str(e))
    if errors:
        raise CgroupBusyError(errno.EBUSY, "; ".join(errors))
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
