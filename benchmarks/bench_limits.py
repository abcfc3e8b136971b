"""What resource limits cost: a pool with cgroup limits (and usage per task) beside the same
pool without, in one run: cold start, worker respawn and round trip."""

from __future__ import annotations

import os
from typing import Any

from ._peers import RESULT_TIMEOUT, SyncPeer, own_rows
from ._stats import median, no_gc, now_ns
from ._suite import Bench, Config, Figures, Metric
from ._tasks import noop

BASELINE = "nspool, no limits"
#: row -> the pool's options
ROWS: dict[str, dict[str, Any]] = {
    BASELINE: {},
    "nspool, track_usage=True": {"track_usage": True},
    "nspool, memory+pids+cpu limits": {
        "memory_limit": "1G",
        "pids_limit": 512,
        "cpu_limit": 1.0,
    },
}
COLD, RESPAWN, ROUND = "cold start", "worker respawn", "round trip"


def sync(peer: SyncPeer, cfg: Config, rep: int) -> Figures:
    from nspool import NSPoolExecutor

    options = ROWS[peer.name]
    # Cold start: constructor to the first result (launcher, cgroup subtree, first worker).
    t = now_ns()
    with NSPoolExecutor(1, **options) as ex:
        ex.submit(noop, None).result(RESULT_TIMEOUT)
        cold = (now_ns() - t) / 1e6
        samples = []
        with no_gc():
            for _ in range(cfg.pick(1000, 30)):
                t = now_ns()
                ex.submit(noop, None).result(RESULT_TIMEOUT)
                samples.append(now_ns() - t)
    # Respawn: every task needs a new worker (and, with limits, a new cgroup for it).
    respawns = []
    with NSPoolExecutor(1, max_tasks_per_child=1, **options) as ex:
        ex.submit(noop, None).result(RESULT_TIMEOUT)
        with no_gc():
            for _ in range(cfg.pick(100, 10)):
                t = now_ns()
                ex.submit(noop, None).result(RESULT_TIMEOUT)
                respawns.append(now_ns() - t)
    return {COLD: cold, RESPAWN: median(respawns) / 1e6, ROUND: median(samples) / 1e3}


def _skip(peer: object) -> str | None:
    options = ROWS.get(getattr(peer, "name", ""), {})
    if not options:
        return None
    from nspool._cgroups import layout

    try:
        problems = {c: w for c, w in layout.check(["memory", "pids", "cpu"]).items() if w}
    except OSError as exc:
        return f"cgroups cannot be read: {exc}"
    if problems:
        return "limits are not available here: " + "; ".join(
            f"{c}: {w}" for c, w in sorted(problems.items())
        )
    return None


BENCH = Bench(
    name="limits",
    title="What resource limits cost",
    about=(
        "One pool of 1 worker per row, built the same way but for its options: none; "
        "`track_usage=True` (a cgroup per worker, each task's CPU time and peak memory read "
        "around it and sent with its result); and `memory_limit`, `pids_limit`, `cpu_limit` "
        "(limits set in the worker's cgroup, usage measured too). Cold start: constructor to "
        "the first result, ms (the launcher makes the pool's cgroup subtree first). Worker "
        "respawn: median call of 100 with `max_tasks_per_child=1`, so every call waits for a "
        "new worker, whose cgroup is made, joined and removed, ms. Round trip: median of 1,000 "
        f"sequential `noop` calls on a warm worker, µs. uid {os.geteuid()}; the ratio column "
        "is the row over the no-limits row of the same repeat."
    ),
    metrics=lambda cfg, kind: [Metric(COLD, "ms"), Metric(RESPAWN, "ms"), Metric(ROUND, "µs")],
    repeats=(9, 1),
    sync=sync,
    peers=lambda: own_rows(ROWS),
    skip=_skip,
    baseline=BASELINE,
    ratio="× no limits",
    summary=False,
)

BENCHES = [BENCH]
