"""Drop-in behaviours of ``ProcessPoolExecutor`` that nspool must keep: manager proxies as
arguments, no lingering references to results, pickling errors that keep their type, the
stdlib's ``cancel_futures`` semantics, forking while the pool is busy, hundreds of workers,
and no batching trap after a warm-up."""

from __future__ import annotations

import asyncio
import gc
import json
import multiprocessing
import os
import pickle
import random
import resource
import signal
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future, as_completed
from concurrent.futures.process import BrokenProcessPool, _RemoteTraceback
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import tasks_dropin
from _procs import wait_for

import nspool
from nspool import NSPoolExecutor, TaskPicklingError, TaskUnpicklingError, open_pool

HERE = os.path.dirname(os.path.abspath(__file__))
#: the folder nspool was imported from, so that programs run here import the same nspool
NSPOOL_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(nspool.__file__)))


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _run_program(
    source: str, timeout: float = 60, preexec_fn: Callable[[], None] | None = None
) -> tuple[int, str, str]:
    """Run ``source`` with this Python in a session of its own (so that whatever it forks can
    be killed with it); return (exit status, stdout, stderr). Nothing it started is left."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([NSPOOL_ROOT, HERE])
    proc = subprocess.Popen(
        [sys.executable, "-c", source],
        cwd=NSPOOL_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=preexec_fn,
    )
    try:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate(timeout=30)
            pytest.fail(f"the program ran past {timeout} s:\n{out}\n{err}")
        return proc.returncode, out, err
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # a child it left behind (on a failure)
        except ProcessLookupError:
            pass
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def _last_json(out: str) -> dict[str, Any]:
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, f"the program printed no report: {out!r}"
    report: dict[str, Any] = json.loads(lines[-1])
    return report


# -- 1. multiprocessing.Manager() proxies -------------------------------------------------------


@contextmanager
def _queue_and_dict_proxies() -> Iterator[tuple[Any, Any]]:
    """A Manager() queue and dict; on the way out the manager is shut down and freed (its
    process's pipes closed)."""
    from multiprocessing import resource_tracker

    tracker: Any = resource_tracker._resource_tracker  # type: ignore[attr-defined]
    had_tracker = tracker._pid is not None
    # spawn: forking this (multi-threaded) test process for the manager could deadlock it
    manager = multiprocessing.get_context("spawn").Manager()
    try:
        yield manager.Queue(), manager.dict()
    finally:
        manager.shutdown()
        del manager
        gc.collect()  # the proxies' finalizers close their connections to the manager
        if not had_tracker:
            tracker._stop()  # spawn started multiprocessing's resource tracker: ours to stop


def test_manager_proxies_work_as_task_arguments() -> None:
    """A Manager() Queue and dict passed to tasks work in the workers (they hold the program's
    multiprocessing authkey) and the program sees what the tasks put in them."""
    with _queue_and_dict_proxies() as (q, d):
        try:
            with NSPoolExecutor(2) as ex:
                fs = [ex.submit(tasks_dropin.fill_proxies, q, d, i) for i in range(3)]
                assert [f.result(timeout=30) for f in fs] == [0, 1, 2]
            assert sorted(q.get(timeout=5) for _ in range(3)) == [0, 1, 2]
            assert dict(d) == {0: 0, 1: 10, 2: 20}
        finally:
            del q, d  # a failure's traceback must not keep the manager (and its pipes) alive


@pytest.mark.anyio
async def test_manager_proxies_work_with_open_pool() -> None:
    """The same with the async front: pool.run(fn, queue_proxy, dict_proxy, x) works."""
    with _queue_and_dict_proxies() as (q, d):
        try:
            async with open_pool(max_workers=2) as pool:
                outcome: object
                try:
                    outcome = await pool.run(tasks_dropin.fill_proxies, q, d, 7)
                except Exception as exc:  # noqa: BLE001
                    # Kept as text: the traceback would keep the proxies (pool.run's args),
                    # hence the manager and its pipes, alive past the test.
                    outcome = repr(exc)
                assert outcome == 7
            assert q.get(timeout=5) == 7
            assert dict(d) == {7: 70}
        finally:
            del q, d


# -- 2. no lingering references to results ------------------------------------------------------


@pytest.mark.parametrize("chunksize", [1, 3])
def test_map_frees_each_result_once_dropped(chunksize: int) -> None:
    """Like CPython's test_free_reference: an object map() yielded is gone as soon as the
    caller drops it (map's generator keeps no reference to the last result or chunk)."""
    with NSPoolExecutor(2) as ex:
        n = 0
        for obj in ex.map(tasks_dropin.make_obj, range(10), chunksize=chunksize, timeout=30):
            assert isinstance(obj, tasks_dropin.Obj)
            wr = weakref.ref(obj)
            del obj
            gc.collect()
            assert wr() is None, f"result {n} is still referenced: {gc.get_referrers(wr())}"
            n += 1
        assert n == 10


def test_idle_pool_does_not_keep_the_last_result_alive() -> None:
    """Once the caller drops a future and its result, nothing in the pool (its I/O thread's
    last batch of completions) keeps the result alive while the pool sits idle."""
    with NSPoolExecutor(1) as ex:
        fut = ex.submit(tasks_dropin.make_obj)
        obj = fut.result(timeout=30)
        assert isinstance(obj, tasks_dropin.Obj)
        wr = weakref.ref(obj)
        del fut, obj

        def freed() -> bool:
            gc.collect()
            return wr() is None

        assert wait_for(freed, 5.0), "the idle pool keeps the last result alive"


# -- 3. pickling errors keep their type ---------------------------------------------------------


def test_unpicklable_argument_error_is_also_the_original_type() -> None:
    """An argument that pickling refuses with TypeError (a lock) fails the future with a
    TaskPicklingError that is also a TypeError, names "argument 0" and has the TypeError as
    __cause__; one refused with PicklingError stays a PicklingError."""
    with NSPoolExecutor(1) as ex:
        exc = ex.submit(tasks_dropin.echo, threading.Lock()).exception(timeout=30)
        assert isinstance(exc, TaskPicklingError)
        assert isinstance(exc, TypeError), f"not a TypeError: {type(exc).__mro__}"
        assert "argument 0" in str(exc)
        assert type(exc.__cause__) is TypeError

        exc = ex.submit(tasks_dropin.echo, tasks_dropin.ReduceRaisesPicklingError()).exception(
            timeout=30
        )
        assert isinstance(exc, TaskPicklingError)
        assert isinstance(exc, pickle.PicklingError)
        assert "argument 0" in str(exc)
        assert ex.submit(tasks_dropin.echo, 5).result(timeout=30) == 5


def test_unpicklable_result_error_is_also_a_type_error() -> None:
    """A task that returns a lock (made in the worker) fails with a TaskPicklingError that is
    also a TypeError and says it was the result."""
    with NSPoolExecutor(1) as ex:
        exc = ex.submit(tasks_dropin.return_lock).exception(timeout=30)
        assert isinstance(exc, TaskPicklingError)
        assert isinstance(exc, TypeError), f"not a TypeError: {type(exc).__mro__}"
        assert "result" in str(exc)
        assert ex.submit(tasks_dropin.echo, 1).result(timeout=30) == 1


def test_system_exit_while_pickling_the_result_is_that_system_exit() -> None:
    """A result whose __reduce__ raises SystemExit(3) in the worker fails the future with
    exactly SystemExit (code 3), as in the stdlib, and the pool keeps serving."""
    with NSPoolExecutor(1) as ex:
        exc = ex.submit(tasks_dropin.return_exit_on_reduce).exception(timeout=30)
        assert type(exc) is SystemExit, f"got {type(exc).__name__}: {exc}"
        assert exc.code == 3
        assert ex.submit(tasks_dropin.echo, 2).result(timeout=30) == 2


@pytest.mark.anyio
async def test_async_unpicklable_argument_is_caught_by_except_type_error() -> None:
    """``except TypeError`` catches an unpicklable argument with the async front too."""
    async with open_pool(max_workers=1) as pool:
        try:
            await pool.run(tasks_dropin.echo, threading.Lock())
        except TypeError as exc:
            assert isinstance(exc, TaskPicklingError)
            assert "argument 0" in str(exc)
        else:
            pytest.fail("an unpicklable argument did not raise")
        assert await pool.run(tasks_dropin.echo, 3) == 3


def test_argument_that_cannot_be_unpickled_in_the_worker() -> None:
    """An argument whose unpickling raises in the worker fails its future with
    TaskUnpicklingError, which is also a BrokenProcessPool (what the stdlib raises) and an
    UnpicklingError; the pool keeps serving."""
    with NSPoolExecutor(1) as ex:
        exc = ex.submit(tasks_dropin.echo, tasks_dropin.FailsOnLoad()).exception(timeout=30)
        assert isinstance(exc, TaskUnpicklingError), f"got {type(exc).__name__}: {exc}"
        assert isinstance(exc, BrokenProcessPool)
        assert isinstance(exc, pickle.UnpicklingError)
        assert ex.submit(tasks_dropin.echo, 4).result(timeout=30) == 4


def test_task_exception_cause_is_the_stdlib_remote_traceback() -> None:
    """A task's exception has as __cause__ the stdlib's own _RemoteTraceback (code written for
    ProcessPoolExecutor may test for it), whose .tb shows the line that raised."""
    with NSPoolExecutor(1) as ex:
        exc = ex.submit(tasks_dropin.raise_with_marker).exception(timeout=30)
        assert isinstance(exc, ValueError)
        cause = exc.__cause__
        assert type(cause) is _RemoteTraceback, f"__cause__ is {type(cause)}"
        assert "MARKER-LINE-7f3a" in cause.tb


# -- 4. shutdown(cancel_futures=True) -----------------------------------------------------------


def test_cancel_futures_lets_the_first_tasks_finish() -> None:
    """Like CPython's test_cancel_futures: shutdown(cancel_futures=True) right after 50
    submits cancels most of them but not the ones already handed out; every future is done."""
    ex = NSPoolExecutor(max_workers=5)
    fs: list[Future[None]] = []
    try:
        fs = [ex.submit(tasks_dropin.sleep_a_tenth) for _ in range(50)]
        ex.shutdown(cancel_futures=True)
    finally:
        ex.shutdown(wait=True)
    cancelled = [f for f in fs if f.cancelled()]
    assert len(cancelled) > 20
    assert any(f.done() and not f.cancelled() and f.exception() is None for f in fs), (
        "every task was cancelled"
    )
    assert all(f.done() for f in fs)


# -- 5. fork while the pool is busy -------------------------------------------------------------

FORK_PROGRAM = r"""
import json, multiprocessing, os, signal, sys, threading, time
from concurrent.futures import wait
from concurrent.futures.process import BrokenProcessPool
from nspool import NSPoolExecutor

FORKS = 30
MP_CHILDREN = 4
DEADLINE = 10.0


def submit_must_fail(ex):
    # In a child: the parent's pool must refuse at once (raise, or fail the future at once).
    t0 = time.monotonic()
    try:
        fut = ex.submit(abs, -1)
    except (BrokenProcessPool, RuntimeError):
        return time.monotonic() - t0 < 2
    try:
        fut.result(timeout=2)
    except (BrokenProcessPool, RuntimeError):
        return True
    except BaseException:
        return False
    return False


def mp_target(ex):
    if not submit_must_fail(ex):
        sys.exit(2)


def feed(ex, stop):
    try:
        while not stop.is_set():
            wait([ex.submit(abs, -i) for i in range(16)], timeout=30)
    except BaseException:
        pass


def main():
    codes, hung = [], 0
    with NSPoolExecutor(2) as ex:
        ex.submit(abs, -1).result(timeout=30)
        stop = threading.Event()
        feeder = threading.Thread(target=feed, args=(ex, stop))
        feeder.start()
        forked, procs = {}, []
        try:
            for i in range(FORKS):
                pid = os.fork()
                if pid == 0:
                    ok = i % 2 == 1 or submit_must_fail(ex)
                    sys.exit(0 if ok else 2)  # returns normally: unwinds, runs atexit
                forked[pid] = time.monotonic() + DEADLINE
            ctx = multiprocessing.get_context("fork")
            for _ in range(MP_CHILDREN):
                p = ctx.Process(target=mp_target, args=(ex,))
                p.start()
                procs.append((p, time.monotonic() + DEADLINE))
        finally:
            stop.set()
            feeder.join(timeout=30)
        while forked or procs:
            for pid, deadline in list(forked.items()):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes.append(os.waitstatus_to_exitcode(status))
                    del forked[pid]
                elif time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    hung += 1
                    del forked[pid]
            for p, deadline in list(procs):
                if p.exitcode is not None:
                    codes.append(p.exitcode)
                    procs.remove((p, deadline))
                elif time.monotonic() > deadline:
                    p.kill()
                    p.join()
                    hung += 1
                    procs.remove((p, deadline))
            time.sleep(0.01)  # polling children with a deadline
        try:
            parent_ok = ex.submit(abs, -5).result(timeout=30) == 5
        except BaseException as exc:
            parent_ok = repr(exc)
    print(json.dumps({"codes": codes, "hung": hung, "parent_ok": parent_ok}), flush=True)


main()
"""


def test_children_forked_while_the_pool_is_busy_exit_promptly() -> None:
    """Children forked (os.fork and multiprocessing's fork) while the pool's I/O thread is
    busy exit through sys.exit(0) promptly (no deadlock on the pool's lock at exit), a child's
    submit() on the parent's pool fails at once, and the parent's pool keeps working."""
    code, out, err = _run_program(FORK_PROGRAM, timeout=60)
    assert code == 0, f"exit status {code}\n{out}\n{err[-3000:]}"
    report = _last_json(out)
    assert report["hung"] == 0, f"{report['hung']} children hung: {report}\n{err[-3000:]}"
    assert report["codes"] == [0] * 34, report
    assert report["parent_ok"] is True, report


# -- 6. many workers ----------------------------------------------------------------------------


def test_400_workers_at_once() -> None:
    """max_workers=400 with 400 tasks submitted at once: every result comes back (the
    launcher's control channel does not overflow)."""
    with NSPoolExecutor(max_workers=400) as ex:
        fs = [ex.submit(tasks_dropin.sleep_then_pid, 0.2) for _ in range(400)]
        results = [f.result(timeout=60) for f in fs]
    assert len(results) == 400
    assert all(isinstance(r, int) for r in results)
    assert len(set(results)) > 50  # many workers really ran them


@pytest.mark.asyncio
async def test_400_concurrent_async_calls() -> None:
    """open_pool(max_workers=400) with 400 concurrent pool.run calls on asyncio: every result
    comes back."""
    async with open_pool(max_workers=400) as pool:
        results = await asyncio.wait_for(
            asyncio.gather(*(pool.run(tasks_dropin.sleep_then_pid, 0.2) for _ in range(400))),
            60,
        )
    assert len(results) == 400
    assert all(isinstance(r, int) for r in results)
    assert len(set(results)) > 50


MANY_WORKERS_PROGRAM = r"""
import json, resource
import tasks_dropin
from nspool import NSPoolExecutor

soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
with NSPoolExecutor(max_workers=400) as ex:
    fs = [ex.submit(tasks_dropin.sleep_then_pid, 0.2) for _ in range(400)]
    results = [f.result(timeout=60) for f in fs]
print(json.dumps({"soft": soft, "n": len(results), "pids": len(set(results))}), flush=True)
"""


def _lower_nofile() -> None:
    resource.setrlimit(
        resource.RLIMIT_NOFILE, (1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    )


def _count_settle(settled: dict[int, int], i: int, _fut: object) -> None:
    settled[i] = settled.get(i, 0) + 1


@pytest.mark.parametrize("seed", [1, 2])
def test_pool_stops_while_spawn_requests_queue(seed: int) -> None:
    """Randomised: a pool of 40-160 workers is stopped (kill_workers, terminate_workers,
    shutdown with cancel_futures) at a random moment while its spawn requests still queue in
    the launcher's outbox, so kills and spawns collide there. Every future settles exactly
    once, with its own result or a cancellation / broken-pool error, and nothing is left."""
    rng = random.Random(seed)
    for _ in range(15):
        n = rng.randrange(40, 161)
        settled: dict[int, int] = {}
        how = rng.choice(["kill_workers", "terminate_workers", "cancel_futures"])
        ex = NSPoolExecutor(max_workers=n)
        try:
            fs = [ex.submit(tasks_dropin.echo, i) for i in range(n)]
            for i, f in enumerate(fs):
                f.add_done_callback(partial(_count_settle, settled, i))
            threading.Event().wait(rng.uniform(0, 0.03))  # a random moment, not a sync point
            if how == "cancel_futures":
                ex.shutdown(wait=True, cancel_futures=True)
            else:
                getattr(ex, how)()
        finally:
            ex.shutdown(wait=True)
        assert all(f.done() for f in fs), how
        assert settled == {i: 1 for i in range(n)}, how
        for i, f in enumerate(fs):
            if f.cancelled():
                continue
            exc = f.exception()
            assert (
                exc is None
                and f.result() == i
                or isinstance(exc, (CancelledError, BrokenProcessPool))
            ), (how, i, exc)


def test_400_workers_with_a_soft_fd_limit_of_1024() -> None:
    """A program whose RLIMIT_NOFILE soft limit is 1024 (the common default) still runs 400
    workers: the pool raises the soft limit up to the hard one when it needs more fds."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"the hard RLIMIT_NOFILE is {hard}: too low for 400 workers")
    code, out, err = _run_program(MANY_WORKERS_PROGRAM, timeout=90, preexec_fn=_lower_nofile)
    assert code == 0, f"exit status {code}\n{out}\n{err[-3000:]}"
    report = _last_json(out)
    assert report["soft"] == 1024  # the program did start with the low limit
    assert report["n"] == 400
    assert report["pids"] > 50


# -- 7. no batching trap after a warm-up --------------------------------------------------------


def test_tasks_that_need_each_other_run_concurrently_after_a_warm_up(tmp_path: Path) -> None:
    """After 200 tiny tasks (one warm worker can serve them all), 8 tasks that only finish
    when all 8 run at once still get 8 workers: none is batched behind another."""
    with NSPoolExecutor(max_workers=8) as ex:
        assert list(ex.map(abs, range(-199, 1))) == list(range(199, -1, -1))
        fs = [ex.submit(tasks_dropin.wait_for_peers, str(tmp_path), i, 8) for i in range(8)]
        try:
            results = []
            for f in as_completed(fs, timeout=30):
                pid, all_seen = f.result()
                assert all_seen, "a task waited in vain for the others: they did not run at once"
                results.append(pid)
        finally:
            if not all(f.done() for f in fs):
                ex.kill_workers()  # fail fast instead of waiting for the stragglers
    assert len(set(results)) == 8, f"8 tasks ran in {len(set(results))} worker processes"


# -- 8. objects that stand for a file descriptor ------------------------------------------------


def test_connections_passed_to_tasks_carry_their_descriptor() -> None:
    """A multiprocessing Connection passed to a task reaches the worker as the descriptor
    itself (as with the stdlib pool, through multiprocessing's resource sharer), never as a
    bare fd number, which in the worker names another file: on the old code the task wrote
    into one of nspool's own pipes (breaking the pool) or hit EBADF."""
    from multiprocessing import resource_sharer

    try:
        with NSPoolExecutor(1) as ex:
            ex.submit(tasks_dropin.echo, 0).result(timeout=30)  # the worker is up
            pipes = [multiprocessing.Pipe(duplex=False) for _ in range(6)]
            try:
                # Six fd numbers in a row: some of them are open in the worker too.
                for i, (r, w) in enumerate(pipes):
                    ex.submit(tasks_dropin.send_through, w, i).result(timeout=30)
                    assert r.poll(10) and r.recv() == i
                assert ex.submit(tasks_dropin.echo, 7).result(timeout=30) == 7
            finally:
                for r, w in pipes:
                    r.close()
                    w.close()
    finally:
        resource_sharer.stop(timeout=10)  # its listener thread and socket
