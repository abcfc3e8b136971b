"""Round trip: submit a trivial call and wait for its result, one at a time."""

from __future__ import annotations

from ._peers import RESULT_TIMEOUT, AsyncPeer, SyncPeer, opened, opened_async
from ._stats import median, no_gc, now_ns
from ._suite import Bench, Config, Figures, Metric
from ._tasks import noop

KEY = "round trip"


def _calls(cfg: Config) -> int:
    return cfg.pick(1000, 30)


def sync(peer: SyncPeer, cfg: Config, rep: int) -> Figures:
    samples = []
    with opened(peer) as pool, no_gc():
        for _ in range(_calls(cfg)):
            t = now_ns()
            pool.submit(noop, None).result(RESULT_TIMEOUT)
            samples.append(now_ns() - t)
    return {KEY: median(samples) / 1e3}


async def aio(peer: AsyncPeer, cfg: Config, rep: int) -> Figures:
    samples = []
    async with opened_async(peer) as run:
        with no_gc():
            for _ in range(_calls(cfg)):
                t = now_ns()
                await run(noop, None)
                samples.append(now_ns() - t)
    return {KEY: median(samples) / 1e3}


BENCH = Bench(
    name="roundtrip",
    title="Round trip (one call at a time)",
    about=(
        "A warm pool of 2 workers runs `noop(None)` 1,000 times, each call submitted only after "
        "the previous result arrived; each call is timed alone with `perf_counter_ns` and a "
        "repeat's figure is the median call, in µs (lower is better)."
    ),
    metrics=lambda cfg, kind: [Metric(KEY, "µs")],
    repeats=(11, 1),
    sync=sync,
    aio=aio,
)

BENCHES = [BENCH]
