"""The concurrent.futures API of NSPoolExecutor and its handling of bad input."""

from __future__ import annotations

import os
import pickle
import threading
import time
from concurrent.futures import CancelledError, Future, TimeoutError, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import pytest
import tasks

from nspool import (
    LauncherDiedError,
    NSPoolExecutor,
    PoolInitializerError,
    TaskPicklingError,
    TaskUnpicklingError,
    WorkerDiedError,
)
from nspool.errors import RemoteTraceback


@pytest.fixture(scope="module")
def ex():  # type: ignore[no-untyped-def]
    # One pool for the read-only API tests of this module; the leak check runs per test, so
    # the module fixture is built before the first test records its baseline.
    pool = NSPoolExecutor(2)
    yield pool
    pool.shutdown()


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """Overrides the per-test leak check: the shared pool lives across tests here; the
    module's last test checks that nothing is left once it is shut down."""
    yield


def test_lambdas_closures_and_main_functions_travel_by_value(ex: NSPoolExecutor) -> None:
    k = 10
    assert ex.submit(lambda x: x + k, 5).result() == 15

    def inner(a: int, *, b: int) -> int:
        return a * b

    assert ex.submit(inner, 3, b=4).result() == 12


def test_results_that_only_cloudpickle_can_carry(ex: NSPoolExecutor) -> None:
    def make() -> object:
        class Local:
            def __init__(self) -> None:
                self.v = 3

        return Local(), (lambda: 5)

    obj, fn = ex.submit(make).result()
    assert obj.v == 3 and fn() == 5


def test_map_orders_results_and_supports_chunksize(ex: NSPoolExecutor) -> None:
    expected = [i * i for i in range(100)]
    assert list(ex.map(tasks.square, range(100))) == expected
    assert list(ex.map(tasks.square, range(100), chunksize=7)) == expected
    assert list(ex.map(pow, range(10), range(10))) == [pow(i, i) for i in range(10)]
    with pytest.raises(ValueError):
        ex.map(tasks.square, range(3), chunksize=0)


def test_map_timeout_raises_timeouterror(ex: NSPoolExecutor) -> None:
    it = ex.map(time.sleep, [5], timeout=0.2)
    with pytest.raises(TimeoutError):
        next(it)


def test_map_buffersize_bounds_submission(ex: NSPoolExecutor) -> None:
    consumed = []

    def source():  # type: ignore[no-untyped-def]
        for i in range(20):
            consumed.append(i)
            yield i

    it = ex.map(tasks.square, source(), buffersize=3)
    assert len(consumed) == 3
    assert next(it) == 0
    assert len(consumed) == 4
    assert list(it) == [i * i for i in range(1, 20)]
    with pytest.raises(ValueError):
        ex.map(tasks.square, [], buffersize=0)
    with pytest.raises(TypeError):
        ex.map(tasks.square, [], buffersize=1.5)  # type: ignore[arg-type]


def test_task_exception_carries_the_remote_traceback(ex: NSPoolExecutor) -> None:
    with pytest.raises(ValueError, match="boom") as info:
        ex.submit(tasks.raise_value_error, "boom").result()
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "raise_value_error" in str(cause) and "tasks.py" in str(cause)


def test_unpicklable_argument_fails_only_that_future(ex: NSPoolExecutor) -> None:
    f = ex.submit(tasks.echo, threading.Lock())
    exc = f.exception()
    assert isinstance(exc, TaskPicklingError) and isinstance(exc, pickle.PicklingError)
    assert "argument 0" in str(exc) and "lock" in str(exc)
    assert ex.submit(tasks.square, 4).result() == 16


def test_unpicklable_function_and_keyword_are_named(ex: NSPoolExecutor) -> None:
    lock = threading.Lock()
    exc = ex.submit(lambda: lock).exception()
    assert isinstance(exc, TaskPicklingError) and "the function" in str(exc)
    exc = ex.submit(tasks.echo, x=lock).exception()
    assert isinstance(exc, TaskPicklingError) and "keyword argument 'x'" in str(exc)


def test_unpicklable_result_fails_only_that_future(ex: NSPoolExecutor) -> None:
    exc = ex.submit(tasks.return_unpicklable).exception()
    assert isinstance(exc, TaskPicklingError)
    assert "result" in str(exc) and "Unpicklable refuses" in str(exc)
    assert ex.submit(tasks.square, 5).result() == 25


def test_exception_that_cannot_be_pickled(ex: NSPoolExecutor) -> None:
    exc = ex.submit(tasks.raise_unpicklable_error).exception()
    assert isinstance(exc, TaskPicklingError)
    assert "UnpicklableError" in str(exc) and "could not be pickled" in str(exc)
    assert "raise_unpicklable_error" in str(exc.__cause__)


def test_exception_that_cannot_be_unpickled(ex: NSPoolExecutor) -> None:
    exc = ex.submit(tasks.raise_not_unpicklable).exception()
    assert isinstance(exc, TaskUnpicklingError)
    assert "could not be unpickled" in str(exc)
    assert ex.submit(tasks.square, 6).result() == 36


def test_a_forked_child_returning_from_a_task_does_not_answer(ex: NSPoolExecutor) -> None:
    assert [ex.submit(tasks.fork_and_return_in_child).result() for _ in range(3)] == ["parent"] * 3
    assert ex.submit(tasks.square, 3).result() == 9


def test_sys_exit_in_a_task_fails_only_its_future(ex: NSPoolExecutor) -> None:
    exc = ex.submit(tasks.call_sys_exit, 4).exception()
    assert isinstance(exc, SystemExit) and exc.code == 4
    assert ex.submit(tasks.square, 2).result() == 4


def test_submit_is_safe_from_many_threads(ex: NSPoolExecutor) -> None:
    results: list[list[int]] = []

    def client(base: int) -> None:
        fs = [ex.submit(tasks.square, base + i) for i in range(200)]
        results.append([f.result() for f in fs])

    threads = [threading.Thread(target=client, args=(k * 1000,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(map(sum, results)) == sorted(
        sum((k * 1000 + i) ** 2 for i in range(200)) for k in range(4)
    )


def test_big_payloads_both_ways(ex: NSPoolExecutor) -> None:
    size = 256 * 1024 * 1024
    data = bytes(range(256)) * (size // 256)
    out = ex.submit(tasks.echo, data).result(timeout=120)
    assert len(out) == size and out[:512] == data[:512] and out[-512:] == data[-512:]
    del data, out


def test_a_finished_call_keeps_nothing_alive(ex: NSPoolExecutor) -> None:
    """No future <-> task cycle: a call's pickled arguments are freed when it finishes, not
    when the garbage collector happens to run."""
    import gc

    gc.disable()
    try:
        f = ex.submit(tasks.echo, b"x" * 1000)
        assert f.result() == b"x" * 1000
        assert f._nspool is not None and f._nspool[1]() is None
    finally:
        gc.enable()


def test_zz_module_pool_leaves_nothing(ex: NSPoolExecutor) -> None:
    from _procs import descendants, pool_processes, shared_launcher_pids

    launcher = ex.launcher_pid
    assert pool_processes()
    ex.shutdown()
    assert pool_processes() == {}
    # The program's shared launcher stays for the next pool, with nothing under it.
    assert (
        launcher in shared_launcher_pids()
        and not descendants(launcher).keys() - shared_launcher_pids()
    )


# -- tests with a pool of their own -----------------------------------------------------------


def test_cancel_futures_and_queued_cancel() -> None:
    with NSPoolExecutor(1) as pool:
        from _procs import wait_for

        gate = pool.submit(time.sleep, 0.5)
        assert wait_for(gate.running, 10)
        queued = [pool.submit(tasks.square, i) for i in range(5)]
        assert queued[0].cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        assert gate.result() is None
        assert all(f.cancelled() for f in queued)


def test_shutdown_waits_for_pending_and_then_refuses_work() -> None:
    pool = NSPoolExecutor(2)
    fs = [pool.submit(time.sleep, 0.05) for _ in range(6)]
    pool.shutdown(wait=True)
    assert all(f.done() and f.exception() is None for f in fs)
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(tasks.square, 1)
    pool.shutdown()  # idempotent


def test_shutdown_without_wait_still_finishes_tasks() -> None:
    pool = NSPoolExecutor(1)
    f = pool.submit(tasks.square, 9)
    pool.shutdown(wait=False)
    assert f.result(timeout=30) == 81


@pytest.mark.parametrize("method", ["terminate_workers", "kill_workers"])
def test_terminate_and_kill_workers(method: str) -> None:
    pool = NSPoolExecutor(1)
    running = pool.submit(tasks.sleep_forever)
    queued = pool.submit(tasks.square, 3)
    from _procs import wait_for

    assert wait_for(lambda: bool(pool.worker_pids()), 10)
    getattr(pool, method)()
    assert isinstance(running.exception(timeout=10), WorkerDiedError)
    assert queued.cancelled()
    with pytest.raises(RuntimeError):
        pool.submit(tasks.square, 1)


@pytest.mark.parametrize("method", ["terminate_workers", "kill_workers"])
def test_stopping_the_workers_does_not_wait_for_a_task_that_ignores_sigterm(
    method: str, tmp_path: Path
) -> None:
    """A task that ignores and blocks SIGTERM cannot keep terminate_workers() (or the pool's
    shutdown) waiting, nor win with its result: the call returns at once with the future
    failed, and the worker is killed whole once the grace is over (the old code waited until
    the task finished by itself, and gave its future the result)."""
    import tasks_containment
    from _procs import alive, wait_for

    started = tmp_path / "started"
    pool = NSPoolExecutor(1)
    try:
        f = pool.submit(tasks_containment.ignore_sigterm_then_sleep, str(started), 60)
        assert wait_for(started.exists, 30)
        pids = pool.worker_pids()
        begun = time.monotonic()
        getattr(pool, method)()  # terminate_workers: SIGTERM, and SIGKILL 2 s later
        assert time.monotonic() - begun < 5, f"{method}() waited for the task"
        assert f.done(), "the running task's future was not failed at once"
        exc = f.exception()
        assert isinstance(exc, WorkerDiedError) and method in str(exc), exc
        # Its worker is gone within the grace (not after the task's 60 s).
        assert wait_for(lambda: not any(alive(p) for p in pids), 20), "the worker lived on"
    finally:
        pool.shutdown(wait=True)
    assert f.exception() is exc  # nothing came later to change it


def test_initializer_runs_in_every_worker() -> None:
    with NSPoolExecutor(2, initializer=tasks.init_store, initargs=("hi",)) as pool:
        assert pool.submit(tasks.read_store).result() == ["hi"]


def test_failing_initializer_breaks_the_pool_with_a_clear_error() -> None:
    pool = NSPoolExecutor(1, initializer=tasks.init_fail)
    f = pool.submit(tasks.square, 1)
    exc = f.exception(timeout=30)
    assert isinstance(exc, PoolInitializerError) and isinstance(exc, BrokenProcessPool)
    assert "initializer exploded" in str(exc)
    with pytest.raises(BrokenProcessPool):
        pool.submit(tasks.square, 1)
    pool.shutdown()


def test_max_tasks_per_child_replaces_workers() -> None:
    with NSPoolExecutor(1, max_tasks_per_child=3) as pool:
        pids = [pool.submit(tasks.host_pid).result() for _ in range(9)]
        assert [len(set(pids[i : i + 3])) for i in (0, 3, 6)] == [1, 1, 1]
        assert len(set(pids)) == 3
        assert list(pool.map(tasks.square, range(50))) == [i * i for i in range(50)]


def test_preload_imports_modules_in_the_launcher() -> None:
    names = ["email.mime.text", "xml.dom.minidom"]
    with NSPoolExecutor(1, preload=names) as pool:
        assert pool.submit(tasks.modules_loaded, names).result() == dict.fromkeys(names, True)
    with NSPoolExecutor(1) as pool:
        assert pool.submit(tasks.modules_loaded, ["xml.dom.minidom"]).result() == {
            "xml.dom.minidom": False
        }


def test_preload_of_a_missing_module_fails_the_constructor() -> None:
    with pytest.raises(BrokenProcessPool, match="no_such_module_xyz"):
        NSPoolExecutor(1, preload=["no_such_module_xyz"])


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError):
        NSPoolExecutor(0)
    with pytest.raises(ValueError):
        NSPoolExecutor(1, max_tasks_per_child=0)
    with pytest.raises(TypeError):
        NSPoolExecutor(1, initializer=42)  # type: ignore[arg-type]


def test_max_workers_defaults_like_the_stdlib() -> None:
    with NSPoolExecutor() as pool:
        expected = getattr(os, "process_cpu_count", os.cpu_count)()
        assert pool._max_workers == expected
        assert pool.submit(tasks.square, 2).result() == 4


def test_done_callback_may_submit_more_work() -> None:
    with NSPoolExecutor(1) as pool:
        second: list = []
        first = pool.submit(tasks.square, 2)
        first.add_done_callback(lambda f: second.append(pool.submit(tasks.square, f.result())))
        first.result()
        from _procs import wait_for

        assert wait_for(lambda: bool(second), 10)
        assert second[0].result() == 16


def test_cancelled_future_result_raises() -> None:
    with NSPoolExecutor(1) as pool:
        gate = pool.submit(time.sleep, 0.3)
        f = pool.submit(tasks.square, 2)
        f.cancel()
        with pytest.raises(CancelledError):
            f.result()
        wait([gate])


# -- hard cancel and deadlines ----------------------------------------------------------------


def test_future_kill_stops_a_running_task_and_its_tree(tmp_path: Path) -> None:
    from _procs import descendants, wait_for, wait_gone

    started = tmp_path / "started"
    with NSPoolExecutor(2, kill_leftovers=False) as pool:
        tree = pool.submit(tasks.spawn_tree, 5).result()
        victim = pool.submit(tasks.touch_then_sleep_forever, str(started))
        # Started in the worker, not only sent (what running() says): a task killed before
        # it starts is skipped, and the earlier task's tree (kill_leftovers=False) lives on.
        assert wait_for(started.exists, 10)
        assert wait_for(lambda: len(pool.worker_pids()) >= 1, 10)
        tree_before = set(descendants())
        assert set(tree) <= tree_before
        assert victim.kill() is True
        with pytest.raises(CancelledError):
            victim.result(timeout=1)
        assert wait_gone(tree, 1.0) == set()
        assert pool.submit(tasks.square, 8).result(timeout=30) == 64
        assert victim.kill() is False  # already done


def test_future_kill_of_a_queued_task_cancels_it() -> None:
    with NSPoolExecutor(1) as pool:
        gate = pool.submit(time.sleep, 0.3)
        queued = pool.submit(tasks.square, 2)
        assert queued.kill() is True
        assert queued.cancelled()
        assert gate.result() is None


def test_task_timeout_kills_the_task_tree_and_the_pool_keeps_serving(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from _procs import alive, wait_for, wait_gone

    from nspool import TaskTimeoutError

    pid_file = str(tmp_path / "daemon.pid")
    with NSPoolExecutor(2) as pool:
        slow = pool.schedule(tasks.spawn_daemon_then_sleep, (pid_file, 60), timeout=1.0)
        fast = pool.schedule(tasks.square, (3,), timeout=5)
        assert wait_for(lambda: os.path.exists(pid_file), 10)
        with open(pid_file) as f:
            daemon = int(f.read())
        assert alive(daemon)
        exc = slow.exception(timeout=10)
        assert isinstance(exc, TaskTimeoutError) and isinstance(exc, TimeoutError)
        assert "1 s deadline" in str(exc)
        assert wait_gone([daemon], 1.0) == set()
        assert fast.result() == 9
        assert pool.submit(tasks.square, 4).result() == 16


def test_executor_wide_task_timeout() -> None:
    from nspool import TaskTimeoutError

    with pytest.raises(ValueError):
        NSPoolExecutor(1, task_timeout=0)
    with NSPoolExecutor(1, task_timeout=0.2) as pool:
        assert isinstance(pool.submit(time.sleep, 30).exception(timeout=10), TaskTimeoutError)
        assert pool.submit(tasks.square, 5).result() == 25


def test_schedule_keeps_the_pools_task_timeout_unless_it_names_its_own() -> None:
    """The pool's deadline holds for every task: schedule() without ``timeout=`` too. A
    ``timeout`` of its own replaces it for that task; ``timeout=None`` means none."""
    from nspool import TaskTimeoutError

    with NSPoolExecutor(2, task_timeout=0.3) as pool:
        late = pool.schedule(time.sleep, (30,))
        exc = late.exception(timeout=10)
        assert isinstance(exc, TaskTimeoutError) and "0.3 s deadline" in str(exc)
        shorter = pool.schedule(time.sleep, (30,), timeout=0.1)
        assert "0.1 s deadline" in str(shorter.exception(timeout=10))
        free = pool.schedule(tasks.sleep_then_square, (0.6, 3), timeout=None)
        assert free.result(timeout=10) == 9  # twice the pool's deadline, and not killed
        with pytest.raises(ValueError):
            pool.schedule(tasks.square, (1,), timeout=0)


def test_a_killed_task_queued_behind_another_in_a_worker_never_blocks_the_rest() -> None:
    """With fast tasks, several wait in one worker's pipe; killing one of them stops it when
    it starts and the tasks behind it still complete."""
    with NSPoolExecutor(1) as pool:
        assert sum(pool.map(tasks.square, range(3000))) > 0  # fast: batching is on
        fs = [pool.submit(tasks.square, i) for i in range(200)]
        victim = pool.submit(tasks.sleep_forever)
        rest = [pool.submit(tasks.square, i) for i in range(200)]
        victim.kill()
        assert [f.result(timeout=30) for f in fs + rest] == [i * i for i in range(200)] * 2
        with pytest.raises(CancelledError):
            victim.result(timeout=10)


# -- private /proc and ownership --------------------------------------------------------------


def test_private_proc_shows_only_the_workers_own_tree() -> None:
    with NSPoolExecutor(1, private_proc=True) as pool:
        alone, with_child = pool.submit(tasks.proc_view).result()
        assert len(alone) == 2 and alone[0] == 1  # the init, and the task itself
        assert len(with_child) == 3 and with_child[:2] == alone
        assert len(pool.worker_pids()) == 1 and pool.worker_pids()[0] != 1  # host PID known
    with NSPoolExecutor(1) as pool:
        alone, _ = pool.submit(tasks.proc_view).result()
        assert len(alone) > 1  # without the option, the host /proc shows


def test_files_a_task_writes_belong_to_the_caller(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "out")
    with NSPoolExecutor(1) as pool:
        pool.submit(tasks.write_file, path).result()
    st = os.stat(path)
    assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())


def test_max_batch_1_never_queues_a_task_behind_another_in_a_worker() -> None:
    with pytest.raises(ValueError):
        NSPoolExecutor(1, max_batch=0)
    with NSPoolExecutor(1, max_batch=1) as pool:
        assert sum(pool.map(tasks.square, range(2000))) == sum(i * i for i in range(2000))
        core = pool._engine.core
        assert core.depth() == 1 and core.max_batch == 1
        fs = [pool.submit(tasks.square, i) for i in range(50)]
        with pool._engine.lock:
            assert all(len(w.inflight) <= 1 for w in core.workers.values())
        assert [f.result() for f in fs] == [i * i for i in range(50)]


def test_shutdown_request_while_the_pool_lock_is_held_does_not_deadlock() -> None:
    """The GC may finalize an executor in the I/O thread while it holds the pool's lock."""
    pool = NSPoolExecutor(1)
    engine = pool._engine
    assert pool.submit(tasks.square, 2).result() == 4

    def finalize_under_lock() -> None:
        with engine.lock:
            engine.request_shutdown()

    t = threading.Thread(target=finalize_under_lock)
    t.start()
    t.join(10)
    assert not t.is_alive()
    engine.join()
    with pytest.raises(RuntimeError):
        pool.submit(tasks.square, 1)


def _pending_then_a_bug(pool: NSPoolExecutor) -> list[Future[object]]:
    """A running task and five queued ones; then every frame read fails with a bug."""
    assert pool.submit(tasks.square, 3).result() == 9
    pending: list[Future[object]] = [pool.submit(time.sleep, 0.5)]
    pending += [pool.submit(tasks.square, i) for i in range(5)]

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("injected bug")

    pool._engine._on_frame = broken  # type: ignore[method-assign]
    return pending


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_bug_in_the_io_thread_fails_every_pending_future_and_says_so() -> None:
    """If the I/O thread dies of a bug, every pending future fails at once with an error that
    names the I/O thread (not "launcher died"), and submit() raises the same."""
    caught: list[BaseException | None] = []
    old_hook = threading.excepthook
    threading.excepthook = lambda args: caught.append(args.exc_value)
    try:
        with NSPoolExecutor(1) as pool:
            pending = _pending_then_a_bug(pool)
            # wait(), not result(): a thread in result() reads its result itself (next test)
            assert not wait(pending, timeout=30).not_done
            for f in pending:
                exc = f.exception(timeout=0)
                assert isinstance(exc, BrokenProcessPool), exc
                assert "I/O thread failed" in str(exc) and "injected bug" in str(exc)
                assert not isinstance(exc, LauncherDiedError)
            with pytest.raises(BrokenProcessPool, match="I/O thread failed"):
                pool.submit(tasks.square, 1)
    finally:
        threading.excepthook = old_hook
    assert [type(e) for e in caught] == [RuntimeError]


def test_a_bug_while_a_waiting_thread_reads_fails_every_pending_future_and_says_so(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """The same bug met by a thread that reads its own result in result(): that thread gets
    BrokenProcessPool like every other pending future, and the traceback is printed."""
    with NSPoolExecutor(1) as pool:
        for f in _pending_then_a_bug(pool):
            exc = f.exception(timeout=30)
            assert isinstance(exc, BrokenProcessPool), exc
            assert "failed in a thread waiting for a result" in str(exc)
            assert "injected bug" in str(exc)
        with pytest.raises(BrokenProcessPool, match="injected bug"):
            pool.submit(tasks.square, 1)
    assert "RuntimeError: injected bug" in capfd.readouterr().err


def test_shutdown_while_the_io_thread_ends_leaves_its_closed_wake_pipe_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A shutdown request that lands after the I/O thread closed its wake-up pipe but before
    the thread ended must not write to that fd: EBADF (seen in CI), or worse, a byte into
    whatever file took its number meanwhile. The I/O thread is held at that point here."""
    import nspool._core.io_thread as io_thread

    at_the_end = threading.Event()
    go_on = threading.Event()
    real_complete = io_thread._complete

    with NSPoolExecutor(1) as pool:
        assert pool.submit(tasks.square, 2).result(timeout=30) == 4
        engine = pool._engine

        def held_complete(done: list[Any]) -> None:
            real_complete(done)
            if threading.current_thread() is engine.thread and engine.launcher.closed:
                at_the_end.set()  # the I/O thread's very last step: its pipes are closed
                go_on.wait(10)

        monkeypatch.setattr(io_thread, "_complete", held_complete)
        pool.shutdown(wait=False)
        assert at_the_end.wait(10)
        try:
            engine.request_shutdown()  # the thread is alive, its wake-up pipe closed
        finally:
            go_on.set()
