"""Memory: per-worker USS and PSS, bare and with a heavy module loaded (preloaded or not).

USS (unique set size) is the memory that goes away when the worker exits; PSS (proportional set
size) also charges each process its share of the pages it shares with others (fork server,
other workers). Both from psutil's ``memory_full_info`` (the kernel's smaps_rollup).
"""

from __future__ import annotations

import importlib.util
import multiprocessing
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from typing import Any, cast

from ._peers import RESULT_TIMEOUT, WORKERS, SyncPeer, SyncPool, _ExecutorPool, sync_peers, warm_up
from ._stats import NAN
from ._suite import Bench, Config, Figures, Metric
from ._tasks import load

ROWS = ("nspool", "PPE forkserver", "PPE spawn")
MIB = float(1 << 20)


def heavy_module() -> str:
    """numpy if it is installed, else a heavy stdlib package."""
    return "numpy" if importlib.util.find_spec("numpy") is not None else "asyncio"


def _variants() -> list[tuple[str, str | None, bool]]:
    """(label, module the tasks import, preloaded)"""
    mod = heavy_module()
    return [("bare", None, False), (mod, mod, False), (f"{mod} preloaded", mod, True)]


def _metrics(cfg: Config) -> list[Metric]:
    return [
        Metric(f"{kind}, {label}", "MiB") for label, _, _ in _variants() for kind in ("USS", "PSS")
    ]


@contextmanager
def _forkserver_preload(modules: list[str]) -> Iterator[None]:
    """A fresh multiprocessing forkserver that preloads ``modules`` (after ``__main__``, its
    default), and the default one back afterwards. The forkserver is one per program, so it is
    restarted for every pool here."""
    from multiprocessing import forkserver

    server = cast(Any, forkserver)._forkserver
    saved = list(server._preload_modules)
    server._stop()
    server._preload_modules = saved + modules
    try:
        yield
    finally:
        server._stop()
        server._preload_modules = saved


def _open(name: str, preload: list[str]) -> tuple[SyncPool, Any]:
    if name == "nspool":
        from nspool import NSPoolExecutor

        ex: Any = NSPoolExecutor(WORKERS, preload=preload)
    else:
        ctx = multiprocessing.get_context(name.split()[1])
        ex = ProcessPoolExecutor(WORKERS, mp_context=ctx)
    return _ExecutorPool(ex), ex


def _worker_pids(ex: Any) -> set[int]:
    if hasattr(ex, "worker_pids"):
        return set(ex.worker_pids())
    return set(ex._processes)


def _measure(name: str, module: str | None, preload: bool) -> tuple[float, float]:
    """Mean USS and PSS (MiB) of the workers of a fresh pool, once every worker has run a
    task that imported ``module``; an nspool worker counts its init too."""
    import psutil  # type: ignore[import-untyped]

    pool, ex = _open(name, [module] if preload and module else [])
    try:
        warm_up(pool, WORKERS)
        seen: set[int] = set()
        for _ in range(50):  # a round of WORKERS overlapping tasks lands on every worker
            futures = [pool.submit(load, module, 0.02) for _ in range(WORKERS)]
            seen.update(f.result(RESULT_TIMEOUT) for f in futures)
            pids = _worker_pids(ex)
            if len(pids) == WORKERS and seen >= pids:
                break
        else:
            raise AssertionError(f"tasks ran on {sorted(seen)}, not on every worker {pids}")
        procs = [psutil.Process(pid) for pid in sorted(pids)]
        if name == "nspool":
            # A worker is two processes: the task process and its namespace's init.
            procs += [p.parent() for p in procs]
        infos = [p.memory_full_info() for p in procs]
    finally:
        pool.close()
    uss = sum(i.uss for i in infos) / WORKERS / MIB
    pss = sum(i.pss for i in infos) / WORKERS / MIB
    return uss, pss


def sync(peer: SyncPeer, cfg: Config, rep: int) -> Figures:
    out: Figures = {}
    for label, module, preload in _variants():
        if preload and peer.name == "PPE spawn":
            uss = pss = NAN  # spawn has no preloading
        elif peer.name == "PPE forkserver":
            with _forkserver_preload([module] if preload and module else []):
                uss, pss = _measure(peer.name, module, preload)
        else:
            uss, pss = _measure(peer.name, module, preload)
        out[f"USS, {label}"] = uss
        out[f"PSS, {label}"] = pss
    return out


def _peers() -> list[SyncPeer]:
    missing = None if importlib.util.find_spec("psutil") else "not installed: psutil"
    return [
        SyncPeer(p.name, p.open, p.survives_crash, p.missing or missing)
        for p in sync_peers()
        if p.name in ROWS
    ]


BENCH = Bench(
    name="memory",
    title="Memory per worker (2 workers)",
    about=(
        "Per-worker USS (private memory: what goes away when the worker exits) and PSS (plus "
        "its share of pages shared with the fork server and other workers), psutil's "
        "`memory_full_info`, MiB, mean of the 2 workers of a fresh pool (an nspool worker is "
        "its task process plus its namespace's init, summed), measured once every "
        "worker has run a task: *bare* after `noop`-like tasks; *"
        + heavy_module()
        + "* after a task that imports it; *preloaded* with the module imported before the "
        "workers are forked (nspool: `NSPoolExecutor(preload=(...))`, imported in the fork "
        "server; PPE forkserver: `set_forkserver_preload`, the forkserver restarted for it). "
        "spawn cannot preload. Lower is better."
    ),
    metrics=lambda cfg, kind: _metrics(cfg),
    repeats=(5, 1),
    sync=sync,
    peers=_peers,
)

BENCHES = [BENCH]
