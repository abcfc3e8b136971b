"""Scaling: throughput of trivial tasks against the number of workers."""

from __future__ import annotations

import os

from ._peers import RESULT_TIMEOUT, SyncPeer, opened, sync_peers
from ._stats import no_gc, now_ns
from ._suite import Bench, Config, Figures, Metric
from ._tasks import noop

ROWS = ("nspool", "PPE fork", "PPE forkserver")
CHUNKSIZE = 100


def worker_counts() -> list[int]:
    """1, 2, 4, ... up to the CPU count, and the CPU count itself."""
    cpus = os.cpu_count() or 1
    counts = {cpus}
    n = 1
    while n < cpus:
        counts.add(n)
        n *= 2
    return sorted(counts)


def _n(cfg: Config) -> int:
    return cfg.pick(20_000, 400)


def _series(cfg: Config) -> tuple[str, str]:
    n = f"{_n(cfg):,}"
    return f"submit {n}", f"map {n}, chunksize {CHUNKSIZE}"


def _key(series: str, workers: int) -> str:
    return f"{series}, {workers} worker{'s' if workers > 1 else ''}"


def _metrics(cfg: Config) -> list[Metric]:
    return [
        Metric(_key(s, w), "tasks/s", True, x=w, series=s)
        for s in _series(cfg)
        for w in worker_counts()
    ]


def sync(peer: SyncPeer, cfg: Config, rep: int) -> Figures:
    n = _n(cfg)
    submit, mapped = _series(cfg)
    out: Figures = {}
    for workers in worker_counts():
        with opened(peer, workers) as pool, no_gc():
            t = now_ns()
            futures = [pool.submit(noop, i) for i in range(n)]
            for f in futures:
                f.result(RESULT_TIMEOUT)
            out[_key(submit, workers)] = n / ((now_ns() - t) / 1e9)
            del futures
            t = now_ns()
            got = sum(1 for _ in pool.map(noop, range(n), CHUNKSIZE))
            out[_key(mapped, workers)] = n / ((now_ns() - t) / 1e9)
            assert got == n, (got, n)
    return out


BENCH = Bench(
    name="scaling",
    title="Throughput against the number of workers",
    about=(
        "As `throughput`, for 1, 2, 4, ... workers up to the CPU count: 20,000 `noop(i)` "
        "submitted at once, then every result; then `map(noop, range(20000), chunksize=100)`, "
        "consumed fully. A fresh, warmed-up pool per worker count. Tasks per second over the "
        "batch (higher is better); the plot shows tasks/s against workers."
    ),
    metrics=lambda cfg, kind: _metrics(cfg),
    repeats=(5, 1),
    sync=sync,
    peers=lambda: [p for p in sync_peers() if p.name in ROWS],
    plot="lines",
)

BENCHES = [BENCH]
