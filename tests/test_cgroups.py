"""The cgroup layer (nspool/_cgroups/): file-level logic on scratch trees that imitate the v1
and v2 layouts, and live tests on this machine's real cgroups (root; skipped otherwise).

A pool's cgroups are used here only as the pool's processes use them: ``PoolCgroups`` built
as the launcher builds it (``make_cgroups``), ``create_worker``/``attach``, the ``UsageMeter``
of ``meter``, ``oom_kills``/``oom_killed``/``watch_oom``, ``remove``, and
``removal.remove_pool`` for the whole subtree at the end (``pool_subtree``)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest
from _procs import cgroups_live_reason

from nspool._cgroups import layout as cg_layout
from nspool._cgroups import pool as cg_pool
from nspool._cgroups import removal as cg_removal
from nspool._cgroups.errors import CgroupBusyError, CgroupError, CgroupUnavailableError
from nspool._cgroups.layout import (
    Hierarchy,
    Layout,
    detect_layout,
    parse_mountinfo,
    parse_proc_cgroup,
)
from nspool._cgroups.limits import Limits, parse_memory_limit
from nspool._cgroups.pool import PoolCgroups
from nspool._cgroups.worker import Usage, WorkerCgroup

MiB = 1 << 20

# --------------------------------------------------------------------------------------------
# Limits


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (4096, 4096),
        ("4096", 4096),
        ("512M", 512 * MiB),
        ("512m", 512 * MiB),
        ("2G", 2 << 30),
        ("1.5G", 3 << 29),
        ("64MiB", 64 * MiB),
        ("100k", 100 * 1024),
        (" 1T ", 1 << 40),
        ("8KB", 8192),
    ],
)
def test_memory_limit_parser(text: int | str, expected: int) -> None:
    assert parse_memory_limit(text) == expected


@pytest.mark.parametrize("bad", ["", "M", "12X", "-5M", "1e9", "1 2M", 0, 100, True, 1.5, None])
def test_bad_memory_limits_are_value_errors(bad: object) -> None:
    with pytest.raises(ValueError, match="memory_limit"):
        parse_memory_limit(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pids_limit": 0}, "pids_limit must be at least 1"),
        ({"pids_limit": 2.5}, "pids_limit must be an int"),
        ({"pids_limit": True}, "pids_limit must be an int"),
        ({"cpu_limit": 0}, "cpu_limit"),
        ({"cpu_limit": 0.001}, "cpu_limit"),
        ({"cpu_limit": float("inf")}, "cpu_limit"),
        ({"cpu_limit": float("nan")}, "cpu_limit"),
        ({"cpu_limit": "half"}, "cpu_limit"),
        ({"memory_limit": "lots"}, "memory_limit 'lots' is not a size"),
    ],
)
def test_bad_limits_are_value_errors(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Limits.parse(**kwargs)  # type: ignore[arg-type]


def test_limits_controllers_and_quota() -> None:
    assert not Limits.parse()
    lim = Limits.parse("1G", 10, 0.25)
    assert lim == Limits(memory=1 << 30, pids=10, cpu=0.25)
    assert lim.controllers() == {"memory", "pids", "cpu"}
    assert lim.cpu_quota_us == 25_000
    assert Limits.parse(cpu_limit=2).cpu_quota_us == 200_000
    assert Limits.parse(cpu_limit=0.01).cpu_quota_us == 1_000


# --------------------------------------------------------------------------------------------
# mountinfo and /proc/self/cgroup

HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime shared:5 - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
50 23 0:40 /docker/abc /mnt/with\\040space ro,relatime - cgroup cgroup rw,cpu,cpuacct
"""

HYBRID_CGROUP = """\
9:name=systemd:/
8:pids:/
4:memory:/process_api/21df
2:cpuacct:/
1:cpu:/
0::/
"""


def test_parse_mountinfo() -> None:
    mounts = parse_mountinfo(HYBRID_MOUNTINFO)
    assert [m.mountpoint for m in mounts] == [
        "/sys/fs/cgroup/cpu",
        "/sys/fs/cgroup/cpuacct",
        "/sys/fs/cgroup/memory",
        "/sys/fs/cgroup/pids",
        "/sys/fs/cgroup/systemd",
        "/sys/fs/cgroup/unified",
        "/mnt/with space",
    ]
    assert mounts[3].options == {"rw", "pids"} and mounts[3].fstype == "cgroup"
    assert mounts[5].fstype == "cgroup2"
    assert mounts[6].root == "/docker/abc" and mounts[6].readonly
    assert not mounts[0].readonly


def test_parse_proc_cgroup() -> None:
    paths = parse_proc_cgroup(HYBRID_CGROUP + "5:cpu,cpuacct:/a/b (deleted)\n")
    assert paths["memory"] == "/process_api/21df"
    assert paths[""] == "/" and paths["name=systemd"] == "/"
    assert paths["cpu"] == paths["cpuacct"] == "/a/b"


# --------------------------------------------------------------------------------------------
# Scratch trees


def _mkcg(path: Path, files: dict[str, str] | None = None) -> Path:
    """A fake cgroup directory with a cgroup.procs and whatever else is given."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "cgroup.procs").write_text("")
    for name, text in (files or {}).items():
        (path / name).write_text(text)
    return path


def _fake_rmdir(d: str) -> None:
    """rmdir as a cgroup filesystem does it: EBUSY with processes or child cgroups inside,
    otherwise the control files go with the directory."""
    p = Path(d)
    if not p.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no such cgroup", d)
    if (p / "cgroup.procs").exists() and (p / "cgroup.procs").read_text().split():
        raise OSError(errno.EBUSY, "busy", d)
    if any(c.is_dir() for c in p.iterdir()):
        raise OSError(errno.EBUSY, "has children", d)
    for c in p.iterdir():
        c.unlink()
    p.rmdir()


@pytest.fixture
def fake_fs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cg_removal, "_rmdir", _fake_rmdir)


def _mkdir_with(files: dict[str, str]):  # type: ignore[no-untyped-def]
    """os.mkdir that also makes the control files the kernel would make."""
    real_mkdir = os.mkdir

    def mkdir(path: str, mode: int = 0o777) -> None:
        real_mkdir(path, mode)
        for name, text in files.items():
            Path(path, name).write_text(text)

    return mkdir


def make_cgroups(
    limits: Limits, *, usage: bool = False, layout: Layout | None = None
) -> PoolCgroups:
    """A pool's cgroups as the launcher makes them (``_make_cgroups`` in
    nspool/launcher/__main__.py): the limits' controllers required, CPU-time accounting too
    with ``usage`` (``track_usage``), memory and CPU time for the meter wherever they work."""
    required = set(limits.controllers()) | ({"cpuacct"} if usage else set())
    return PoolCgroups(required, ("memory", "cpuacct"), limits=limits, layout=layout)


@contextmanager
def pool_subtree(
    limits: Limits, *, usage: bool = False, layout: Layout | None = None
) -> Iterator[PoolCgroups]:
    """``make_cgroups``, removed at the end as the launcher removes them: by name, killing
    what is still there (``removal.remove_pool``)."""
    pool = make_cgroups(limits, usage=usage, layout=layout)
    try:
        yield pool
    finally:
        cg_removal.remove_pool(pool.name, pool.layout)


#: a PID no process can have (above the kernel's PID_MAX_LIMIT), for cgroup.procs on scratch
#: trees: were it ever signalled (remove_pool kills what a pool's cgroups hold), nobody gets it
NO_PID = 4_999_999


def _patch_write(monkeypatch: pytest.MonkeyPatch, write: Callable[[str, str], None]) -> None:
    """Put ``write`` in place of the layer's one way of writing a cgroup file, in each module
    that writes some (placement, the pool's and workers' cgroups, removal)."""
    for module in (cg_layout, cg_pool, cg_removal):
        monkeypatch.setattr(module, "_write", write)


def v1_tree(root: Path) -> tuple[str, str]:
    """A hybrid machine like this one: v1 cpu,cpuacct co-mounted, memory, pids; v2 without
    controllers. Returns (mountinfo, /proc/self/cgroup)."""
    _mkcg(root / "memory" / "job" / "7", {"memory.limit_in_bytes": "9223372036854771712"})
    _mkcg(root / "memory")
    _mkcg(root / "pids")
    _mkcg(root / "cpu,cpuacct")
    _mkcg(root / "unified", {"cgroup.controllers": "hugetlb\n"})
    mountinfo = textwrap.dedent(
        f"""\
        32 31 0:29 / {root}/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
        35 31 0:32 / {root}/memory rw - cgroup cgroup rw,memory
        39 31 0:36 / {root}/pids rw - cgroup cgroup rw,pids
        41 31 0:38 / {root}/unified rw - cgroup2 cgroup2 rw
        """
    )
    proc_cgroup = "8:pids:/\n4:memory:/job/7\n1:cpu,cpuacct:/\n0::/\n"
    return mountinfo, proc_cgroup


def v2_tree(root: Path, *, parent_enabled: str = "cpu memory pids") -> tuple[str, str]:
    """A pure v2 machine, the process in a delegated systemd scope under app.slice."""
    ctl = {"cgroup.controllers": "cpuset cpu io memory pids\n"}
    _mkcg(root, {**ctl, "cgroup.subtree_control": "cpu io memory pids\n"})
    app = root / "user.slice" / "user@1000.service" / "app.slice"
    _mkcg(app, {**ctl, "cgroup.subtree_control": parent_enabled + "\n"})
    _mkcg(app / "run-1.scope", {**ctl, "cgroup.subtree_control": "", "cgroup.procs": "4242\n"})
    mountinfo = f"30 23 0:26 / {root} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
    proc_cgroup = "0::/user.slice/user@1000.service/app.slice/run-1.scope\n"
    return mountinfo, proc_cgroup


def test_detect_hybrid_v1(tmp_path: Path) -> None:
    layout = detect_layout(*v1_tree(tmp_path))
    h = layout.hierarchies
    assert {c: h[c].version for c in h} == {"memory": 1, "pids": 1, "cpu": 1, "cpuacct": 1}
    assert h["memory"].own_dir == str(tmp_path / "memory" / "job" / "7")
    assert h["cpu"] is h["cpuacct"] or h["cpu"] == h["cpuacct"]
    assert h["cpu"].controllers == {"cpu", "cpuacct"}


def test_detect_pure_v2(tmp_path: Path) -> None:
    layout = detect_layout(*v2_tree(tmp_path))
    h = layout.hierarchies
    assert {c: h[c].version for c in h} == {"memory": 2, "pids": 2, "cpu": 2, "cpuacct": 2}
    assert h["pids"].own_dir.endswith("app.slice/run-1.scope")


def test_detect_mount_root_and_missing(tmp_path: Path) -> None:
    # A container sees only part of the hierarchy: its mount root is /docker/abc.
    _mkcg(tmp_path / "mem" / "inner")
    mountinfo = f"35 31 0:32 /docker/abc {tmp_path}/mem rw - cgroup cgroup rw,memory\n"
    layout = detect_layout(mountinfo, "4:memory:/docker/abc/inner\n")
    assert layout.hierarchies["memory"].own_dir == str(tmp_path / "mem" / "inner")
    assert "no cgroup hierarchy with the pids controller" in layout.missing["pids"]
    assert "pids" not in layout.hierarchies
    # A process outside the mounted part: not usable.
    layout = detect_layout(mountinfo, "4:memory:/elsewhere\n")
    assert "memory" not in layout.hierarchies


def test_v1_pool_on_a_scratch_tree(tmp_path: Path, fake_fs: None) -> None:
    layout = detect_layout(*v1_tree(tmp_path))
    pool = make_cgroups(Limits.parse("64M", 8, 0.5), layout=layout)
    assert pool.name.startswith(f"nspool-{os.getpid()}-")  # remove_stale reads the owner here
    node_mem = tmp_path / "memory" / "job" / "7" / pool.name
    node_pids = tmp_path / "pids" / pool.name
    node_cpu = tmp_path / "cpu,cpuacct" / pool.name
    assert pool.nodes == {
        "memory": str(node_mem),
        "pids": str(node_pids),
        "cpu": str(node_cpu),
        "cpuacct": str(node_cpu),
    }
    w = pool.create_worker(3)
    leaf = node_mem / "w3"
    assert (leaf / "memory.limit_in_bytes").read_text() == str(64 * MiB)
    assert not (leaf / "memory.memsw.limit_in_bytes").exists()  # no swap accounting here
    assert (node_pids / "w3" / "pids.max").read_text() == "8"
    assert (node_cpu / "w3" / "cpu.cfs_period_us").read_text() == "100000"
    assert (node_cpu / "w3" / "cpu.cfs_quota_us").read_text() == "50000"
    assert len(w.unique_dirs()) == 3  # cpu and cpuacct share one directory

    pool.attach(w, NO_PID)
    assert (leaf / "cgroup.procs").read_text() == str(NO_PID)
    assert (node_cpu / "w3" / "cgroup.procs").read_text() == str(NO_PID)

    # What the fork server asks once the worker is gone: memory.oom_control's oom_kill, and
    # before Linux 4.13 (no such line) memory.failcnt, how often the limit was hit.
    (leaf / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    assert pool.oom_kills(w) == 1 and pool.oom_killed(w)
    (leaf / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\n")
    (leaf / "memory.failcnt").write_text("0\n")
    assert pool.oom_kills(w) == 0 and not pool.oom_killed(w)
    (leaf / "memory.failcnt").write_text("2\n")
    assert pool.oom_killed(w)

    # A worker whose limit can't be set: CgroupError, and nothing of its cgroup left.
    real_write = cg_layout._write

    def refuse_pids_max(path: str, text: str) -> None:
        if path.endswith("pids.max"):
            raise OSError(errno.EINVAL, "Invalid argument", path)
        real_write(path, text)

    with pytest.MonkeyPatch.context() as mp:
        _patch_write(mp, refuse_pids_max)
        with pytest.raises(CgroupError, match="setting up worker 4's cgroup failed"):
            pool.create_worker(4)
    assert not any(Path(n, "w4").exists() for n in pool.nodes.values())

    # removal waits for the processes to leave, up to its deadline
    with pytest.raises(CgroupBusyError, match=str(NO_PID)):
        pool.remove(w, timeout=0.05)
    for d in w.unique_dirs():
        Path(d, "cgroup.procs").write_text("")
    pool.remove(w)
    assert not leaf.exists() and not (node_cpu / "w3").exists()
    pool.remove(w)  # idempotent
    # the launcher's end: the whole subtree, by name
    pool.create_worker(5)
    assert sorted(cg_removal.remove_pool(pool.name, layout)) == sorted(set(pool.nodes.values()))
    assert not node_mem.exists() and not node_cpu.exists() and not node_pids.exists()


def test_pool_creation_failing_midway_leaves_nothing(tmp_path: Path, fake_fs: None) -> None:
    """The launcher reports a CgroupError it gets here; the nodes made before it are gone."""
    layout = detect_layout(*v1_tree(tmp_path))
    real_mkdir = os.mkdir
    made: list[str] = []

    def mkdir(path: str, mode: int = 0o777) -> None:
        if made:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        real_mkdir(path, mode)
        made.append(path)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "mkdir", mkdir)
        with pytest.raises(CgroupError, match="creating the pool's cgroups failed"):
            make_cgroups(Limits.parse("64M", 8, 0.5), layout=layout)
    assert len(made) == 1 and not os.path.exists(made[0])
    assert not any(p.name.startswith("nspool-") for p in tmp_path.rglob("*"))


def test_v1_memsw_follows_memory(tmp_path: Path, fake_fs: None) -> None:
    layout = detect_layout(*v1_tree(tmp_path))
    with pool_subtree(Limits(memory=8 * MiB), layout=layout) as pool:
        # the kernel makes memory.memsw.* in every new cgroup where swap is accounted
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(os, "mkdir", _mkdir_with({"memory.memsw.limit_in_bytes": "max"}))
            w = pool.create_worker(1)
        assert Path(w.dirs["memory"], "memory.memsw.limit_in_bytes").read_text() == str(8 * MiB)


def test_v2_pool_under_the_delegated_parent(tmp_path: Path, fake_fs: None) -> None:
    """The scope holds the program, so its children can't get controllers: the pool node goes
    under app.slice, which passes them down already."""
    layout = detect_layout(*v2_tree(tmp_path))
    app = tmp_path / "user.slice" / "user@1000.service" / "app.slice"
    with pool_subtree(Limits.parse("512M", 16, 1.5), layout=layout) as pool:
        node = app / pool.name
        assert set(pool.nodes.values()) == {str(node)}
        assert pool.version_of("memory") == 2
        assert (node / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
        assert (app / "cgroup.subtree_control").read_text() == "cpu memory pids\n"  # untouched
        w = pool.create_worker(1)
        leaf = node / "w1"
        assert w.unique_dirs() == [str(leaf)]
        assert (leaf / "memory.max").read_text() == str(512 * MiB)
        assert (leaf / "pids.max").read_text() == "16"
        assert (leaf / "cpu.max").read_text() == "150000 100000"
        assert not (leaf / "memory.swap.max").exists()

        (leaf / "cpu.stat").write_text(
            "usage_usec 2000000\nuser_usec 1500000\nsystem_usec 500000\nnr_periods 0\n"
        )
        (leaf / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
        with closing(pool.meter(w)) as meter:
            assert meter.read() == Usage(1.5, 0.5, None, 1)  # no memory.peak: kernel < 5.19
            assert not meter.reset_peak()  # nothing to reset
        assert pool.oom_kills(w) == 1 and pool.oom_killed(w)
    assert not node.exists()


def test_v2_enables_controllers_where_allowed(
    tmp_path: Path, fake_fs: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = detect_layout(*v2_tree(tmp_path, parent_enabled="cpu"))
    app = tmp_path / "user.slice" / "user@1000.service" / "app.slice"
    writes: list[tuple[str, str]] = []
    real_write = cg_layout._write

    def record(path: str, text: str) -> None:
        writes.append((path, text))
        real_write(path, text)

    _patch_write(monkeypatch, record)
    with pool_subtree(Limits.parse(pids_limit=4), layout=layout) as pool:
        # The scope holds the program; app.slice holds none, so pids (required) and memory
        # (for usage) get enabled there, in one write.
        enabling = [t for p, t in writes if p == str(app / "cgroup.subtree_control")]
        assert enabling == ["+memory +pids"]
        assert pool.controllers == {"pids", "memory", "cpuacct"}
        node = app / pool.name
        assert (str(node / "cgroup.subtree_control"), "+memory +pids") in writes
    assert not (app / pool.name).exists()


# A scratch tree that keeps the cgroup v2 rules nspool depends on (as cgroup-v2.rst states them;
# a model of the kernel, not the kernel): a controller's interface files exist in a cgroup only
# when its parent enables the controller in cgroup.subtree_control; cpu.stat is a core file,
# present everywhere; enabling needs the controller in the cgroup's own cgroup.controllers and,
# except at the root, no process in the cgroup (EBUSY); every cgroup but the root has
# cgroup.type; a cgroup filesystem creates no file. (Checked on this machine's 6.18 kernel with
# hugetlb, the one controller its v2 mount has: its files reached a child only once the parent
# enabled it, enabling in a cgroup with a process failed with EBUSY, the root has no
# cgroup.type and a new cgroup has one, and cpu.stat is in a cgroup with no controller.)

_V2_FILES = {
    "memory": {
        "memory.current": "0\n",
        "memory.peak": "0\n",
        "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n",
        "memory.max": "max\n",
        "memory.oom.group": "0\n",
        "memory.swap.max": "max\n",
    },
    "pids": {"pids.max": "max\n", "pids.current": "0\n"},
    "cpu": {"cpu.max": "max 100000\n", "cpu.weight": "100\n"},
}


@pytest.fixture
def v2_rules(tmp_path: Path, fake_fs: None, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The v2 rules above on ``tmp_path`` (the hierarchy's root); returns the log of what was
    written to any cgroup.subtree_control, as ``"<dir relative to tmp_path>: <text>"``."""
    real_mkdir, real_write = os.mkdir, cg_layout._write
    log: list[str] = []

    def mkdir(path: str, mode: int = 0o777) -> None:
        real_mkdir(path, mode)
        enabled = cg_layout._tokens(os.path.join(os.path.dirname(path), "cgroup.subtree_control"))
        files = {
            "cgroup.procs": "",
            "cgroup.controllers": " ".join(sorted(enabled)) + "\n",
            "cgroup.subtree_control": "\n",
            "cgroup.type": "domain\n",
            "cpu.stat": "usage_usec 0\nuser_usec 0\nsystem_usec 0\n",
        }
        for c in enabled:
            files.update(_V2_FILES.get(c, {}))
        for name, text in files.items():
            Path(path, name).write_text(text)

    def write(path: str, text: str) -> None:
        if not os.path.exists(path):
            raise PermissionError(errno.EACCES, "a cgroup filesystem creates no file", path)
        d = os.path.dirname(path)
        if os.path.basename(path) != "cgroup.subtree_control":
            real_write(path, text)
            return
        log.append(f"{os.path.relpath(d, tmp_path)}: {text}")
        available = cg_layout._tokens(os.path.join(d, "cgroup.controllers"))
        enabled = cg_layout._tokens(path)
        for token in text.split():
            if token[:1] not in ("+", "-") or token[1:] not in available:
                raise OSError(errno.ENOENT, f"{token!r}: controller not available", path)
            (enabled.add if token[0] == "+" else enabled.discard)(token[1:])
        is_root = not os.path.exists(os.path.join(d, "cgroup.type"))
        if enabled - cg_layout._tokens(path) and not is_root and cg_layout._has_procs(d):
            raise OSError(errno.EBUSY, "no internal processes", path)
        real_write(path, " ".join(sorted(enabled)) + "\n")

    monkeypatch.setattr(os, "mkdir", mkdir)
    _patch_write(monkeypatch, write)
    return log


def test_v2_usage_alone_gets_memory_accounting(tmp_path: Path, v2_rules: list[str]) -> None:
    """track_usage without a memory limit: the pool node must still go where the memory
    controller reaches its children, or the worker's leaf has no memory.peak. The scope holds
    the program (no controller can pass below it); app.slice passes memory down already."""
    layout = detect_layout(*v2_tree(tmp_path))
    app = tmp_path / "user.slice" / "user@1000.service" / "app.slice"
    with pool_subtree(Limits(), usage=True, layout=layout) as pool:  # track_usage=True alone
        assert pool.controllers == {"memory", "cpuacct"}
        node = app / pool.name
        assert pool.nodes["memory"] == pool.nodes["cpuacct"] == str(node)
        assert v2_rules == [f"{node.relative_to(tmp_path)}: +memory"]  # app.slice untouched
        w = pool.create_worker(1)
        leaf = Path(w.dirs["memory"])
        assert (leaf / "memory.peak").exists() and (leaf / "memory.events").exists()
        with closing(pool.meter(w)) as meter:
            assert meter.reset_peak()
            # What the kernel shows through the meter's fd once the task touched 200 MiB.
            (leaf / "memory.peak").write_text(f"{200 * MiB}\n")
            (leaf / "cpu.stat").write_text("usage_usec 90000\nuser_usec 10000\nsystem_usec 80000\n")
            assert meter.read() == Usage(0.01, 0.08, 200 * MiB, 0)


def test_v2_usage_alone_enables_memory_where_it_can(tmp_path: Path, v2_rules: list[str]) -> None:
    """app.slice gets memory but does not enable it: usage enables it there (no process in
    it), then in the pool node; nothing is enabled anywhere else."""
    layout = detect_layout(*v2_tree(tmp_path, parent_enabled="cpu"))
    app = (tmp_path / "user.slice" / "user@1000.service" / "app.slice").relative_to(tmp_path)
    with pool_subtree(Limits(), usage=True, layout=layout) as pool:
        assert pool.controllers == {"memory", "cpuacct"}
        assert v2_rules == [f"{app}: +memory", f"{app / pool.name}: +memory"]
        assert Path(pool.create_worker(1).dirs["memory"], "memory.peak").exists()


def test_v2_usage_alone_without_memory_is_cpu_only(
    tmp_path: Path, v2_rules: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No place passes memory down (app.slice not writable): the pool still works under the
    scope, with CPU time from cpu.stat and memory figures None; nothing enabled anywhere."""
    layout = detect_layout(*v2_tree(tmp_path, parent_enabled="cpu"))
    scope = layout.hierarchies["memory"].own_dir
    monkeypatch.setattr(cg_layout, "_writable", lambda path: path.startswith(scope))
    with pool_subtree(Limits(), usage=True, layout=layout) as pool:
        assert pool.controllers == {"cpuacct"}
        assert pool.nodes["cpuacct"] == os.path.join(scope, pool.name)
        assert v2_rules == []
        w = pool.create_worker(1)
        with closing(pool.meter(w)) as meter:
            assert meter.read() == Usage(0.0, 0.0, None, None)
            assert not meter.reset_peak()


def test_v2_limit_without_memory_to_pass_down(tmp_path: Path, v2_rules: list[str]) -> None:
    """app.slice does not get memory: the pids limit still goes there, without accounting."""
    mountinfo, proc_cgroup = v2_tree(tmp_path, parent_enabled="cpu")
    app = tmp_path / "user.slice" / "user@1000.service" / "app.slice"
    (app / "cgroup.controllers").write_text("cpu pids\n")
    layout = detect_layout(mountinfo, proc_cgroup)
    with pool_subtree(Limits(pids=4), layout=layout) as pool:
        assert pool.controllers == {"pids", "cpuacct"}
        rel = app.relative_to(tmp_path)
        assert v2_rules == [f"{rel}: +pids", f"{rel / pool.name}: +pids"]


def test_v2_limits_on_the_rules_tree(tmp_path: Path, v2_rules: list[str]) -> None:
    """Every limit's file is written where the kernel has it (a write to a missing file fails
    here as on a cgroup filesystem), memory accounting comes along."""
    layout = detect_layout(*v2_tree(tmp_path))
    with pool_subtree(Limits.parse("64M", 8, 0.5), layout=layout) as pool:
        leaf = Path(pool.create_worker(1).dirs["memory"])
        assert (leaf / "memory.max").read_text() == str(64 * MiB)
        assert (leaf / "memory.swap.max").read_text() == "0"
        assert (leaf / "memory.oom.group").read_text() == "1"
        assert (leaf / "pids.max").read_text() == "8"
        assert (leaf / "cpu.max").read_text() == "50000 100000"
        assert pool.controllers == {"memory", "pids", "cpu", "cpuacct"}


def test_v2_own_cgroup_that_is_the_root(tmp_path: Path, fake_fs: None) -> None:
    _mkcg(tmp_path, {"cgroup.controllers": "memory pids\n", "cgroup.procs": "1\n"})
    layout = detect_layout(f"1 0 0:1 / {tmp_path} rw - cgroup2 none rw\n", "0::/\n")
    with pool_subtree(Limits(memory=MiB), layout=layout) as pool:
        assert pool.nodes["memory"] == str(tmp_path / pool.name)
        assert (tmp_path / "cgroup.subtree_control").read_text() == "+memory"


def test_v2_container_root_is_no_hierarchy_root(tmp_path: Path, v2_rules: list[str]) -> None:
    """In a container with its own cgroup namespace the mount's root is the container's cgroup,
    not the hierarchy's: it has cgroup.type (the real root has none) and, holding the
    container's processes, can't enable controllers for children. Say that, don't try."""
    _mkcg(
        tmp_path,
        {
            "cgroup.controllers": "cpu memory pids\n",
            "cgroup.subtree_control": "\n",
            "cgroup.type": "domain\n",
            "cgroup.procs": "1\n",
        },
    )
    layout = detect_layout(f"1 0 0:1 / {tmp_path} rw - cgroup2 none rw\n", "0::/\n")
    with pytest.raises(CgroupUnavailableError, match="holds processes"):
        make_cgroups(Limits(memory=MiB), layout=layout)
    assert v2_rules == []
    assert cg_layout.check(["memory"], layout)["memory"] is not None
    with pool_subtree(Limits(), usage=True, layout=layout) as pool:  # CPU time only
        assert pool.controllers == {"cpuacct"}
    assert v2_rules == []


def test_v2_without_delegation_is_a_clear_error(
    tmp_path: Path, fake_fs: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = detect_layout(*v2_tree(tmp_path))
    scope = layout.hierarchies["memory"].own_dir
    app = os.path.dirname(scope)
    monkeypatch.setattr(cg_layout, "_writable", lambda path: path == scope)
    with pytest.raises(CgroupUnavailableError) as info:
        make_cgroups(Limits(memory=MiB), layout=layout)
    msg = str(info.value)
    assert "holds processes" in msg and f"{app} is not writable" in msg
    assert "systemd-run --user --scope -p Delegate=yes" in msg
    assert cg_layout.check(["memory"], layout)["memory"] is not None
    assert not any(p.name.startswith("nspool-") for p in tmp_path.rglob("*"))
    # usage alone never fails: the figures it can't get are None
    monkeypatch.setattr(cg_layout, "_writable", lambda path: True)
    assert cg_layout.check(["memory", "cpuacct"], layout) == {"memory": None, "cpuacct": None}


def test_v2_controller_not_passed_down(tmp_path: Path, fake_fs: None) -> None:
    mountinfo, proc_cgroup = v2_tree(tmp_path)
    app = tmp_path / "user.slice" / "user@1000.service" / "app.slice"
    (app / "cgroup.controllers").write_text("cpu\n")
    (app / "cgroup.subtree_control").write_text("cpu\n")
    with pytest.raises(CgroupUnavailableError, match="does not get the controller"):
        make_cgroups(Limits(pids=3), layout=detect_layout(mountinfo, proc_cgroup))


def test_v1_unwritable_and_missing_controllers(
    tmp_path: Path, fake_fs: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    mountinfo, proc_cgroup = v1_tree(tmp_path)
    layout = detect_layout(mountinfo, proc_cgroup)
    monkeypatch.setattr(cg_layout, "_writable", lambda path: False)
    with pytest.raises(CgroupUnavailableError, match="cgroup v1 has no delegation"):
        make_cgroups(Limits(memory=MiB), layout=layout)
    # track_usage needs CPU time: asked for, so never silently without it
    with pytest.raises(CgroupUnavailableError, match="cpuacct: .* cgroup v1 has no delegation"):
        make_cgroups(Limits(), usage=True, layout=layout)
    layout = detect_layout(mountinfo.replace("rw,pids", "rw,freezer"), proc_cgroup)
    monkeypatch.setattr(cg_layout, "_writable", lambda path: True)
    with pytest.raises(CgroupUnavailableError, match="pids: the cgroup v2 .* no cgroup v1"):
        make_cgroups(Limits(pids=5), layout=layout)
    with pytest.raises(ValueError, match="unknown cgroup controller"):
        PoolCgroups(["blkio"], layout=layout)


def test_remove_stale(tmp_path: Path, fake_fs: None) -> None:
    layout = detect_layout(*v1_tree(tmp_path))
    dead = _dead_pid()
    stale = _mkcg(tmp_path / "pids" / f"nspool-{dead}-abcd")
    _mkcg(stale / "w1")
    busy = _mkcg(tmp_path / "pids" / f"nspool-{dead}-beef", {"cgroup.procs": "77\n"})
    mine = _mkcg(tmp_path / "memory" / "job" / "7" / f"nspool-{os.getpid()}-1234")
    other = _mkcg(tmp_path / "pids" / "somebody-else")
    assert cg_removal.remove_stale(layout) == [str(stale)]
    assert busy.exists() and mine.exists() and other.exists()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


# --------------------------------------------------------------------------------------------
# Live, on this machine's cgroups


LIVE_REASON = cgroups_live_reason()
live = pytest.mark.skipif(LIVE_REASON is not None, reason=LIVE_REASON or "")


CHILD = textwrap.dedent(
    """\
    import os, sys, time
    sys.stdin.readline()  # wait until the parent has moved us into the cgroup
    what = sys.argv[1]
    if what == "hog":
        hog = []
        while True:
            hog.append(bytearray(8 << 20))
            hog[-1][::4096] = b"x" * len(hog[-1][::4096])
    elif what == "fork":
        kids = []
        try:
            while True:
                pid = os.fork()
                if pid == 0:
                    time.sleep(30)
                    os._exit(0)
                kids.append(pid)
        except OSError as e:
            print(len(kids), e.errno, flush=True)
        for pid in kids:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
    elif what == "work":
        block = bytearray(100 << 20)
        block[::4096] = b"x" * len(block[::4096])
        del block
        end = time.process_time() + 0.3
        while time.process_time() < end:  # a clock read is a system call: read it seldom
            for i in range(20000):
                pass
    """
)


def _procs_in(w: WorkerCgroup) -> set[int]:
    """The processes the kernel lists in the worker's cgroups."""
    return {int(p) for d in w.unique_dirs() for p in Path(d, "cgroup.procs").read_text().split()}


def _start_in(pool: PoolCgroups, w: WorkerCgroup, what: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, what],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        pool.attach(w, proc.pid)
        assert _procs_in(w) == {proc.pid}
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    return proc


def _go(proc: subprocess.Popen[str], timeout: float = 10) -> str:
    out, _ = proc.communicate("go\n", timeout=timeout)
    return out


def _cpu(u: Usage) -> float:
    assert u.cpu_user is not None and u.cpu_system is not None, u
    return u.cpu_user + u.cpu_system


@live
def test_live_memory_limit_oom_kills_the_process() -> None:
    with pool_subtree(Limits.parse(memory_limit="64M")) as pool:
        w = pool.create_worker(1)
        assert pool.oom_kills(w) == 0 and not pool.oom_killed(w)
        with closing(pool.meter(w)) as meter:
            before = meter.read()
            proc = _start_in(pool, w, "hog")
            _go(proc)
            after = meter.read()
        assert proc.returncode == -9
        # The task process's check after a task, then the fork server's once the worker died.
        assert before.oom_kills == 0 and after.oom_kills == pool.oom_kills(w), (before, after)
        assert pool.oom_killed(w)
        kills = pool.oom_kills(w)
        if pool.version_of("memory") == 1:
            assert kills == 1
        else:
            # oom_kill is no count of processes here: with memory.oom.group the kernel kills
            # (and counts) the victim, then every process of the group, the victim again
            # among them; one hog reads 2. One OOM event took the group: oom_group_kill
            # (Linux >= 5.16) says so exactly.
            assert kills is not None and kills >= 1
            events = cg_pool._keyed(os.path.join(w.dirs["memory"], "memory.events"))
            assert events.get("oom_group_kill", 1) == 1, events
        pool.remove(w)
        assert not os.path.exists(w.dirs["memory"])


@live
def test_live_pids_limit_makes_fork_fail_with_eagain() -> None:
    with pool_subtree(Limits.parse(pids_limit=4)) as pool:
        assert "pids" in pool.controllers
        w = pool.create_worker(1)
        proc = _start_in(pool, w, "fork")
        assert _go(proc).split() == ["3", str(errno.EAGAIN)]  # itself and 3 children
        assert proc.returncode == 0


@live
def test_live_usage_cpu_time_and_peak_memory() -> None:
    with pool_subtree(Limits.parse(cpu_limit=1.0)) as pool:
        assert pool.controllers == {"memory", "cpu", "cpuacct"}
        w = pool.create_worker(1)
        with closing(pool.meter(w)) as meter:  # as the task loop reads it around a task
            assert meter.reset_peak()
            before = meter.read()
            proc = _start_in(pool, w, "work")
            _go(proc)
            assert proc.returncode == 0
            after = meter.read()
            assert 0.3 <= _cpu(after) - _cpu(before) < 2.0, (before, after)
            assert after.cpu_user is not None and before.cpu_user is not None
            assert after.cpu_user - before.cpu_user >= 0.2, (before, after)
            assert after.memory_peak is not None and after.memory_peak >= 100 * MiB, after
            assert after.oom_kills == before.oom_kills == 0
            assert meter.reset_peak()
            peak = meter.read().memory_peak
            assert peak is not None and peak < 100 * MiB  # the process is gone: peak restarts


@live
def test_live_usage_alone_accounts_memory() -> None:
    """What the launcher asks for with track_usage=True and no limit: memory is accounted in
    the worker's cgroup all the same (issue 20: on v2 it was not enabled down the subtree)."""
    with pool_subtree(Limits(), usage=True) as pool:
        assert pool.controllers == {"memory", "cpuacct"}
        w = pool.create_worker(1)
        with closing(pool.meter(w)) as meter:
            proc = _start_in(pool, w, "work")
            _go(proc)
            assert proc.returncode == 0
            u = meter.read()
        assert u.memory_peak is not None and u.memory_peak >= 100 * MiB, u
        assert _cpu(u) >= 0.3, u


@live
def test_live_remove_pool_kills_what_is_left_and_removes_everything() -> None:
    """The launcher's end: the whole subtree by name, whatever its workers still hold."""
    with pool_subtree(Limits.parse("256M", 32, 0.5)) as pool:
        nodes = set(pool.nodes.values())
        assert nodes and all(os.path.isdir(n) for n in nodes)
        w1 = pool.create_worker(1)
        pool.create_worker(2)
        proc = _start_in(pool, w1, "hog")  # waits on stdin: still there at the end
        try:
            with pytest.raises(CgroupBusyError):
                pool.remove(w1, timeout=0.05)
            assert set(cg_removal.remove_pool(pool.name, pool.layout)) == nodes
        finally:
            proc.kill()
            proc.communicate()
        assert proc.returncode == -9
        assert not any(os.path.exists(n) for n in nodes)


def _v2_cpu_only_layout() -> Layout | None:
    """This machine's cgroup2 mount as the hierarchy for CPU time alone (cpu.stat needs no
    controller), whatever serves the controllers; None without a cgroup2 mount we are in."""
    with open("/proc/self/mountinfo") as f:
        mounts = parse_mountinfo(f.read())
    with open("/proc/self/cgroup") as f:
        path = parse_proc_cgroup(f.read()).get("")
    for m in mounts:
        own = None if path is None or m.fstype != "cgroup2" else cg_layout._own_dir(m, path)
        if own is not None:
            h = Hierarchy(2, m.mountpoint, own, frozenset({"cpuacct"}), m.readonly)
            return Layout({"cpuacct": h})
    return None


V2_CPU_LAYOUT = _v2_cpu_only_layout()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
@pytest.mark.skipif(V2_CPU_LAYOUT is None, reason="no cgroup2 mount here")
def test_live_v2_leaf_cpu_time_and_kill() -> None:
    """The v2 path on the real kernel, wherever a cgroup2 mount is (here: v1 controllers
    beside a v2 mount without any): a pool node and a worker leaf with no controller, a
    process attached, its CPU time from the leaf's cpu.stat (a core file), and remove_pool
    killing what is left through cgroup.kill, sending no signal itself."""
    assert V2_CPU_LAYOUT is not None
    with pool_subtree(Limits(), usage=True, layout=V2_CPU_LAYOUT) as pool:
        assert pool.version_of("cpuacct") == 2 and pool.controllers == {"cpuacct"}
        w = pool.create_worker(1)
        assert os.path.exists(os.path.join(w.dirs["cpuacct"], "cgroup.kill"))
        with closing(pool.meter(w)) as meter:
            before = meter.read()
            proc = _start_in(pool, w, "work")
            _go(proc)
            assert proc.returncode == 0
            spent = meter.read()
        assert spent.cpu_user is not None and before.cpu_user is not None, spent
        assert spent.cpu_user - before.cpu_user >= 0.2, (before, spent)
        assert spent.memory_peak is None and spent.oom_kills is None  # no memory controller
        w2 = pool.create_worker(2)
        waiting = _start_in(pool, w2, "work")  # waits on stdin: still there at the end

        def no_signal(pid: int, sig: int) -> None:
            raise AssertionError(f"remove_pool sent signal {sig} to {pid}, not cgroup.kill")

        try:
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(os, "kill", no_signal)
                removed = cg_removal.remove_pool(pool.name, pool.layout)
        finally:
            waiting.kill()
            waiting.communicate()
        assert waiting.returncode == -9
        assert removed == [pool.nodes["cpuacct"]]
        assert not os.path.exists(w.dirs["cpuacct"])


@pytest.mark.skipif(os.geteuid() == 0, reason="checks the unprivileged error; running as root")
def test_unprivileged_without_delegation_is_a_clear_error() -> None:
    layout = detect_layout()
    if cg_layout.check(["memory"], layout)["memory"] is None:
        pytest.skip("this user has a delegated, writable memory controller")
    with pytest.raises(CgroupUnavailableError, match="systemd-run --user --scope"):
        make_cgroups(Limits.parse(memory_limit="64M"))


# --------------------------------------------------------------------------------------------
# What the pool's processes use: OOM group, OOM watch, the in-worker meter, removal by name


def test_v2_one_oom_kill_takes_the_whole_worker(tmp_path: Path, fake_fs: None) -> None:
    layout = detect_layout(*v2_tree(tmp_path))
    with pool_subtree(Limits.parse("64M"), layout=layout) as pool:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(os, "mkdir", _mkdir_with({"memory.oom.group": "0\n"}))
            w = pool.create_worker(1)
        assert Path(w.dirs["memory"], "memory.oom.group").read_text() == "1"
        assert pool.watch_oom(w) is None  # v2 needs no watch: the kernel kills the group


def test_v2_meter_reads_cpu_stat_peak_and_events(tmp_path: Path, fake_fs: None) -> None:
    layout = detect_layout(*v2_tree(tmp_path))
    with pool_subtree(Limits.parse("64M"), layout=layout) as pool:
        w = pool.create_worker(1)
        leaf = Path(w.dirs["memory"])
        (leaf / "cpu.stat").write_text(
            "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n"
        )
        (leaf / "memory.peak").write_text(f"{40 * MiB}\n")
        (leaf / "memory.events").write_text("low 0\nhigh 0\nmax 0\noom 0\noom_kill 2\n")
        with closing(pool.meter(w)) as meter:
            assert meter.read() == Usage(2.0, 0.5, 40 * MiB, 2)
            assert meter.reset_peak()  # "reset\n" written through the meter's own fd
            assert (leaf / "memory.peak").read_text().startswith("reset\n")


def test_v1_meter_reads_cpuacct_max_usage_and_oom_control(tmp_path: Path, fake_fs: None) -> None:
    layout = detect_layout(*v1_tree(tmp_path))
    files = {
        "cpuacct.usage_user": "1500000000\n",
        "cpuacct.usage_sys": "250000000\n",
        "memory.max_usage_in_bytes": f"{30 * MiB}\n",
        "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
    }
    with pool_subtree(Limits.parse("64M", cpu_limit=1.0), layout=layout) as pool:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(os, "mkdir", _mkdir_with(files))
            w = pool.create_worker(1)
        with closing(pool.meter(w)) as meter:
            assert meter.read() == Usage(1.5, 0.25, 30 * MiB, 0)
            assert meter.reset_peak()
            assert Path(w.dirs["memory"], "memory.max_usage_in_bytes").read_text()[0] == "0"


def test_meter_without_accounting_reads_nothing(
    tmp_path: Path, fake_fs: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pids limit where only the pids hierarchy is writable: the accounting the launcher
    asks for on the side is left out, not an error, and the meter reads nothing."""
    layout = detect_layout(*v1_tree(tmp_path))
    pids_dir = layout.hierarchies["pids"].own_dir
    monkeypatch.setattr(cg_layout, "_writable", lambda path: path == pids_dir)
    with pool_subtree(Limits(pids=4), layout=layout) as pool:
        assert pool.controllers == {"pids"}
        with closing(pool.meter(pool.create_worker(1))) as meter:
            assert meter.read() == Usage()
            assert not meter.reset_peak()


def test_remove_pool_by_name(tmp_path: Path, fake_fs: None) -> None:
    layout = detect_layout(*v1_tree(tmp_path))
    pool = make_cgroups(Limits.parse("64M", 8, 0.5), layout=layout)
    pool.create_worker(1)
    nodes = set(pool.nodes.values())
    assert all(os.path.isdir(n) for n in nodes)
    # As the launcher does at its end:
    assert set(cg_removal.remove_pool(pool.name, layout)) == nodes
    assert not any(os.path.exists(n) for n in nodes)
    assert cg_removal.remove_pool(pool.name, layout) == []
    with pytest.raises(ValueError, match="not an nspool pool"):
        cg_removal.remove_pool("../etc", layout)


@live
def test_live_v1_oom_watch_fires() -> None:
    import select

    with pool_subtree(Limits.parse(memory_limit="48M")) as pool:
        w = pool.create_worker(1)
        efd = pool.watch_oom(w)
        if efd is None:
            pytest.skip("the memory controller is v2 here: no watch needed")
        try:
            proc = _start_in(pool, w, "hog")
            _go(proc)
            assert proc.returncode == -9
            assert select.select([efd], [], [], 5)[0], "no OOM event"
        finally:
            os.close(efd)
