"""Resource limits per worker and per-task usage (issue 12), live on this machine's cgroups.

Root with usable controllers: the live tests run (cgroup v1 here; v2 wherever a writable v2
controller exists, through the same code). Unprivileged without a delegated subtree: the
clear error at construction. Option checking needs neither.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import wait

import anyio
import pytest
import tasks_limits
from _procs import alive, cgroups_live_reason, pool_cgroups, wait_for

from nspool import (
    CgroupUnavailableError,
    MemoryLimitError,
    NSPoolExecutor,
    TaskUsage,
    WorkerDiedError,
    open_pool,
)
from nspool._cgroups import layout as cg_layout
from nspool.errors import BrokenProcessPool, LauncherDiedError

MiB = 1 << 20
HERE = os.path.dirname(os.path.abspath(__file__))


LIVE_REASON = cgroups_live_reason()
live = pytest.mark.skipif(LIVE_REASON is not None, reason=LIVE_REASON or "")


# --------------------------------------------------------------------------------------------
# Options: checked before anything starts


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"memory_limit": "12X"}, "memory_limit"),
        ({"memory_limit": 100}, "memory_limit"),
        ({"pids_limit": 0}, "pids_limit"),
        ({"pids_limit": 2.5}, "pids_limit"),
        ({"cpu_limit": 0}, "cpu_limit"),
        ({"cpu_limit": float("inf")}, "cpu_limit"),
    ],
)
def test_bad_limits_fail_at_construction(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        NSPoolExecutor(1, **kwargs)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_bad_limits_fail_open_pool() -> None:
    with pytest.raises(ValueError, match="memory_limit"):
        async with open_pool(1, memory_limit="lots"):
            pass


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_worker_died_errors_pickle_whole() -> None:
    """They cross processes (Dask, a task's result): keyword-only fields included."""
    import pickle

    err = MemoryLimitError("over", limit=64 * MiB, exitcode=None, signal=9)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is MemoryLimitError and str(back) == "over"
    assert (back.limit, back.exitcode, back.signal) == (64 * MiB, None, 9)
    died = pickle.loads(pickle.dumps(WorkerDiedError("gone", exitcode=3, signal=None)))
    assert type(died) is WorkerDiedError and died.exitcode == 3


# --------------------------------------------------------------------------------------------
# Unprivileged without delegation: a clear error, never a pool without its limit


def _unprivileged_reason() -> str | None:
    if os.geteuid() == 0:
        return "checks the unprivileged error; running as root"
    if cg_layout.check(["memory"])["memory"] is None:
        return "this user has a delegated, writable memory controller"
    return None


@pytest.mark.skipif(_unprivileged_reason() is not None, reason=_unprivileged_reason() or "")
@pytest.mark.parametrize("kwargs", [{"memory_limit": "64M"}, {"pids_limit": 8}, {"cpu_limit": 0.5}])
def test_unprivileged_limits_are_a_clear_error_at_construction(
    kwargs: dict[str, object],
) -> None:
    with pytest.raises(CgroupUnavailableError, match="systemd-run --user --scope") as info:
        NSPoolExecutor(1, **kwargs)  # type: ignore[arg-type]
    assert "can't be enforced here" in str(info.value)
    assert info.value.errno == errno.EPERM and str(info.value).count("[Errno") == 1


# --------------------------------------------------------------------------------------------
# Memory


@live
def test_a_child_over_the_memory_limit_fails_only_its_task() -> None:
    with tempfile.TemporaryDirectory() as tmp, NSPoolExecutor(2, memory_limit="64M") as ex:
        go = os.path.join(tmp, "go")
        sibling = ex.submit(tasks_limits.wait_for_file, go)
        assert wait_for(lambda: len(ex.worker_pids()) == 1, 10)
        sibling_worker = ex.worker_pids()[0]
        hog = ex.submit(tasks_limits.hog_in_child)
        with pytest.raises(MemoryLimitError) as info:
            hog.result(timeout=30)
        exc = info.value
        assert isinstance(exc, WorkerDiedError) and isinstance(exc, BrokenProcessPool)
        assert exc.limit == 64 * MiB
        assert "memory_limit (64 MiB" in str(exc)
        assert exc.signal == signal.SIGKILL
        assert hog.usage is None  # killed: nothing measured
        open(go, "w").close()
        assert sibling.result(timeout=30) == "done"  # untouched, on its own worker
        assert sibling_worker in ex.worker_pids()
        after = ex.submit(tasks_limits.allocate, 16)
        assert after.result(timeout=30) == 16 * MiB  # the pool replaced the worker


@live
def test_a_task_over_the_memory_limit_fails_with_memory_limit_error() -> None:
    with NSPoolExecutor(1, memory_limit="64M") as ex:
        with pytest.raises(MemoryLimitError):
            ex.submit(tasks_limits.allocate, 256).result(timeout=30)
        assert ex.submit(tasks_limits.allocate, 8).result(timeout=30) == 8 * MiB


@live
def test_an_oom_kill_in_a_pool_without_a_memory_limit_is_a_plain_worker_death() -> None:
    """MemoryLimitError names the pool's limit (``exc.limit``, an int). A pool measuring usage
    without one still sees OOM kills in its workers' cgroups, from a limit not its own: that
    task fails with the WorkerDiedError it is, saying the OOM killer did it."""
    with NSPoolExecutor(1, track_usage=True) as ex:
        with pytest.raises(WorkerDiedError) as info:
            ex.submit(tasks_limits.hog_under_own_limit, 64).result(timeout=60)
        assert type(info.value) is WorkerDiedError, info.value
        assert info.value.signal == signal.SIGKILL
        assert "OOM killer" in str(info.value)
        assert ex.submit(tasks_limits.allocate, 8).result(timeout=30) == 8 * MiB


@live
def test_a_task_that_returns_after_its_child_was_killed_for_memory_still_fails() -> None:
    """The race: the child dies of the OOM killer and the task returns at once, while the pool
    is killing the worker for it. Whichever comes first, the future fails with
    MemoryLimitError, never with the task's result, and exactly once."""
    import random

    rng = random.Random(12)
    settled: list[int] = []
    with NSPoolExecutor(2, memory_limit="48M") as ex:
        fs = [ex.submit(tasks_limits.hog_in_child, rng.randrange(3000)) for _ in range(80)]
        for i, f in enumerate(fs):
            f.add_done_callback(lambda f, i=i: settled.append(i))
        wait(fs, timeout=120)
        outcomes = [type(f.exception(timeout=0)).__name__ for f in fs]
    assert outcomes == ["MemoryLimitError"] * len(fs), outcomes
    assert sorted(settled) == list(range(len(fs)))  # each exactly once


@live
def test_kill_and_the_memory_limit_collide() -> None:
    """kill() aimed at 0-60 ms into 30 tasks whose child runs out of memory in about that
    time (both outcomes occur: about a third end with MemoryLimitError), beside tasks nobody
    stops: a stopped task ends with CancelledError or MemoryLimitError, a task that only ran
    out of memory with MemoryLimitError, the others with their result; every future exactly
    once."""
    import random
    import time
    from concurrent.futures import CancelledError, ThreadPoolExecutor

    rng = random.Random(7)
    settled: list[int] = []
    plan: list[tuple[str, object]] = []
    with NSPoolExecutor(2, memory_limit="48M") as ex, ThreadPoolExecutor(1) as killers:
        for i in range(60):  # a plain task and a hog at a time: the kill lands while it runs
            batch = [("plain", ex.submit(tasks_limits.allocate, 4))]
            kind = "killed" if i % 2 else "hog"
            batch.append((kind, ex.submit(tasks_limits.hog_in_child, rng.randrange(2000))))
            if kind == "killed":
                delay = rng.uniform(0, 0.06)  # around the moment the child reaches 48M
                hog = batch[-1][1]
                killers.submit(lambda f=hog, d=delay: (time.sleep(d), f.kill(10)))
            for k, f in batch:
                n = len(plan)
                f.add_done_callback(lambda _, n=n: settled.append(n))
                plan.append((k, f))
            wait([f for _, f in batch], timeout=60)
    allowed = {
        "plain": (),
        "hog": (MemoryLimitError,),
        "killed": (MemoryLimitError, CancelledError),
    }
    for kind, f in plan:
        if f.cancelled():  # type: ignore[attr-defined]
            assert kind == "killed"  # still queued when kill() came
            continue
        exc = f.exception(timeout=0)  # type: ignore[attr-defined]
        if kind == "plain":
            assert exc is None and f.result(0) == 4 * MiB, exc  # type: ignore[attr-defined]
        else:
            assert isinstance(exc, allowed[kind]), (kind, exc)
    assert sorted(settled) == list(range(len(plan)))
    outcomes = [
        "cancelled" if f.cancelled() else type(f.exception(0)).__name__  # type: ignore[attr-defined]
        for kind, f in plan
        if kind == "killed"
    ]
    print("kill() outcomes:", {o: outcomes.count(o) for o in set(outcomes)})


# --------------------------------------------------------------------------------------------
# Processes


@live
def test_pids_limit_makes_fork_fail_with_eagain_inside_the_task() -> None:
    with NSPoolExecutor(1, pids_limit=6) as ex:
        # The task's own process counts: 5 children, then EAGAIN, as the kernel does it.
        assert ex.submit(tasks_limits.fork_until_refused).result(timeout=30) == (5, errno.EAGAIN)
        assert ex.submit(tasks_limits.fork_until_refused).result(timeout=30) == (5, errno.EAGAIN)


@live
def test_a_fork_bomb_is_contained_and_dies_with_its_task() -> None:
    with NSPoolExecutor(1, pids_limit=32) as ex:
        f = ex.submit(tasks_limits.fork_bomb)
        assert f.result(timeout=60) == errno.EAGAIN
        worker = ex.worker_pids()[0]
        # Leftovers are killed when the task returns: the worker's namespace holds only its
        # init and its task process again, so the next task can fork.
        assert ex.submit(tasks_limits.fork_until_refused).result(timeout=30) == (31, errno.EAGAIN)
        assert ex.worker_pids() == [worker]


# --------------------------------------------------------------------------------------------
# Usage


@live
def test_usage_of_memory_cpu_and_the_whole_tree() -> None:
    with NSPoolExecutor(1, track_usage=True) as ex:
        f = ex.submit(tasks_limits.allocate, 200)
        assert f.result(timeout=30) == 200 * MiB
        usage = f.usage
        assert isinstance(usage, TaskUsage)
        assert usage.memory_peak is not None and usage.memory_peak >= 200 * MiB, usage

        f = ex.submit(tasks_limits.busy, 0.5)
        f.result(timeout=30)
        usage = f.usage
        assert usage is not None and usage.cpu_time is not None
        assert 0.4 <= usage.cpu_time <= 1.5, usage
        assert usage.wall_time >= 0.45, usage
        # The peak restarts at each task: this one allocated nothing much.
        assert usage.memory_peak is not None and usage.memory_peak < 100 * MiB, usage

        f = ex.submit(tasks_limits.busy_in_child, 0.4)
        assert f.result(timeout=30) == 0
        usage = f.usage
        assert usage is not None and usage.cpu_time is not None
        assert usage.cpu_time >= 0.3, usage  # the child's CPU counts: it is the task's tree

        f = ex.submit(tasks_limits.allocate, -1)  # raises: usage is measured all the same
        with pytest.raises(ValueError):
            f.result(timeout=30)
        assert f.usage is not None


def test_no_usage_without_limits_or_track_usage() -> None:
    with NSPoolExecutor(1) as ex:
        f = ex.submit(tasks_limits.allocate, 1)
        f.result(timeout=30)
        assert f.usage is None


@live
def test_cpu_limit_throttles() -> None:
    with NSPoolExecutor(1, cpu_limit=0.2) as ex:
        f = ex.submit(tasks_limits.spin_for, 0.8)
        got = f.result(timeout=30)
        usage = f.usage
    assert usage is not None and usage.cpu_time is not None
    # 0.2 CPU for 0.8 s is 0.16 s, give or take one 100 ms period's quota.
    assert got < 0.4, (got, usage)
    assert usage.cpu_time < 0.4, usage


@live
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_async_pools_limit_and_measure(backend: str) -> None:
    async def main() -> tuple[TaskUsage | None, BaseException | None]:
        async with open_pool(1, memory_limit="64M") as pool:
            size, usage = await pool.run_with_usage(tasks_limits.allocate, 16)
            assert size == 16 * MiB
            try:
                await pool.run(tasks_limits.hog_in_child)
            except MemoryLimitError as exc:
                err: BaseException | None = exc
            else:
                err = None
            assert await pool.run(tasks_limits.allocate, 1) == MiB
            return usage, err

    usage, err = anyio.run(main, backend=backend)
    assert usage is not None and usage.memory_peak is not None
    assert usage.memory_peak >= 16 * MiB
    assert isinstance(err, MemoryLimitError) and err.limit == 64 * MiB


# --------------------------------------------------------------------------------------------
# Nothing left under /sys/fs/cgroup


@live
def test_no_cgroup_left_after_kill_9_of_the_program() -> None:
    before = pool_cgroups()
    with subprocess.Popen(
        [sys.executable, os.path.join(HERE, "programs", "owner.py"), "limits"],
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE,
        text=True,
    ) as owner:
        try:
            assert owner.stdout is not None
            info = json.loads(owner.stdout.readline())
            assert set(info["cgroups"]) - before  # the pool's, one per hierarchy
        finally:
            owner.kill()
    # The launcher outlives the program by the time it takes to see it gone and clean up.
    assert wait_for(lambda: not alive(info["launcher"]) and not alive(info["daemon"]), 10)
    assert pool_cgroups() - before == set()


@live
def test_a_stale_subtree_of_a_killed_launcher_goes_with_the_next_pool() -> None:
    before = pool_cgroups()
    ex = NSPoolExecutor(1, memory_limit="64M")
    try:
        running = ex.submit(tasks_limits.wait_for_file, "/nonexistent", 60)
        assert wait_for(lambda: ex.worker_pids(), 10)
        mine = pool_cgroups() - before
        assert mine
        os.kill(ex.launcher_pid, signal.SIGKILL)  # nothing can clean up after SIGKILL
        with pytest.raises(BrokenProcessPool):
            running.result(timeout=30)
    finally:
        ex.shutdown()
    assert mine <= pool_cgroups()  # still there, empty: its owner is gone
    with NSPoolExecutor(1, memory_limit="64M") as ex2:
        assert not (mine & pool_cgroups())  # removed by the next pool's launcher
        ex2.submit(tasks_limits.allocate, 1).result(timeout=30)
    assert pool_cgroups() - before == set()


@live
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signalled_launcher_removes_its_cgroups(sig: int) -> None:
    with NSPoolExecutor(1, pids_limit=16) as ex:
        # Only this pool's (named after its launcher): another program's pools, a test run
        # beside this one, come and go meanwhile.
        def mine() -> set[str]:
            prefix = f"nspool-{ex.launcher_pid}-"
            return {c for c in pool_cgroups() if os.path.basename(c).startswith(prefix)}

        running = ex.submit(tasks_limits.wait_for_file, "/nonexistent", 60)
        assert wait_for(lambda: ex.worker_pids(), 10)
        assert mine()
        os.kill(ex.launcher_pid, sig)
        with pytest.raises(BrokenProcessPool):
            running.result(timeout=30)
        with pytest.raises(LauncherDiedError):
            ex.submit(tasks_limits.allocate, 1)
    assert mine() == set()
