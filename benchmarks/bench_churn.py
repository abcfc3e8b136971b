"""Worker churn and the first pool of a program: the start-up costs a user feels when every
task gets a fresh worker (``max_tasks_per_child=1``) and when a program makes its first pool."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from ._peers import RESULT_TIMEOUT, WORKERS, SyncPeer, own_rows
from ._stats import now_ns
from ._suite import Bench, Config, Figures, Metric
from ._tasks import noop

ROOT = str(Path(__file__).resolve().parent.parent)
CHURN = "300 tasks, a new worker each"
FIRST = "first pool: first result"
NSPOOL = "nspool"
PPE_FORKSERVER = "PPE forkserver"


def _executor(name: str, **options: Any) -> Any:
    if name == NSPOOL:
        from nspool import NSPoolExecutor

        return NSPoolExecutor(WORKERS, **options)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(
        WORKERS, mp_context=multiprocessing.get_context("forkserver"), **options
    )


def churn(peer: SyncPeer, cfg: Config, rep: int) -> Figures:
    n = cfg.pick(300, 20)
    ex = _executor(peer.name, max_tasks_per_child=1)
    try:
        for f in [ex.submit(noop, i) for i in range(WORKERS)]:
            f.result(RESULT_TIMEOUT)
        t0 = now_ns()
        for f in [ex.submit(noop, i) for i in range(n)]:
            f.result(RESULT_TIMEOUT)
        took = now_ns() - t0
    finally:
        ex.shutdown(wait=True)
    return {CHURN: n / (took / 1e9)}


# In a fresh interpreter: the program's imports are done before the clock starts (a program
# imports its libraries first); PPE forkserver's server is started by a pool made before, as
# the goal says ("with its server already up").
_FIRST = """
import sys, time
sys.path.insert(0, {root!r})
from benchmarks._tasks import noop
from benchmarks.bench_churn import _executor
import concurrent.futures.process, multiprocessing, nspool.executor  # the program's imports
name = sys.argv[1]
if name != {nspool!r}:
    ex = _executor(name)
    ex.submit(noop, None).result()
    ex.shutdown()
t0 = time.perf_counter_ns()
ex = _executor(name)
ex.submit(noop, None).result()
t1 = time.perf_counter_ns()
ex.shutdown()
print((t1 - t0) / 1e6)
"""


def first_pool(peer: SyncPeer, cfg: Config, rep: int) -> Figures:
    if peer.name == NSPOOL:
        import nspool  # noqa: F401 - the child imports it from the same place

    done = subprocess.run(
        [sys.executable, "-c", _FIRST.format(root=ROOT, nspool=NSPOOL), peer.name],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
        },
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip()[-300:])
    return {FIRST: float(done.stdout.split()[-1])}


def _skip(peer: object) -> str | None:
    if getattr(peer, "name", "") == PPE_FORKSERVER and sys.version_info < (3, 11):
        return "ProcessPoolExecutor has max_tasks_per_child from Python 3.11"
    return None


def _rows() -> list[SyncPeer]:
    return own_rows([NSPOOL, PPE_FORKSERVER])


CHURN_BENCH = Bench(
    name="churn",
    title="Worker churn (max_tasks_per_child=1)",
    about=(
        "2 workers with `max_tasks_per_child=1`, so every task needs a new worker: after one "
        "task per worker, 300 `noop` calls submitted at once, tasks/s until the last result "
        "(higher is better). ProcessPoolExecutor with the forkserver context (it refuses "
        "`max_tasks_per_child` with fork)."
    ),
    metrics=lambda cfg, kind: [Metric(CHURN, "tasks/s", True)],
    repeats=(7, 1),
    sync=churn,
    peers=_rows,
    skip=_skip,
    summary=False,
)

FIRST_BENCH = Bench(
    name="firstpool",
    title="The first pool of a program",
    about=(
        "A fresh interpreter per repeat imports its pool library, then times the constructor "
        "to the first result of `noop(None)` with 2 workers, ms. nspool: the program's first "
        "pool (its launcher starts). PPE forkserver: a pool made after another one, so its "
        "forkserver is already up (the cold start the stdlib offers at best)."
    ),
    metrics=lambda cfg, kind: [Metric(FIRST, "ms")],
    repeats=(11, 1),
    sync=first_pool,
    peers=_rows,
    summary=False,
)

BENCHES = [CHURN_BENCH, FIRST_BENCH]
