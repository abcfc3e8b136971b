"""Removing cgroups: a worker's, once its processes are gone, and the subtrees of pools whose
launcher is gone (``remove_pool`` at its end, ``remove_stale`` for one killed with SIGKILL)."""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Iterator

from .errors import CgroupBusyError, CgroupError
from .layout import _POOL_NAME, Layout, _read, _write, detect_layout

__all__ = ["remove_pool", "remove_stale"]


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
