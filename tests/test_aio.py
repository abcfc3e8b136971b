"""The async front on asyncio and trio (anyio's pytest plugin runs each test on both)."""

from __future__ import annotations

import os
import threading
import time

import anyio
import pytest
import tasks
from _procs import alive, pool_processes, wait_for, wait_gone

import nspool
from nspool import TaskPicklingError, WorkerDiedError
from nspool.errors import RemoteTraceback

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def _daemon_pid(pid_file: str) -> int:
    with anyio.fail_after(10):
        while not os.path.exists(pid_file):
            await anyio.sleep(0.005)
    with open(pid_file) as f:
        return int(f.read())


async def test_run_returns_results_and_raises_task_errors() -> None:
    async with nspool.open_pool(max_workers=2) as pool:
        assert await pool.run(tasks.square, 7) == 49
        k = 3
        assert await pool.run(lambda x: x + k, 4) == 7
        with pytest.raises(ValueError, match="bad") as info:
            await pool.run(tasks.raise_value_error, "bad")
        assert isinstance(info.value.__cause__, RemoteTraceback)
        with pytest.raises(TaskPicklingError):
            await pool.run(tasks.echo, threading.Lock())
        with pytest.raises(WorkerDiedError, match="SIGSEGV"):
            await pool.run(tasks.segfault)
        assert await pool.run(tasks.square, 2) == 4


@pytest.mark.parametrize("how", ["fail_after", "cancel_scope", "failing_task_group"])
async def test_cancelling_a_call_kills_its_whole_tree(how: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    pid_file = str(tmp_path / "daemon.pid")
    async with nspool.open_pool(max_workers=2) as pool:
        bystander_result: list[int] = []

        async def bystander() -> None:
            bystander_result.append(await pool.run(tasks.sleep_then_square, 0.8, 6))

        async with anyio.create_task_group() as outer:
            outer.start_soon(bystander)
            daemon = -1
            if how == "fail_after":
                with pytest.raises(TimeoutError):
                    with anyio.fail_after(1.5):
                        call = pool.run(tasks.spawn_daemon_then_sleep, pid_file, 60)
                        async with anyio.create_task_group() as tg:

                            async def watch() -> None:
                                nonlocal daemon
                                daemon = await _daemon_pid(pid_file)

                            tg.start_soon(watch)
                            await call
            elif how == "cancel_scope":
                with anyio.CancelScope() as scope:

                    async def cancel_when_started() -> None:
                        nonlocal daemon
                        daemon = await _daemon_pid(pid_file)
                        scope.cancel()

                    async with anyio.create_task_group() as tg:
                        tg.start_soon(cancel_when_started)
                        await pool.run(tasks.spawn_daemon_then_sleep, pid_file, 60)
                assert scope.cancelled_caught
            else:

                async def fail_once_started() -> None:
                    nonlocal daemon
                    daemon = await _daemon_pid(pid_file)
                    raise KeyError("sibling failed")

                with pytest.raises(BaseException) as info:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(fail_once_started)
                        await pool.run(tasks.spawn_daemon_then_sleep, pid_file, 60)
                assert "sibling failed" in repr(info.value)
            assert daemon > 0
            # The cancellation propagated only after the tree was killed.
            assert wait_gone([daemon], 1.0) == set()
        assert bystander_result == [36]  # the other call was not disturbed
        assert await pool.run(tasks.square, 5) == 25  # the worker was replaced


async def test_non_cancellable_call_runs_to_completion(tmp_path) -> None:  # type: ignore[no-untyped-def]
    marker = tmp_path / "done"
    async with nspool.open_pool(max_workers=1) as pool:
        with anyio.move_on_after(0.1) as scope:
            await pool.run(tasks.sleep_then_touch, 0.5, str(marker), cancellable=False)
            await anyio.sleep(0)  # the caller's next checkpoint sees the cancellation
        assert scope.cancelled_caught
        assert marker.exists()  # the call was not killed: it ran to completion


async def test_cancelling_a_queued_call_kills_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pid_file = str(tmp_path / "daemon.pid")
    async with nspool.open_pool(max_workers=1) as pool:
        async with anyio.create_task_group() as tg:
            # The first call holds the only worker; once its daemon is up, it is running.
            tg.start_soon(pool.run, tasks.spawn_daemon_then_sleep, pid_file, 0.5)
            daemon = await _daemon_pid(pid_file)
            workers = pool.worker_pids()
            with anyio.move_on_after(0.1) as scope:
                await pool.run(tasks.square, 3)  # waits in the queue, then is cancelled
            assert scope.cancelled_caught
            assert not pool._engine.core.queue  # the cancelled call left the queue
            assert pool.worker_pids() == workers and alive(daemon)  # nothing was killed


async def test_ten_thousand_concurrent_calls_all_complete() -> None:
    results: list[int] = []
    async with nspool.open_pool(max_workers=2) as pool:

        async def one(i: int) -> None:
            results.append(await pool.run(tasks.square, i))

        async with anyio.create_task_group() as tg:
            for i in range(10_000):
                tg.start_soon(one, i)
        # The pool bounded what it handed out: at most max_workers * max_batch in flight.
        assert len(pool.worker_pids()) <= 2
    assert sorted(results) == sorted(i * i for i in range(10_000))


async def test_idle_workers_are_reaped_and_restarted() -> None:
    async with nspool.open_pool(max_workers=1, idle_timeout=0.2) as pool:
        assert await pool.run(tasks.square, 2) == 4
        first = pool.worker_pids()
        assert len(first) == 1
        with anyio.fail_after(10):
            while pool.worker_pids():
                await anyio.sleep(0.02)
        assert not alive(first[0])
        assert await pool.run(tasks.square, 3) == 9


async def test_closing_the_pool_leaves_nothing() -> None:
    async with nspool.open_pool(max_workers=2, kill_leftovers=False) as pool:
        tree = await pool.run(tasks.spawn_tree, 10)
        assert all(alive(p) for p in tree)
    assert not any(alive(p) for p in tree)
    assert pool_processes() == {}


def test_run_sync_default_pool_is_shut_down_with_the_event_loop(anyio_backend: str) -> None:
    seen: dict[str, object] = {}

    async def main() -> None:
        seen["limiter"] = nspool.current_default_pool_limiter().total_tokens
        seen["r"] = await nspool.run_sync(tasks.square, 9)
        seen["pid"] = await nspool.run_sync(tasks.host_pid)
        assert pool_processes()  # the default pool is running

    anyio.run(main, backend=anyio_backend)
    assert seen["r"] == 81
    assert seen["limiter"] == (getattr(os, "process_cpu_count", os.cpu_count)() or 1)
    assert wait_for(lambda: not pool_processes(), 2.0)
    assert not alive(int(seen["pid"]))  # type: ignore[call-overload]


def test_run_sync_cancellation_kills_the_tree(anyio_backend: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    pid_file = str(tmp_path / "daemon.pid")
    seen: dict[str, int] = {}

    async def main() -> None:
        async with anyio.create_task_group() as tg:

            async def cancel_when_started() -> None:
                seen["daemon"] = await _daemon_pid(pid_file)
                tg.cancel_scope.cancel()

            tg.start_soon(cancel_when_started)
            await nspool.run_sync(tasks.spawn_daemon_then_sleep, pid_file, 60)
        assert wait_gone([seen["daemon"]], 1.0) == set()
        assert await nspool.run_sync(tasks.square, 4) == 16

    anyio.run(main, backend=anyio_backend)
    assert wait_for(lambda: not pool_processes(), 2.0)


async def test_errors_in_the_body_propagate_unwrapped() -> None:
    with pytest.raises(KeyError, match="mine"):
        async with nspool.open_pool(max_workers=1) as pool:
            await pool.run(tasks.square, 1)
            raise KeyError("mine")


async def test_many_cancellations_do_not_break_the_pool() -> None:
    async with nspool.open_pool(max_workers=2) as pool:
        for _ in range(10):
            with anyio.move_on_after(0.05):
                await pool.run(time.sleep, 10)
        assert await pool.run(tasks.square, 11) == 121


async def test_private_proc_in_the_async_front() -> None:
    async with nspool.open_pool(max_workers=1, private_proc=True) as pool:
        alone, with_child = await pool.run(tasks.proc_view)
        assert len(alone) == 2 and alone[0] == 1  # the init, and the task itself
        assert len(with_child) == 3 and with_child[:2] == alone
