"""Teardown: from "stop" to every process of a running task's tree gone.

A task on a 1-worker pool starts a tree of n blocking processes (``_tree.make_tree``: fork and
exec of ``sleep``, one in ten a setsid'd double-forked daemon) and blocks. Then the clock runs
from the call that stops it until /proc shows every tree process gone (a zombie counts as gone:
it is dead and only waits for its parent to collect it).

* nspool, ``NSFuture.kill()``: kills the worker's PID namespace; returns once the worker has
  exited (the kernel has then killed every process of the namespace).
* nspool, ``kill_workers()``: every worker and the launcher, then the pool shuts down.
* ProcessPoolExecutor (fork) plus a psutil tree kill of the task's worker, exactly loky's
  ``kill_process_tree``: ``psutil.Process(worker).children(recursive=True)``, SIGKILL them in
  reverse order, SIGKILL the worker, ``join`` it.
* loky, ``shutdown(kill_workers=True)``, which does that same psutil tree kill on every worker.

The daemons have left the worker's tree (their parent exited, so they were reparented to init)
before anything is stopped, so the psutil walk cannot see them: for the psutil rows the clock
stops when every other tree process is gone, the daemons still running then are counted as
*left behind*, and the benchmark kills them itself afterwards so that the run leaves nothing.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from . import _tree
from ._peers import SyncPeer, SyncPool, _loky, _need, _nspool, _ppe, warm_up
from ._stats import no_gc, now_ns
from ._suite import Bench, Config, Figures, Metric

#: how long a tree may take to start, and to be gone, before the measurement fails
START_TIMEOUT = 120.0
GONE_TIMEOUT = 60.0
LEFT = "left behind"


def _sizes(cfg: Config) -> tuple[int, ...]:
    return cfg.pick((10, 100, 1000), (10, 100))


def _key(n: int) -> str:
    return f"{n:,} processes"


def _metrics(cfg: Config) -> list[Metric]:
    big = max(_sizes(cfg))
    return [Metric(_key(n), "ms") for n in _sizes(cfg)] + [
        Metric(f"{LEFT} (of {big:,})", "processes")
    ]


def _executor(pool: SyncPool) -> Any:
    return cast(Any, pool).ex


def _nspool_kill(pool: SyncPool, fut: Any, tree: _tree.Tree) -> bool:
    if not fut.kill(timeout=GONE_TIMEOUT):
        raise AssertionError("NSFuture.kill() found the task already finished")
    return True


def _nspool_kill_workers(pool: SyncPool, fut: Any, tree: _tree.Tree) -> bool:
    _executor(pool).kill_workers()
    return False


def kill_process_tree(process: Any) -> None:
    """loky's ``kill_process_tree`` with psutil (``loky/backend/utils.py``), line for line."""
    import psutil  # type: ignore[import-untyped]

    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return
    # Kill the descendants in reverse order to avoid killing the parents before
    # the descendant in cases where there are more processes nested.
    for descendant in descendants[::-1]:
        try:
            descendant.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        psutil.Process(process.pid).kill()
    except psutil.NoSuchProcess:
        pass
    process.join()


def _ppe_psutil(pool: SyncPool, fut: Any, tree: _tree.Tree) -> bool:
    kill_process_tree(_executor(pool)._processes[tree.worker])
    return False


def _loky_shutdown(pool: SyncPool, fut: Any, tree: _tree.Tree) -> bool:
    _executor(pool).shutdown(wait=True, kill_workers=True)
    return False


@dataclass(frozen=True)
class Way:
    open: Callable[[int], SyncPool]
    #: stop the running task's tree; returns whether the pool is still usable
    stop: Callable[[SyncPool, Any, _tree.Tree], bool]
    #: the setsid'd daemons escape this way of stopping (the clock does not wait for them)
    escapes: bool


WAYS = {
    "nspool: NSFuture.kill()": Way(_nspool, _nspool_kill, False),
    "nspool: kill_workers()": Way(_nspool, _nspool_kill_workers, False),
    "PPE fork + psutil tree kill": Way(lambda n: _ppe("fork", n), _ppe_psutil, True),
    "loky: shutdown(kill_workers=True)": Way(_loky, _loky_shutdown, True),
}


def _peers() -> list[SyncPeer]:
    need = {"loky": _need("loky", "psutil"), "PPE": _need("psutil")}
    return [SyncPeer(name, way.open, True, need.get(name.split()[0])) for name, way in WAYS.items()]


def sync(peer: SyncPeer, cfg: Config, rep: int) -> Figures:
    way = WAYS[peer.name]
    out: Figures = {}
    pool: SyncPool | None = None
    with tempfile.TemporaryDirectory(prefix="nspool-bench-teardown-") as tmp:
        try:
            for n in _sizes(cfg):
                if pool is None:
                    pool = way.open(1)
                    warm_up(pool, 1)
                path = os.path.join(tmp, f"tree-{n}")
                fut = pool.submit(_tree.make_tree, n, path)
                tree = _tree.read_tree(path, n, START_TIMEOUT)
                try:
                    with no_gc():
                        t0 = now_ns()
                        reusable = way.stop(pool, fut, tree)
                        spare = tree.daemons if way.escapes else ()
                        _tree.wait_gone(tree.pids, GONE_TIMEOUT, spare)
                        t1 = now_ns()
                    out[_key(n)] = (t1 - t0) / 1e6
                    left = len(_tree.running(tree.pids))
                    if n == max(_sizes(cfg)):
                        out[f"{LEFT} (of {n:,})"] = float(left)
                finally:
                    # Escaped daemons go first: one forked without exec would hold the dead
                    # worker's sentinel pipe, and ProcessPoolExecutor never notices it died.
                    _tree.kill_all(tree.pids)
                if not reusable:
                    pool.close()
                    pool = None
        finally:
            if pool is not None:
                _hard_close(pool)
    return out


def _hard_close(pool: SyncPool) -> None:
    """Close a pool even if a tree task still runs in it (after a failed measurement)."""
    ex = _executor(pool)
    for process in list(getattr(ex, "_processes", {}).values()):  # PPE, loky
        kill_process_tree(process)
    if hasattr(ex, "worker_pids"):  # nspool
        ex.kill_workers()
    pool.close()


BENCH = Bench(
    name="teardown",
    title="Teardown of a running task's process tree (1 worker)",
    about=(
        "A task on a 1-worker pool starts n `sleep` processes (fork + exec; one in ten is a "
        "daemon: double fork with `setsid`, so it is reparented to init) and blocks. Time from "
        "the call that stops it to /proc showing every process of the tree gone (ms; a zombie "
        "counts as gone). nspool: `NSFuture.kill()` (kills the worker's PID namespace and "
        "returns once the worker has exited) and `kill_workers()` (the whole pool). Peers: "
        "`ProcessPoolExecutor` (fork) plus loky's psutil tree kill of the task's worker "
        "(`psutil.Process(worker).children(recursive=True)`, SIGKILL each in reverse order, then "
        "the worker, then `join`), and loky's own `shutdown(kill_workers=True)`, which does the "
        "same. The daemons escape a psutil walk, so for those rows the clock stops when every "
        "other process is gone; *left behind* counts the tree's processes still running after "
        "the stop returned (for the largest tree), which the benchmark then kills itself. "
        "Pools that a killed worker breaks are rebuilt, untimed, before the next tree."
    ),
    metrics=lambda cfg, kind: _metrics(cfg),
    repeats=(5, 1),
    sync=sync,
    peers=_peers,
    summary=False,
)

BENCHES = [BENCH]
