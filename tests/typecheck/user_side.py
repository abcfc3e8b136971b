"""nspool's public API as a user's own code meets it, for ``mypy --strict`` only (never run:
tests/test_typing.py type-checks it against the installed package).

Every ``assert_type`` pins what a call gives (``Any`` would fail it). A line that must NOT
type-check carries ``# type: ignore[code]``: ``--strict`` includes ``--warn-unused-ignores``,
so the line fails the check if it stops being an error, and a different error is reported as
itself.
"""

from __future__ import annotations

import concurrent.futures
import pickle
from collections.abc import Iterator

import anyio
from typing_extensions import assert_type

import nspool
from nspool import (
    AsyncPool,
    BrokenProcessPool,
    CgroupUnavailableError,
    LauncherDiedError,
    MemoryLimitError,
    NamespaceError,
    NSFuture,
    NSPoolExecutor,
    PoolInitializerError,
    TaskPicklingError,
    TaskTimeoutError,
    TaskUnpicklingError,
    TaskUsage,
    WorkerDiedError,
    open_pool,
    run_sync,
)


def square(x: int) -> int:
    return x * x


def add(x: int, y: int) -> int:
    return x + y


def executor() -> None:
    with NSPoolExecutor(
        4,
        None,
        print,
        ("worker up",),
        max_tasks_per_child=100,
        preload=("json",),
        kill_leftovers=False,
        private_proc=True,
        task_timeout=30,
        max_batch=1,
        start_timeout=10.0,
        memory_limit="512M",
        pids_limit=64,
        cpu_limit=0.5,
        track_usage=True,
    ) as ex:
        f = ex.submit(square, 3)
        assert_type(f, NSFuture[int])
        assert_type(f.result(timeout=1.5), int)
        assert_type(f.exception(), BaseException | None)
        assert_type(f.kill(), bool)
        assert_type(f.kill(timeout=None), bool)
        std: concurrent.futures.Future[int] = f  # still a stdlib future
        g = ex.schedule(add, (1, 2), timeout=0.5)
        assert_type(g, NSFuture[int])
        assert_type(ex.schedule(add, [1], {"y": 2}), NSFuture[int])  # the pool's deadline
        assert_type(ex.schedule(add, (1, 2), timeout=None), NSFuture[int])  # none
        assert_type(ex.map(square, range(10), timeout=5, chunksize=10, buffersize=4), Iterator[int])
        assert_type(ex.worker_pids(), list[int])
        assert_type(ex.launcher_pid, int)

        usage = f.usage
        assert_type(usage, TaskUsage | None)
        if usage is not None:
            assert_type(usage.wall_time, float)
            assert_type(usage.cpu_user, float | None)
            assert_type(usage.cpu_system, float | None)
            assert_type(usage.cpu_time, float | None)
            assert_type(usage.memory_peak, int | None)
            _ = usage.memory_peak >> 20  # type: ignore[operator]  # None where not accounted
            usage.wall_time = 0.0  # type: ignore[misc]  # frozen
        _ = f.usage.wall_time  # type: ignore[union-attr]  # None unless measured

        ex.submit(square, "3")  # type: ignore[arg-type]  # checked as ProcessPoolExecutor's
        ex.submit(add, 1)  # type: ignore[call-arg]
        ex.schedule(add, (1, 2), timeout="soon")  # type: ignore[arg-type]
        text: str = f.result()  # type: ignore[assignment]
        ex.shutdown(wait=False, cancel_futures=True)
    ex.terminate_workers()
    ex.kill_workers()
    nspool.close_shared_launcher()

    NSPoolExecutor(max_workers="4")  # type: ignore[arg-type]
    NSPoolExecutor(memory_limit=1.5)  # type: ignore[arg-type]
    NSPoolExecutor(2, task_timeout="1s")  # type: ignore[arg-type]
    NSPoolExecutor(2, no_such_option=True)  # type: ignore[call-arg]
    del std, text


def errors(ex: NSPoolExecutor, f: NSFuture[int]) -> None:
    try:
        f.result()
    except MemoryLimitError as exc:
        mib: int = exc.limit >> 20
        assert_type(exc.limit, int)
        assert_type(exc.exitcode, int | None)
        assert_type(exc.signal, int | None)
        assert isinstance(exc, WorkerDiedError)
        assert isinstance(exc, BrokenProcessPool)
        del mib
    except WorkerDiedError as exc:
        assert_type(exc.exitcode, int | None)
        assert_type(exc.signal, int | None)
        _ = exc.limit  # type: ignore[attr-defined]  # only MemoryLimitError has one
    except TaskTimeoutError as exc:
        assert isinstance(exc, TimeoutError)
        _ = exc.deadline  # type: ignore[attr-defined]  # a real class, not a subclass of Any
    except TaskPicklingError as exc:
        assert isinstance(exc, pickle.PicklingError)
        assert_type(exc.original_type, type[BaseException] | None)
    except TaskUnpicklingError as exc:
        assert isinstance(exc, BrokenProcessPool) and isinstance(exc, pickle.UnpicklingError)
    except (LauncherDiedError, PoolInitializerError) as exc:
        assert_type(exc, LauncherDiedError | PoolInitializerError)
        _ = exc.exitcode  # type: ignore[union-attr]
    except (NamespaceError, CgroupUnavailableError) as exc:
        assert_type(exc.errno, int | None)
        assert_type(exc.strerror, str | None)
    except BrokenProcessPool:
        pass

    WorkerDiedError("gone")  # type: ignore[call-arg]  # exitcode and signal are keywords
    MemoryLimitError("over", limit=None, exitcode=None, signal=9)  # type: ignore[arg-type]
    _ = TaskTimeoutError("late").no_such  # type: ignore[attr-defined]


async def async_front() -> None:
    async with open_pool(
        2,
        initializer=print,
        initargs=("up",),
        max_tasks_per_child=10,
        preload=("json",),
        kill_leftovers=True,
        private_proc=False,
        idle_timeout=60.0,
        max_batch=8,
        start_timeout=10.0,
        memory_limit=256 << 20,
        pids_limit=32,
        cpu_limit=2,
        track_usage=True,
    ) as pool:
        assert_type(pool, AsyncPool)
        assert_type(await pool.run(square, 3), int)
        assert_type(await pool.run(add, 1, 2, cancellable=False), int)
        assert_type(await pool.run_with_usage(square, 4), tuple[int, TaskUsage | None])
        assert_type(pool.worker_pids(), list[int])
        assert_type(pool.launcher_pid, int)
        (await pool.run(square, 3)).upper()  # type: ignore[attr-defined]
        await pool.run(square, 3, timeout=1)  # type: ignore[call-arg]  # cancel scopes do it
    limiter = nspool.current_default_pool_limiter()
    assert_type(limiter, anyio.CapacityLimiter)
    assert_type(await run_sync(square, 5, limiter=limiter), int)
    assert_type(await nspool.run_sync(add, 1, 2, cancellable=False), int)
    open_pool(2, task_timeout=5)  # type: ignore[call-arg]  # the async front has none


def main() -> None:
    anyio.run(async_front)
    anyio.run(async_front, backend="trio")
    executor()
    _ = nspool.NSPoolExecuter  # type: ignore[attr-defined]  # no module __getattr__ for mypy
