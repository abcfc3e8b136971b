"""Which cgroup hierarchy serves each controller here, and where a pool's node may go.

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
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import NamedTuple

__all__ = [
    "CONTROLLERS",
    "HOW_TO_GET_ONE",
    "PREFIX",
    "Hierarchy",
    "Layout",
    "Mount",
    "check",
    "detect_layout",
    "parse_mountinfo",
    "parse_proc_cgroup",
]

#: controllers this layer uses; ``cpuacct`` means CPU-time accounting (v1 cpuacct, v2 cpu.stat)
CONTROLLERS = ("memory", "pids", "cpu", "cpuacct")

#: a pool's node is named ``nspool-<owner pid>-<hex>`` (``pool``); ``removal`` finds them by it
PREFIX = "nspool"
_POOL_NAME = re.compile(r"^nspool-(\d+)-[0-9a-f]+$")

HOW_TO_GET_ONE = (
    "run as root, or unprivileged inside a delegated cgroup v2 subtree, for example "
    "`systemd-run --user --scope -p Delegate=yes python your_program.py` "
    "(needs a systemd user session and cgroup v2; the controllers must be delegated to the "
    "user, which systemd does by default for memory, pids and cpu)"
)


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

