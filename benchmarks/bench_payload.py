"""Payload sweep: echo a ``bytes`` argument of 1 KiB to 64 MiB back as the result."""

from __future__ import annotations

from functools import cache

from ._peers import RESULT_TIMEOUT, AsyncPeer, SyncPeer, opened, opened_async
from ._stats import median, no_gc, now_ns
from ._suite import Bench, Config, Figures, Metric
from ._tasks import echo

KiB, MiB = 1 << 10, 1 << 20
# (size, calls per repeat, repeats): fewer of both for the big sizes
FULL = [(KiB, 300, 7), (64 * KiB, 200, 7), (MiB, 40, 7), (16 * MiB, 6, 5), (64 * MiB, 3, 5)]
QUICK = [(KiB, 5, 1), (MiB, 2, 1)]


def _label(size: int) -> str:
    return f"{size // MiB} MiB" if size >= MiB else f"{size // KiB} KiB"


def _plan(cfg: Config) -> list[tuple[int, int, int]]:
    return cfg.pick(FULL, QUICK)


def _metrics(cfg: Config, kind: str) -> list[Metric]:
    return [Metric(_label(size), "ms", size=size) for size, _, _ in _plan(cfg)]


@cache
def _data(size: int) -> bytes:
    return bytes(range(256)) * (size // 256)


def sync(peer: SyncPeer, cfg: Config, rep: int) -> Figures:
    out: Figures = {}
    with opened(peer) as pool:
        for size, calls, reps in _plan(cfg):
            if rep >= reps:
                continue
            data, samples = _data(size), []
            with no_gc():
                for _ in range(calls):
                    t = now_ns()
                    got = pool.submit(echo, data).result(RESULT_TIMEOUT)
                    samples.append(now_ns() - t)
                    assert len(got) == size
                    del got
            out[_label(size)] = median(samples) / 1e6
    return out


async def aio(peer: AsyncPeer, cfg: Config, rep: int) -> Figures:
    out: Figures = {}
    async with opened_async(peer) as run:
        for size, calls, reps in _plan(cfg):
            if rep >= reps:
                continue
            data, samples = _data(size), []
            with no_gc():
                for _ in range(calls):
                    t = now_ns()
                    got = await run(echo, data)
                    samples.append(now_ns() - t)
                    assert len(got) == size
                    del got
            out[_label(size)] = median(samples) / 1e6
    return out


BENCH = Bench(
    name="payload",
    title="Payload sweep (bytes echo)",
    about=(
        "A warm pool of 2 workers runs `echo(data)` one call at a time, `data` being `bytes` of "
        "1 KiB, 64 KiB, 1 MiB, 16 MiB and 64 MiB (so that much travels each way). A repeat's "
        "figure is the median call in ms (lower is better); per repeat "
        + "/".join(str(c) for _, c, _ in FULL)
        + " calls, and "
        + "/".join(str(r) for _, _, r in FULL)
        + " repeats. The plot shows the effective rate, 2 × size / median time."
    ),
    metrics=_metrics,
    repeats=(max(r for _, _, r in FULL), 1),
    sync=sync,
    aio=aio,
    plot="payload",
)

BENCHES = [BENCH]
