"""Cold start (constructor to first result) and warm respawn (a task after a worker crashed)."""

from __future__ import annotations

from ._peers import (
    RESULT_TIMEOUT,
    WORKERS,
    AsyncPeer,
    SyncPeer,
    SyncPool,
    _ExecutorPool,
    opened_async,
    sync_peers,
    warm_up,
)
from ._stats import NAN, median, now_ns
from ._suite import Bench, Config, Figures, Metric
from ._tasks import crash, noop

FIRST, CLOSE = "first result", "shutdown"
SEEN, NEXT = "crash seen", "next result"


def cold_sync(peer: SyncPeer, cfg: Config, rep: int) -> Figures:
    t0 = now_ns()
    pool = peer.open(WORKERS)
    try:
        pool.submit(noop, None).result(RESULT_TIMEOUT)
        t1 = now_ns()
    finally:
        pool.close()
    t2 = now_ns()
    return {FIRST: (t1 - t0) / 1e6, CLOSE: (t2 - t1) / 1e6}


async def cold_aio(peer: AsyncPeer, cfg: Config, rep: int) -> Figures:
    t0 = now_ns()
    async with peer.open(WORKERS) as run:
        await run(noop, None)
        t1 = now_ns()
    t2 = now_ns()
    return {FIRST: (t1 - t0) / 1e6, CLOSE: (t2 - t1) / 1e6 if peer.closes else NAN}


def _crashes(cfg: Config) -> int:
    return cfg.pick(3, 1)


def respawn_sync(peer: SyncPeer, cfg: Config, rep: int) -> Figures:
    pool: SyncPool = peer.open(1)
    seen, nxt = [], []
    try:
        warm_up(pool, 1)
        for _ in range(_crashes(cfg)):
            t0 = now_ns()
            try:
                pool.submit(crash).result(RESULT_TIMEOUT)
            except Exception:  # noqa: BLE001 - each pool has its own error for this
                pass
            else:
                raise AssertionError("the crashing task returned")
            t1 = now_ns()
            if not peer.survives_crash:  # the pool is broken: what its user must do
                pool.close()
                pool = peer.open(1)
            pool.submit(noop, None).result(RESULT_TIMEOUT)
            t2 = now_ns()
            seen.append(t1 - t0)
            nxt.append(t2 - t1)
    finally:
        pool.close()
    return {SEEN: median(seen) / 1e6, NEXT: median(nxt) / 1e6}


async def respawn_aio(peer: AsyncPeer, cfg: Config, rep: int) -> Figures:
    seen, nxt = [], []
    async with opened_async(peer, 1) as run:
        for _ in range(_crashes(cfg)):
            t0 = now_ns()
            try:
                await run(crash)
            except Exception:  # noqa: BLE001
                pass
            else:
                raise AssertionError("the crashing task returned")
            t1 = now_ns()
            await run(noop, None)
            t2 = now_ns()
            seen.append(t1 - t0)
            nxt.append(t2 - t1)
    return {SEEN: median(seen) / 1e6, NEXT: median(nxt) / 1e6}


def _private_proc(workers: int) -> SyncPool:
    from nspool import NSPoolExecutor

    return _ExecutorPool(NSPoolExecutor(workers, private_proc=True))


def _peers() -> list[SyncPeer]:
    """The usual pools plus nspool with ``private_proc=True`` (a mount namespace and a /proc of
    its own per worker) right after plain nspool, which stays the baseline."""
    first, *rest = sync_peers()
    return [first, SyncPeer("nspool, private_proc", _private_proc, True), *rest]


COLD = Bench(
    name="coldstart",
    title="Cold start",
    about=(
        "From the pool's constructor (async: entering its context) to the first result of "
        "`noop(None)` with 2 workers, then the time `shutdown(wait=True)` (async: leaving the "
        "context) takes. Each peer is primed once untimed first, so module imports and "
        "multiprocessing's per-program forkserver are not counted; nor is nspool's per-program "
        "launcher, which the priming pool starts: these are a program's *other* pools (its "
        "first pool is the `firstpool` benchmark). anyio's workers stop with the event loop, "
        "so it has no shutdown "
        "figure. *nspool, private_proc*: `NSPoolExecutor(private_proc=True)` (each worker "
        "gets a mount namespace and a /proc of its own). ms, lower is better."
    ),
    metrics=lambda cfg, kind: [Metric(FIRST, "ms"), Metric(CLOSE, "ms")],
    repeats=(15, 1),
    sync=cold_sync,
    aio=cold_aio,
    prime=True,
    peers=_peers,
)

RESPAWN = Bench(
    name="respawn",
    title="Warm respawn after a crash (1 worker)",
    about=(
        "A warm 1-worker pool runs `os._exit(3)` three times per repeat. *crash seen*: submit "
        "to the crash's exception; *next result*: then a `noop(None)` submitted to its result, "
        "i.e. the cost of replacing the dead worker. Pools that a dead worker breaks "
        "(ProcessPoolExecutor, loky) are shut down and rebuilt inside *next result*, which is "
        "what their users must do. *nspool, private_proc* as in cold start. ms, lower is better."
    ),
    metrics=lambda cfg, kind: [Metric(SEEN, "ms"), Metric(NEXT, "ms")],
    repeats=(9, 1),
    sync=respawn_sync,
    aio=respawn_aio,
    prime=True,
    peers=_peers,
    skip=lambda peer: (
        None
        if peer.survives_crash or isinstance(peer, SyncPeer)
        else "a dead worker breaks this pool; the sync table has its rebuild"
    ),
)

BENCHES = [COLD, RESPAWN]
