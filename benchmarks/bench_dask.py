"""Dask: CPU-bound pure-Python tasks on a LocalCluster, through Dask's default thread pool, a
``ProcessPoolExecutor`` worker plugin and ``nspool.dask.NSPoolPlugin``.

Part of the suite (``python -m benchmarks.run --only dask``), and runnable alone:
``python -m benchmarks.bench_dask [--quick] [--out DIR]`` (the same runner, this benchmark only).
Needs ``pip install -e '.[bench,dask]'``; without distributed its rows say "not measured".
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ._peers import RESULT_TIMEOUT, WORKERS, SyncPeer, SyncPool
from ._stats import no_gc, now_ns
from ._suite import Bench, Config, Figures, Metric

ROWS = ("nspool (NSPoolPlugin)", "ProcessPoolExecutor plugin", "Dask threads (default)")
EXECUTOR = "procs"  # the name both process executors get in ``worker.executors``


def spin(n: int) -> int:
    """CPU-bound pure Python: holds the GIL all along."""
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


def _sizes(cfg: Config) -> tuple[int, int]:
    """(tasks per repeat, loop length of one task: about 10 ms of CPU)"""
    return cfg.pick(400, 20), cfg.pick(200_000, 20_000)


def _metrics(cfg: Config) -> list[Metric]:
    tasks, _ = _sizes(cfg)
    return [Metric(f"{tasks} tasks", "tasks/s", True), Metric("wall time", "s")]


def _ppe_plugin(workers: int) -> Any:
    from concurrent.futures import ProcessPoolExecutor

    from distributed import WorkerPlugin

    class PPEPlugin(WorkerPlugin):  # what people install today
        name = EXECUTOR

        def setup(self, worker: Any) -> None:
            worker.executors[EXECUTOR] = ProcessPoolExecutor(workers)

    return PPEPlugin()


@contextmanager
def _cluster(row: str) -> Iterator[Any]:
    """One Dask worker process with ``WORKERS`` threads, plus the row's process executor with
    ``WORKERS`` processes; workers are not daemonic (the PPE row could not start otherwise)."""
    import dask
    from distributed import Client, LocalCluster

    with (
        dask.config.set({"distributed.worker.daemon": False}),
        LocalCluster(
            n_workers=1,
            threads_per_worker=WORKERS,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        if row.startswith("nspool"):
            from nspool.dask import NSPoolPlugin

            client.register_plugin(NSPoolPlugin(EXECUTOR, max_workers=WORKERS))
        elif row.startswith("ProcessPool"):
            client.register_plugin(_ppe_plugin(WORKERS))
        yield client


def sync(peer: SyncPeer, cfg: Config, rep: int) -> Figures:
    import dask

    tasks, n = _sizes(cfg)
    annotation = {} if peer.name.startswith("Dask threads") else {"executor": EXECUTOR}
    with _cluster(peer.name) as client, dask.annotate(**annotation):
        # Warm-up: every process of the executor started and the function imported there.
        client.gather(client.map(spin, [1] * 4 * WORKERS, pure=False))
        with no_gc():
            t = now_ns()
            futures = client.map(spin, [n] * tasks, pure=False)
            results = client.gather(futures)
            dt = (now_ns() - t) / 1e9
        assert results == [results[0]] * tasks
        del futures
    return {_metrics(cfg)[0].key: tasks / dt, "wall time": dt}


def _unused(workers: int) -> SyncPool:
    raise NotImplementedError("the dask rows open a cluster of their own")


def _peers() -> list[SyncPeer]:
    missing = None if importlib.util.find_spec("distributed") else "not installed: distributed"
    return [SyncPeer(name, _unused, True, missing) for name in ROWS]


BENCH = Bench(
    name="dask",
    title="Dask: CPU-bound tasks on a LocalCluster",
    about=(
        "A LocalCluster with one worker process of 2 threads (not daemonic, "
        "`distributed.worker.daemon: False`, or the ProcessPoolExecutor row could not start "
        "its processes; nspool does not need it), a fresh cluster per row and repeat; cluster "
        "start and a warm-up untimed. Figure: `client.gather(client.map(spin, ...))` of tasks "
        "of ~10 ms of pure-Python CPU each, as tasks/s and wall time. Rows: Dask's default "
        "thread pool (the GIL lets one task run at a time), a `WorkerPlugin` that installs "
        "`ProcessPoolExecutor(2)`, and `NSPoolPlugin(max_workers=2)`, the process rows chosen "
        f"with `dask.annotate(executor=...)`. Result timeout {RESULT_TIMEOUT:.0f} s."
    ),
    metrics=lambda cfg, kind: _metrics(cfg),
    repeats=(7, 1),
    sync=sync,
    peers=_peers,
    summary=False,
)

BENCHES = [BENCH]


if __name__ == "__main__":
    from benchmarks.run import main

    sys.exit(main(["--only", "dask", *sys.argv[1:]]))
