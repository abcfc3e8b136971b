"""asyncio-only behaviour, run with pytest-asyncio: run_in_executor, wrap_future and
task.cancel()."""

from __future__ import annotations

import asyncio
import os

import pytest
import tasks
from _procs import wait_gone

import nspool
from nspool import NSPoolExecutor


@pytest.mark.asyncio
async def test_run_in_executor_works() -> None:
    with NSPoolExecutor(2) as ex:
        loop = asyncio.get_running_loop()
        got = await asyncio.gather(*(loop.run_in_executor(ex, tasks.square, i) for i in range(8)))
        assert list(got) == [i * i for i in range(8)]


@pytest.mark.asyncio
async def test_wrap_future_keeps_results_and_error_types() -> None:
    """asyncio.wrap_future over NSPoolExecutor futures: results, a task's own exception, and
    a pickling error that stays catchable as the TypeError pickling raised."""
    import threading

    with NSPoolExecutor(2) as ex:
        got = await asyncio.gather(
            *(asyncio.wrap_future(ex.submit(tasks.square, i)) for i in range(8))
        )
        assert list(got) == [i * i for i in range(8)]
        with pytest.raises(ValueError, match="boom"):
            await asyncio.wrap_future(ex.submit(tasks.raise_value_error, "boom"))
        with pytest.raises(TypeError, match="argument 0"):
            await asyncio.wrap_future(ex.submit(tasks.square, threading.Lock()))


@pytest.mark.asyncio
async def test_task_cancel_kills_the_calls_tree(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pid_file = str(tmp_path / "daemon.pid")
    async with nspool.open_pool(max_workers=2) as pool:
        call = asyncio.ensure_future(pool.run(tasks.spawn_daemon_then_sleep, pid_file, 60))
        deadline = asyncio.get_running_loop().time() + 10
        while not os.path.exists(pid_file):
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.005)
        with open(pid_file) as f:
            daemon = int(f.read())
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert wait_gone([daemon], 1.0) == set()
        assert await pool.run(tasks.square, 6) == 36


@pytest.mark.asyncio
async def test_wait_for_timeout_kills_the_call() -> None:
    async with nspool.open_pool(max_workers=1) as pool:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(pool.run(tasks.sleep_forever), 0.2)
        assert await pool.run(tasks.square, 3) == 9


def test_worker_exits_under_plain_asyncio_run_raise_nothing_in_callbacks() -> None:
    """Under plain asyncio.run() (no pytest-asyncio task around the loop), a worker's exit seen
    by the result-pipe reader — max_tasks_per_child, a cancelled call — must not raise in the
    loop's bare reader callback (the old code called anyio.notify_closing() there, which needs
    a task: NoEventLoopError, "Exception in callback", for every exit)."""

    async def main() -> list[dict[str, object]]:
        errors: list[dict[str, object]] = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
        async with nspool.open_pool(max_workers=1, max_tasks_per_child=1) as pool:
            for i in range(5):
                assert await pool.run(tasks.square, i) == i * i
            for _ in range(3):
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(pool.run(tasks.sleep_forever), 0.1)
            assert await pool.run(tasks.square, 7) == 49
        return errors

    errors = asyncio.run(main())
    assert errors == [], [str(e.get("exception") or e.get("message")) for e in errors]
