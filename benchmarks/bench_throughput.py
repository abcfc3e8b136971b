"""Throughput: many trivial tasks at once, through ``submit`` and through ``map``."""

from __future__ import annotations

import anyio

from ._peers import RESULT_TIMEOUT, AsyncPeer, SyncPeer, opened, opened_async
from ._stats import no_gc, now_ns
from ._suite import Bench, Config, Figures, Metric
from ._tasks import noop

CHUNKSIZES = (1, 100)


def _n(cfg: Config) -> int:
    return cfg.pick(20_000, 400)


def _metrics(cfg: Config) -> list[Metric]:
    n = f"{_n(cfg):,}"
    return [Metric(f"submit {n}", "tasks/s", True)] + [
        Metric(f"map {n}, chunksize {c}", "tasks/s", True) for c in CHUNKSIZES
    ]


def sync(peer: SyncPeer, cfg: Config, rep: int) -> Figures:
    n = _n(cfg)
    keys = [m.key for m in _metrics(cfg)]
    out: Figures = {}
    with opened(peer) as pool, no_gc():
        t = now_ns()
        futures = [pool.submit(noop, i) for i in range(n)]
        for f in futures:
            f.result(RESULT_TIMEOUT)
        out[keys[0]] = n / ((now_ns() - t) / 1e9)
        del futures
        for key, chunksize in zip(keys[1:], CHUNKSIZES, strict=True):
            t = now_ns()
            got = sum(1 for _ in pool.map(noop, range(n), chunksize))
            out[key] = n / ((now_ns() - t) / 1e9)
            assert got == n, (got, n)
    return out


def _n_async(cfg: Config) -> int:
    return cfg.pick(5_000, 200)


async def aio(peer: AsyncPeer, cfg: Config, rep: int) -> Figures:
    n = _n_async(cfg)
    async with opened_async(peer) as run:
        with no_gc():
            t = now_ns()
            async with anyio.create_task_group() as tg:
                for i in range(n):
                    tg.start_soon(run, noop, i)
            dt = now_ns() - t
    return {_async_metric(cfg).key: n / (dt / 1e9)}


def _async_metric(cfg: Config) -> Metric:
    return Metric(f"{_n_async(cfg):,} concurrent calls", "tasks/s", True)


BENCH = Bench(
    name="throughput",
    title="Throughput (trivial tasks, 2 workers)",
    about=(
        "Sync fronts: 20,000 `noop(i)` submitted at once, then every result awaited; then "
        "`map(noop, range(20000))` with chunksize 1 and 100, consumed fully. Async fronts: "
        "5,000 calls started at once in one task group (the front's own limiter bounds them to "
        "2 workers). Figures are tasks per second over the whole batch (higher is better)."
    ),
    metrics=lambda cfg, kind: _metrics(cfg) if kind == "sync" else [_async_metric(cfg)],
    repeats=(7, 1),
    sync=sync,
    aio=aio,
)

BENCHES = [BENCH]
