"""The pools under test, behind two small interfaces.

* ``SyncPeer.open(workers)`` returns a ``SyncPool`` (``submit``/``map``/``close``): nspool,
  ``ProcessPoolExecutor`` with the fork, forkserver and spawn contexts, loky and pebble.
* ``AsyncPeer.open(workers)`` is an async context manager yielding ``run(fn, *args)``:
  ``anyio.to_process`` on asyncio and trio, ``trio_parallel``, executors awaited with
  ``asyncio.wrap_future``, and nspool's async front once ``nspool.open_pool`` exists.

A peer whose library is missing stays in the list with ``missing`` set, so reports say why it
has no figures. Every import of a peer library happens lazily, inside ``open``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from concurrent.futures import Executor, Future
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, cast

from ._tasks import noop

RESULT_TIMEOUT = 120.0  # seconds; a hung pool fails its measurement instead of the suite
WORKERS = 2

RunSync = Callable[..., Coroutine[Any, Any, Any]]


class SyncPool(Protocol):
    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Future[Any]: ...
    def map(self, fn: Callable[..., Any], it: Iterable[Any], chunksize: int) -> Iterable[Any]: ...
    def close(self) -> None: ...


class _ExecutorPool:
    def __init__(self, ex: Executor, close: Callable[[], None] | None = None) -> None:
        self.ex = ex
        self.close = close or partial(ex.shutdown, wait=True)

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Future[Any]:
        return self.ex.submit(fn, *args)

    def map(self, fn: Callable[..., Any], it: Iterable[Any], chunksize: int) -> Iterable[Any]:
        return self.ex.map(fn, it, timeout=RESULT_TIMEOUT, chunksize=chunksize)


class _PebblePool:
    def __init__(self, workers: int) -> None:
        import pebble

        self.pool = pebble.ProcessPool(max_workers=workers)

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Future[Any]:
        return self.pool.schedule(fn, args=args)

    def map(self, fn: Callable[..., Any], it: Iterable[Any], chunksize: int) -> Iterable[Any]:
        return self.pool.map(fn, it, chunksize=chunksize).result()

    def close(self) -> None:
        self.pool.close()  # type: ignore[no-untyped-call]
        self.pool.join()


def _nspool(workers: int) -> SyncPool:
    from nspool import NSPoolExecutor

    return _ExecutorPool(NSPoolExecutor(workers))


def _ppe(method: str, workers: int) -> SyncPool:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context(method)
    return _ExecutorPool(ProcessPoolExecutor(workers, mp_context=ctx))


def _loky(workers: int) -> SyncPool:
    import loky  # type: ignore[import-untyped]

    ex = loky.get_reusable_executor(max_workers=workers)
    return _ExecutorPool(ex, partial(ex.shutdown, wait=True, kill_workers=True))


@dataclass(frozen=True)
class SyncPeer:
    name: str
    open: Callable[[int], SyncPool]
    #: the same pool keeps working after a worker dies (else the respawn benchmark rebuilds it)
    survives_crash: bool
    missing: str | None = None


@dataclass(frozen=True)
class AsyncPeer:
    name: str
    backend: str  # "asyncio" or "trio"
    open: Callable[[int], AbstractAsyncContextManager[RunSync]]
    survives_crash: bool = True
    #: leaving ``open``'s context stops the workers (anyio's stop when the event loop ends)
    closes: bool = True
    missing: str | None = None


def _need(*modules: str) -> str | None:
    gone = [m for m in modules if importlib.util.find_spec(m) is None]
    return f"not installed: {', '.join(gone)}" if gone else None


def _no_pool(workers: int) -> SyncPool:
    raise NotImplementedError("this row builds its own pools (its bench's measuring function)")


def own_rows(names: Iterable[str]) -> list[SyncPeer]:
    """Rows for a bench whose measuring function builds its own pools, by row name."""
    return [SyncPeer(name, _no_pool, True) for name in names]


def sync_peers() -> list[SyncPeer]:
    return [
        SyncPeer("nspool", _nspool, True),
        SyncPeer("PPE fork", partial(_ppe, "fork"), False),
        SyncPeer("PPE forkserver", partial(_ppe, "forkserver"), False),
        SyncPeer("PPE spawn", partial(_ppe, "spawn"), False),
        SyncPeer("loky", _loky, False, _need("loky")),
        SyncPeer("pebble", _PebblePool, True, _need("pebble")),
    ]


# -- async peers --------------------------------------------------------------------------------
@asynccontextmanager
async def _anyio_to_process(workers: int) -> AsyncIterator[RunSync]:
    import anyio
    from anyio import to_process

    yield partial(to_process.run_sync, limiter=anyio.CapacityLimiter(workers))


@asynccontextmanager
async def _trio_parallel(workers: int) -> AsyncIterator[RunSync]:
    # ``open_worker_context().run_sync`` is the code path of ``trio_parallel.run_sync`` with a
    # private worker cache, so its workers end with the context instead of at interpreter exit.
    import trio
    import trio_parallel  # type: ignore[import-untyped]

    async with trio_parallel.open_worker_context() as ctx:
        yield partial(ctx.run_sync, limiter=trio.CapacityLimiter(workers))


@asynccontextmanager
async def _wrapped(make: Callable[[int], SyncPool], workers: int) -> AsyncIterator[RunSync]:
    pool = make(workers)

    async def run(fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.wrap_future(pool.submit(fn, *args))

    try:
        yield run
    finally:
        pool.close()


@asynccontextmanager
async def _nspool_open_pool(workers: int) -> AsyncIterator[RunSync]:
    import nspool

    async with cast(Any, nspool).open_pool(max_workers=workers) as pool:
        yield getattr(pool, "run", None) or pool.run_sync


@asynccontextmanager
async def _nspool_run_sync(workers: int) -> AsyncIterator[RunSync]:
    # The event loop's default pool (like anyio.to_process): it ends with the loop.
    import anyio

    import nspool

    yield partial(cast(Any, nspool).run_sync, limiter=anyio.CapacityLimiter(workers))


def _nspool_aio(kind: str, backend: str) -> AsyncPeer:
    """nspool's own async front: ``async with nspool.open_pool(max_workers=n) as pool:
    await pool.run(fn, *args)``, and ``await nspool.run_sync(fn, *args)``."""
    import nspool

    name = f"nspool.{kind} ({backend})"
    missing = None if hasattr(nspool, kind) else f"nspool.{kind} not there yet"
    if backend == "trio":
        missing = missing or _need("trio")
    if kind == "open_pool":
        return AsyncPeer(name, backend, _nspool_open_pool, missing=missing)
    return AsyncPeer(name, backend, _nspool_run_sync, closes=False, missing=missing)


def async_peers() -> list[AsyncPeer]:
    trio_missing = _need("trio")
    return [
        _nspool_aio("open_pool", "asyncio"),
        _nspool_aio("open_pool", "trio"),
        _nspool_aio("run_sync", "asyncio"),
        _nspool_aio("run_sync", "trio"),
        AsyncPeer("nspool + wrap_future (asyncio)", "asyncio", partial(_wrapped, _nspool)),
        AsyncPeer(
            "PPE forkserver + wrap_future (asyncio)",
            "asyncio",
            partial(_wrapped, partial(_ppe, "forkserver")),
            survives_crash=False,
        ),
        AsyncPeer("anyio.to_process (asyncio)", "asyncio", _anyio_to_process, closes=False),
        AsyncPeer(
            "anyio.to_process (trio)",
            "trio",
            _anyio_to_process,
            closes=False,
            missing=trio_missing,
        ),
        AsyncPeer(
            "trio_parallel (trio)",
            "trio",
            _trio_parallel,
            missing=trio_missing or _need("trio_parallel"),
        ),
    ]


# -- warm-up and lifecycle ------------------------------------------------------------------------
def warm_up(pool: SyncPool, workers: int) -> None:
    """Start every worker and run the code paths once before anything is timed."""
    for f in [pool.submit(noop, i) for i in range(4 * workers)]:
        f.result(RESULT_TIMEOUT)
    for i in range(20):
        pool.submit(noop, i).result(RESULT_TIMEOUT)


@contextmanager
def opened(peer: SyncPeer, workers: int = WORKERS) -> Iterator[SyncPool]:
    pool = peer.open(workers)
    try:
        warm_up(pool, workers)
        yield pool
    finally:
        pool.close()


async def warm_up_async(run: RunSync, workers: int) -> None:
    import anyio

    async with anyio.create_task_group() as tg:
        for i in range(4 * workers):
            tg.start_soon(run, noop, i)
    for i in range(20):
        await run(noop, i)


@asynccontextmanager
async def opened_async(peer: AsyncPeer, workers: int = WORKERS) -> AsyncIterator[RunSync]:
    async with peer.open(workers) as run:
        await warm_up_async(run, workers)
        yield run


# -- leftover processes ---------------------------------------------------------------------------
_HELPERS = ("resource_tracker", "forkserver")  # per-program helpers of multiprocessing and loky


def _cmdline(p: Any) -> str:
    try:
        return " ".join(p.cmdline()) or p.name()
    except Exception:  # noqa: BLE001 - gone or a zombie
        return "?"


def _shared_launcher() -> set[int]:
    """nspool's per-program launcher (its two processes; its workers do count)."""
    from nspool._core import shared_launcher

    process = shared_launcher.current()
    return set() if process is None else process.pids()


def leftovers() -> list[Any]:
    """Descendants of this process, except the per-program helper processes of
    multiprocessing and nspool."""
    import psutil  # type: ignore[import-untyped]

    helpers = _shared_launcher()
    out = []
    for p in psutil.Process().children(recursive=True):
        cmd = _cmdline(p)
        if p.pid not in helpers and not any(h in cmd for h in _HELPERS):
            out.append(p)
    return out


def settle(grace: float = 5.0) -> list[str]:
    """Wait up to ``grace`` s for the pools' processes to go; kill (by pid) and describe any
    still there. An empty list means the measurement left nothing behind."""
    deadline = time.monotonic() + grace
    while (left := leftovers()) and time.monotonic() < deadline:
        time.sleep(0.05)
    described = []
    for p in left:
        try:
            described.append(f"pid {p.pid} [{p.status()}] {_cmdline(p)[:80]}")
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        except Exception as exc:  # noqa: BLE001
            described.append(f"pid {p.pid}: {exc!r}")
    return described


def stop_helpers() -> None:
    """Stop the forkserver and resource trackers that multiprocessing and loky keep per program,
    and nspool's shared launcher, so that the suite ends with no child process at all."""
    from multiprocessing import forkserver, resource_tracker

    from nspool import close_shared_launcher

    stops: list[Callable[[], None]] = [
        close_shared_launcher,
        forkserver._forkserver._stop,  # type: ignore[attr-defined]
        resource_tracker._resource_tracker._stop,  # type: ignore[attr-defined]
    ]
    if importlib.util.find_spec("loky") is not None:
        from loky.backend import resource_tracker as loky_rt  # type: ignore[import-untyped]

        stops.append(loky_rt._resource_tracker._stop)
    for stop in stops:
        try:
            stop()
        except Exception:  # noqa: BLE001 - best effort
            pass
