"""End-to-end tests of the pool's guarantees (issue 2): nothing outlives the task, the pool or
the program; a dying worker fails only its own task."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Any

import pytest
import tasks
from _procs import alive, descendants, pool_processes, wait_for, wait_gone

from nspool import LauncherDiedError, NSPoolExecutor, WorkerDiedError

HERE = os.path.dirname(os.path.abspath(__file__))
OWNER = os.path.join(HERE, "programs", "owner.py")


@contextmanager
def _owner(mode: str, **popen: Any) -> Iterator[subprocess.Popen[str]]:
    """Run ``tests/programs/owner.py MODE``; on the way out kill it (a test may fail midway),
    then let Popen close its pipes and reap it."""
    with subprocess.Popen(
        [sys.executable, OWNER, mode], stdout=subprocess.PIPE, text=True, **popen
    ) as owner:
        try:
            yield owner
        finally:
            owner.kill()


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[1])


def _ns_pids(pid: int) -> list[int]:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return [int(x) for x in line.split()[1:]]
    return []


def test_each_worker_is_its_own_namespace_under_an_init() -> None:
    """Each worker is a PID namespace whose PID 1 is an init; the task runs in its only child,
    at the init's host PID (unique on the machine), not as PID 1."""
    with NSPoolExecutor(2) as ex:
        list(ex.map(tasks.square, range(100)))  # both workers up
        ns_pid, host = ex.submit(tasks.ns_pid_and_host_pid).result()
        ns_of = {p: os.readlink(f"/proc/{p}/ns/pid") for p in ex.worker_pids()}
        assert host in ns_of and len(set(ns_of.values())) == len(ns_of) == 2
        assert os.readlink("/proc/self/ns/pid") not in ns_of.values()
        for pid in ex.worker_pids():
            init = _parent(pid)
            assert _ns_pids(init)[-1] == 1
            assert os.readlink(f"/proc/{init}/ns/pid") == ns_of[pid]
            assert _ns_pids(pid)[-1] == init  # placed at the init's host PID
        assert ns_pid == _parent(host)


def test_guarantee1_shutdown_leaves_nothing_alive() -> None:
    """Daemons (double-forked, setsid'd, SIGTERM-ignoring) and 200 children are gone once
    shutdown(wait=True) returns, even with kill_leftovers=False."""
    ex = NSPoolExecutor(2, kill_leftovers=False)
    tree = ex.submit(tasks.spawn_tree, 200).result()
    daemon = ex.submit(tasks.spawn_daemon).result()
    pool_procs = set(pool_processes())
    assert len(tree) == 201
    assert set(tree) | {daemon} <= pool_procs
    assert all(alive(p) for p in tree + [daemon])
    ex.shutdown(wait=True)
    assert [p for p in pool_procs if alive(p)] == []
    assert pool_processes() == {}


def test_leftovers_are_killed_when_the_task_ends_by_default() -> None:
    with NSPoolExecutor(1) as ex:
        daemon = ex.submit(tasks.spawn_daemon).result()
        # The worker wiped its namespace before it sent the result.
        assert not alive(daemon)
        worker = ex.worker_pids()[0]
        assert descendants(worker) == {}


def test_kill_leftovers_false_keeps_a_daemon_until_the_worker_exits() -> None:
    with NSPoolExecutor(1, kill_leftovers=False) as ex:
        daemon = ex.submit(tasks.spawn_daemon).result()
        assert ex.submit(tasks.square, 2).result() == 4
        assert alive(daemon)
    assert not alive(daemon)


def test_guarantee2_kill_9_of_the_owner_leaves_nothing_within_2s() -> None:
    with _owner("hold", stdin=subprocess.PIPE) as owner:
        assert owner.stdout is not None
        info = json.loads(owner.stdout.readline())
        pids = [info["launcher"], *info["workers"], *info["tree"]]
        assert len(info["workers"]) == 2 and len(info["tree"]) == 201
        assert all(alive(p) for p in pids)
        owner.kill()
        owner.wait()
        assert wait_gone(pids, 2.0) == set()


def test_guarantee2_holds_when_a_forked_child_of_the_owner_lives_on() -> None:
    """A child forked from the owner inherits its fds; the pool must still die with the owner,
    not with the last process holding a copy of the control socket."""
    child = 0
    try:
        with _owner("forkchild", stdin=subprocess.PIPE) as owner:
            assert owner.stdout is not None
            info = json.loads(owner.stdout.readline())
            child = info["child"]
            pids = [info["launcher"], *info["workers"], info["daemon"]]
            assert all(alive(p) for p in pids)
            owner.kill()
            owner.wait()
            assert wait_gone(pids, 2.0) == set()
            assert alive(child)
    finally:
        if child:
            os.kill(child, signal.SIGKILL)
            wait_gone([child], 5.0)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
@pytest.mark.parametrize("target", ["launcher", "forkserver"])
def test_guarantee3_killing_the_launcher_kills_every_worker_and_descendant(
    sig: int, target: str
) -> None:
    ex = NSPoolExecutor(2, kill_leftovers=False)
    try:
        tree = ex.submit(tasks.spawn_tree, 20)
        running = ex.submit(tasks.sleep_forever)  # goes to the second worker
        tree.result()
        assert wait_for(lambda: len(ex.worker_pids()) == 2, 10)
        pool = set(descendants(ex.launcher_pid))
        assert len(pool) >= 1 + 2 + 21  # fork server, workers, the tree
        victim = ex.launcher_pid if target == "launcher" else ex._engine.launcher.forkserver_pid
        os.kill(victim, sig)
        with pytest.raises(LauncherDiedError):
            running.result(timeout=10)
        assert wait_gone(pool, 2.0) == set()
        with pytest.raises(BrokenProcessPool):
            ex.submit(tasks.square, 1)
    finally:
        ex.kill_workers()


@pytest.mark.parametrize(
    ("fn", "args", "expect"),
    [
        (tasks.segfault, (), "SIGSEGV"),
        (tasks.hard_exit, (3,), "exited with code 3"),
    ],
)
def test_guarantee4_a_dying_worker_fails_only_its_task(fn, args, expect) -> None:  # type: ignore[no-untyped-def]
    with NSPoolExecutor(2) as ex:
        before = [ex.submit(tasks.square, i) for i in range(50)]
        bad = ex.submit(fn, *args)
        after = [ex.submit(tasks.square, i) for i in range(50)]
        with pytest.raises(WorkerDiedError) as info:
            bad.result(timeout=30)
        assert isinstance(info.value, BrokenProcessPool)
        assert expect in str(info.value)
        assert [f.result(timeout=30) for f in before + after] == [i * i for i in range(50)] * 2
        assert ex.submit(tasks.square, 7).result() == 49


def test_guarantee4_sigkill_from_outside_fails_only_the_running_task() -> None:
    with NSPoolExecutor(2) as ex:
        victim_fut = ex.submit(tasks.sleep_forever)
        other = ex.submit(tasks.sleep_forever)
        assert wait_for(lambda: len(ex.worker_pids()) == 2, 10)
        # Find the worker running `victim_fut`: kill one and see which future fails.
        pids = ex.worker_pids()
        os.kill(pids[0], signal.SIGKILL)
        assert wait_for(lambda: victim_fut.done() or other.done(), 10)
        failed = victim_fut if victim_fut.done() else other
        survivor = other if failed is victim_fut else victim_fut
        exc = failed.exception()
        assert isinstance(exc, WorkerDiedError) and exc.signal == signal.SIGKILL
        assert "SIGKILL" in str(exc)
        assert not survivor.done()
        assert ex.submit(tasks.square, 3).result(timeout=30) == 9
        ex.kill_workers()
    assert isinstance(survivor.exception(), BrokenProcessPool)


def _memory_cgroup() -> str | None:
    """A fresh memory cgroup limited to 64 MiB (v2 or v1), or None where we cannot make one."""
    import tempfile

    for base, limit_file in (
        ("/sys/fs/cgroup", "memory.max"),
        ("/sys/fs/cgroup/unified", "memory.max"),
        ("/sys/fs/cgroup/memory", "memory.limit_in_bytes"),
    ):
        if not os.path.exists(os.path.join(base, "cgroup.procs")):
            continue
        try:
            path = tempfile.mkdtemp(prefix="nspool-oom-", dir=base)
        except OSError:
            continue
        try:
            with open(os.path.join(path, limit_file), "w") as f:
                f.write(str(64 * 1024 * 1024))
            if os.path.exists(os.path.join(path, "memory.swap.max")):
                with open(os.path.join(path, "memory.swap.max"), "w") as f:
                    f.write("0")
            return path
        except OSError:
            os.rmdir(path)
    return None


def test_guarantee4_an_oom_killed_worker_fails_only_its_task() -> None:
    cgroup = _memory_cgroup()
    if cgroup is None:
        pytest.skip("no writable memory cgroup here (needs root)")
    try:
        with NSPoolExecutor(2) as ex:
            others = [ex.submit(tasks.square, i) for i in range(20)]
            hog = ex.submit(tasks.exhaust_memory_in_cgroup, cgroup)
            with pytest.raises(WorkerDiedError) as info:
                hog.result(timeout=60)
            assert info.value.signal == signal.SIGKILL and "SIGKILL" in str(info.value)
            assert [f.result() for f in others] == [i * i for i in range(20)]
            assert ex.submit(tasks.square, 12).result() == 144
    finally:
        assert wait_for(lambda: _rmdir_ok(cgroup), 10)


def _rmdir_ok(path: str) -> bool:
    try:
        os.rmdir(path)
    except OSError:
        return False
    return True


def test_queued_tasks_of_a_dead_worker_are_not_lost() -> None:
    """Fast tasks are batched several to a worker; a crash must requeue the unstarted ones."""
    with NSPoolExecutor(1) as ex:
        # Warm up the batching estimate with many fast tasks.
        assert sum(ex.map(tasks.square, range(2000))) == sum(i * i for i in range(2000))
        fs = [ex.submit(tasks.square, i) for i in range(300)]
        bad = ex.submit(tasks.hard_exit, 9)
        fs += [ex.submit(tasks.square, i) for i in range(300, 600)]
        assert [f.result(timeout=30) for f in fs] == [i * i for i in range(600)]
        assert isinstance(bad.exception(), WorkerDiedError)


def test_guarantee5_executor_created_in_a_thread_that_exits_keeps_working() -> None:
    box: list[NSPoolExecutor] = []
    t = threading.Thread(target=lambda: box.append(NSPoolExecutor(2)))
    t.start()
    t.join()
    ex = box[0]
    with ex:
        assert list(ex.map(tasks.square, range(10))) == [i * i for i in range(10)]
        daemon = ex.submit(tasks.spawn_daemon).result()
    assert not alive(daemon)


def test_works_inside_a_daemonic_multiprocessing_process() -> None:
    out = subprocess.run(
        [sys.executable, OWNER, "daemonic"], capture_output=True, text=True, timeout=120
    )
    lines = [json.loads(x) for x in out.stdout.splitlines()]
    assert lines == [{"result": [0, 1, 4, 9, 16]}, {"exitcode": 0}], out.stderr


def test_task_output_reaches_the_programs_stdout_and_stderr() -> None:
    out = subprocess.run(
        [sys.executable, OWNER, "print"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "hello from a task" in out.stdout
    assert "hello from a task" in out.stderr


def test_interpreter_exit_without_shutdown_finishes_work_and_leaves_nothing() -> None:
    out = subprocess.run(
        [sys.executable, OWNER, "noshutdown"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout.splitlines()[0])
    assert "finished at exit" in out.stdout
    assert not alive(info["launcher"])


@pytest.mark.parametrize("mode", ["ctrlc", "ctrlc-bare"])
def test_one_ctrl_c_stops_everything_cleanly(mode: str) -> None:
    # Its own process group, like a terminal's foreground job.
    with _owner(mode, stderr=subprocess.PIPE, start_new_session=True) as owner:
        assert owner.stdout is not None and owner.stderr is not None
        info = json.loads(owner.stdout.readline())
        pool = set(descendants(info["launcher"])) | {info["launcher"]}
        assert len(pool) >= 4
        os.killpg(owner.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        err = owner.stderr.read()
        code = owner.wait(timeout=30)
        assert code != 0
        assert err.count("Traceback") == 1, err
        assert "KeyboardInterrupt" in err
        assert wait_gone(pool, 2.0) == set()


def test_zombies_do_not_accumulate_across_tasks() -> None:
    with NSPoolExecutor(1, kill_leftovers=False) as ex:
        for _ in range(5):
            worker = ex.submit(tasks.leave_orphan_zombie).result()
        # The task's own zombie child was reaped when it ended, its orphans by the init.
        assert ex.submit(tasks.children_states).result() == []
        assert "Z" not in descendants(_parent(worker)).values()


def test_subprocess_in_a_task_keeps_its_exit_code() -> None:
    with NSPoolExecutor(1) as ex:
        assert ex.submit(tasks.subprocess_exit_code, 7).result() == 7
        assert ex.submit(tasks.subprocess_exit_code, 0).result() == 0


def test_future_is_a_stdlib_future() -> None:
    with NSPoolExecutor(1) as ex:
        f = ex.submit(tasks.square, 5)
        assert isinstance(f, Future)
        assert f.result() == 25
