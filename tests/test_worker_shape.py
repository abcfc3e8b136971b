"""Issue 8: the worker's shape (an init as PID 1 of the worker's namespace, the task as an
ordinary child process of it) and exact stops (kill(), deadlines).

Each test names the item of issue 8 it covers in its docstring. Every wait is bounded (a
future's result with a timeout, ``concurrent.futures.wait`` with a timeout, a polled
predicate with a deadline, and a ``pytest.mark.timeout`` as the last resort), so a broken pool
shows up as an assertion with counts, not as a hang. Random choices print their seed.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import random
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, wait
from typing import Any

import pytest
import tasks
import tasks_shape
from _procs import descendants, outcome, wait_for

from nspool import (
    NSPoolExecutor,
    TaskTimeoutError,
    TaskUnpicklingError,
    WorkerDiedError,
)

# -- helpers -----------------------------------------------------------------------------------


@contextlib.contextmanager
def pool(*args: Any, **kwargs: Any) -> Iterator[NSPoolExecutor]:
    """An executor that is shut down normally when the block succeeds, and has its workers
    killed when it fails (so that a failed assertion about a stuck task cannot turn into a
    hang in ``shutdown(wait=True)``)."""
    ex = NSPoolExecutor(*args, **kwargs)
    ok = False
    try:
        yield ex
        ok = True
    finally:
        if ok:
            ex.shutdown(wait=True)
        else:
            ex.kill_workers()


def describe(o: tuple[str, Any]) -> str:
    kind, value = o
    if kind == "error":
        return f"error {type(value).__name__}"
    return kind


def settle(futures: list[Future[Any]], timeout: float) -> tuple[int, Counter[str]]:
    """``concurrent.futures.wait`` with a bound: how many futures it did not see settle, and
    what those are (a future cancelled by the pool without being notified is done() but
    still blocks ``wait()``)."""
    _, not_done = wait(futures, timeout=timeout)
    how = Counter(
        "cancelled, but wait() was never woken" if f.cancelled() else describe(outcome(f))
        for f in not_done
    )
    return len(not_done), how


def new_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


# -- item A: a task is an ordinary process: the signals it sends itself work ------------------

SIGNAL_CASES = [
    pytest.param("sigkill", signal.SIGKILL, id="SIGKILL"),
    pytest.param("sigsegv", signal.SIGSEGV, id="SIGSEGV-faulthandler"),
    pytest.param("abort", signal.SIGABRT, id="SIGABRT-abort"),
    pytest.param("sigterm", signal.SIGTERM, id="SIGTERM"),
    pytest.param("sigusr1", signal.SIGUSR1, id="SIGUSR1"),
    pytest.param("sigquit", signal.SIGQUIT, id="SIGQUIT"),
    pytest.param("sigint", None, id="SIGINT-KeyboardInterrupt"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("how", "sig"), SIGNAL_CASES)
def test_a_signal_a_task_sends_itself_ends_only_that_task(how: str, sig: Any, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """issue 8 item A: a task killed by a signal it sent itself fails its future with
    WorkerDiedError(.signal = that signal) (SIGINT: KeyboardInterrupt, as ProcessPoolExecutor
    gives); a task running alongside on the other worker is unaffected; the pool keeps
    serving."""
    started, go = tmp_path / "started", tmp_path / "go"
    with pool(2) as ex:
        bystander = ex.submit(tasks_shape.block_until, str(started), str(go), 60, "bystander")
        try:
            assert wait_for(lambda: started.exists() or bystander.done(), 30), (
                "the bystander task did not start within 30 s"
            )
            assert not bystander.done(), outcome(bystander)
            victim = ex.submit(tasks_shape.die_by, how)
            _, not_done = wait([victim], timeout=30)
            assert not not_done, "the task that signalled itself did not settle within 30 s"
            got = outcome(victim)
            bystander_running = not bystander.done()
        finally:
            tasks_shape.touch(str(go))
        bystander_result = outcome(bystander) if wait([bystander], timeout=30)[0] else None
        later = ex.submit(tasks.square, 7)
        later_result = outcome(later) if wait([later], timeout=30)[0] else None

    kind, exc = got
    if sig is None:
        assert kind == "error" and isinstance(exc, KeyboardInterrupt), (
            f"expected the future to fail with KeyboardInterrupt, got {got!r}"
        )
    else:
        assert kind == "error" and isinstance(exc, WorkerDiedError), (
            f"expected WorkerDiedError(signal={signal.Signals(sig).name}), got {got!r}"
        )
        assert exc.signal == sig, (
            f"WorkerDiedError.signal is {exc.signal!r}, expected {int(sig)} "
            f"({signal.Signals(sig).name}); exitcode {exc.exitcode!r}: {exc}"
        )
        if sig == signal.SIGTERM:
            assert exc.exitcode is None, f"exitcode {exc.exitcode!r} for a death by SIGTERM"
    assert bystander_running, "the task on the other worker was disturbed"
    assert bystander_result == ("result", "bystander"), bystander_result
    assert later_result == ("result", 49), f"the pool did not serve a later task: {later_result}"


# -- item B: os.getpid() in a task ---------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("private_proc", [False, True], ids=["host-proc", "private-proc"])
def test_concurrent_tasks_have_distinct_pids_other_than_1(private_proc: bool, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """issue 8 item B: os.getpid() in a task is not 1; four tasks running at the same time on
    four workers see four distinct PIDs (also with private_proc=True), so files named after
    the PID do not collide: each task reads back what it wrote."""
    n = 4
    with pool(n, private_proc=private_proc) as ex:
        fs = [
            ex.submit(tasks_shape.pid_rendezvous, str(tmp_path), n, f"token-{i}", 30)
            for i in range(n)
        ]
        _, not_done = wait(fs, timeout=60)
        assert not not_done, f"{len(not_done)} of {n} tasks did not finish within 60 s"
        results = [outcome(f) for f in fs]
    assert all(kind == "result" for kind, _ in results), results
    values = [v for _, v in results]
    pids = [pid for pid, _, _ in values]
    arrived = [a for _, _, a in values]
    read_back = [seen for _, seen, _ in values]
    assert min(arrived) >= n, f"the {n} tasks did not all run at the same time: {arrived}"
    checks = {
        "no task is PID 1": 1 not in pids,
        f"{n} distinct PIDs": len(set(pids)) == n,
        "each task read back its own file": read_back == [f"token-{i}" for i in range(n)],
    }
    assert all(checks.values()), (
        f"failed: {[k for k, ok in checks.items() if not ok]}; pids {pids}; "
        f"read back (expected token-0..token-{n - 1}): {read_back}"
    )


# -- item C: orphans are reaped while a task runs ------------------------------------------------


@pytest.mark.timeout(240)
def test_orphans_are_reaped_while_the_task_still_runs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """issue 8 item C: a task leaves 2,000 short-lived orphans and keeps running; while it
    runs, the zombies under the pool's launcher drop below 10 within 10 s."""
    count = 2000
    spawned, go = tmp_path / "spawned", tmp_path / "go"
    seen: list[int] = []
    with pool(1) as ex:
        f = ex.submit(tasks_shape.make_orphans, count, str(spawned), str(go), 180)
        try:
            assert wait_for(lambda: spawned.exists() or f.done(), 150, interval=0.05), (
                "the task did not finish spawning its orphans within 150 s"
            )
            assert not f.done(), f"the task ended before the test let it: {outcome(f)}"
            launcher = ex.launcher_pid

            def few_zombies() -> bool:
                seen.append(sum(1 for s in descendants(launcher).values() if s == "Z"))
                return seen[-1] < 10

            reaped = wait_for(few_zombies, 10, interval=0.05)
            still_running = not f.done()
        finally:
            tasks_shape.touch(str(go))
        result = outcome(f) if wait([f], timeout=30)[0] else None
    assert still_running, "the task ended while the zombies were counted"
    assert reaped, (
        f"zombies under the launcher while the task runs: {seen[0]} at first, {seen[-1]} "
        f"after 10 s (max {max(seen)}) of {count} orphans"
    )
    assert result == ("result", count), result


# -- item D: a forked child's exception leaves the task function ---------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("kind", "code"), [("exit3", 3), ("valueerror", 1)])
def test_a_forked_child_that_raises_exits_like_a_python_process(
    kind: str,
    code: int,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """issue 8 item D: a task forks and its child lets an exception escape the task function:
    SystemExit(3) -> the child exits with code 3; ValueError -> code 1 and its traceback on
    stderr. The parent task's future gets the parent's result and nothing else answers."""
    with pool(1) as ex:
        f = ex.submit(tasks_shape.fork_child_raises, kind)
        _, not_done = wait([f], timeout=30)
        assert not not_done, "the forking task did not settle within 30 s"
        got = outcome(f)
        after = [ex.submit(tasks.square, i) for i in range(20)]
        _, after_not_done = wait(after, timeout=30)
        after_results = [outcome(g) for g in after]
    err = capfd.readouterr().err
    if kind == "valueerror":
        stderr_ok = "Traceback" in err and "ValueError: boom-marker" in err
    else:
        stderr_ok = "Traceback" not in err  # SystemExit ends a process without a word
    assert (got, stderr_ok) == (("result", code), True), (
        f"the parent task's future: {got!r} (expected the child's exit code {code}); "
        f"stderr {'as expected' if stderr_ok else 'wrong'}:\n{err}"
    )
    assert not after_not_done and after_results == [("result", i * i) for i in range(20)], (
        f"later tasks were disturbed: {after_results}"
    )


# -- items E.1, E.2, E.4: kill() -----------------------------------------------------------------


def kill_now(f: Future[Any], budget_end: float) -> tuple[Any, bool]:
    """``f.kill(timeout=...)`` bounded by what is left of the test's budget for kill() waits:
    (what it returned, or the exception it raised; whether the future was done when it
    returned)."""
    timeout = min(10.0, max(budget_end - time.monotonic(), 0.001))
    try:
        ret: Any = f.kill(timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - e.g. a kill() that timed out: reported
        ret = exc
    return ret, f.done()


def kill_problem(ret: Any, done_at_return: bool, got: tuple[str, Any], value: Any) -> str | None:
    """What is wrong with a killed future, if anything: kill() returns once the future has
    settled; True means the task was stopped (CancelledError), False that it finished first
    (its result)."""
    if isinstance(ret, BaseException):
        return f"kill() raised {type(ret).__name__}"
    if not done_at_return:
        return f"kill() returned {ret!r} before the future settled"
    if ret is True and got[0] != "cancelled":
        return f"kill() returned True, future: {describe(got)}"
    if ret is False and got != ("result", value):
        return f"kill() returned False, future: {describe(got)}"
    if ret not in (True, False):
        return f"kill() returned {ret!r}"
    return None


@pytest.mark.timeout(240)
def test_kill_racing_completion_settles_exactly_once() -> None:
    """issue 8 item E.1: kill() at a random moment of a short task's life: when kill()
    returns the future is done; True means the task was stopped (CancelledError), False that
    it finished first (its result); every future settles; each done-callback runs once."""
    seed = new_seed()
    rng = random.Random(seed)
    calls: Counter[int] = Counter()
    lock = threading.Lock()

    def callback(i: int) -> Any:
        def cb(_: Future[Any]) -> None:
            with lock:
                calls[i] += 1

        return cb

    records: list[tuple[int, Future[Any], Any, bool]] = []
    budget_end = time.monotonic() + 120  # all kill() waits together
    with pool(2) as ex:
        for rnd in range(25):
            batch = []
            for j in range(4):
                i = rnd * 4 + j
                f = ex.submit(tasks_shape.sleep_return, rng.uniform(0, 0.02), i)
                f.add_done_callback(callback(i))
                batch.append((i, f))
            for i, f in batch:
                time.sleep(rng.uniform(0, 0.02))  # a random point in the task's life
                records.append((i, f, *kill_now(f, budget_end)))
        futures = [f for _, f, _, _ in records]
        unsettled, unsettled_how = settle(futures, 30)
        wait_for(lambda: sum(calls.values()) >= len(futures) - unsettled, 5)
        with lock:
            counts = dict(calls)
        problems: Counter[str] = Counter()
        for i, f, ret, done_at_return in records:
            problem = kill_problem(ret, done_at_return, outcome(f), i)
            if problem:
                problems[problem] += 1
            if counts.get(i, 0) != 1:
                problems[f"done-callback ran {counts.get(i, 0)} times"] += 1
        returns = Counter(repr(ret) for _, _, ret, _ in records)
        assert not unsettled and not problems, (
            f"seed {seed}: {unsettled} of {len(futures)} futures unsettled after 30 s "
            f"{dict(unsettled_how)}; kill() returned {dict(returns)}; problems: {dict(problems)}"
        )


@pytest.mark.timeout(240)
def test_kill_of_tasks_queued_behind_others_in_a_workers_pipe() -> None:
    """issue 8 item E.2: with batching on (one worker warmed up with 3,000 tiny tasks, so it
    takes many tasks per write), killing every third of 300 fast tasks, many of which wait in
    the worker's pipe behind others, settles each killed one (cancelled or its result, as
    kill() said) and fails no task that was not killed."""
    with pool(1) as ex:
        warm = list(ex.map(tasks.square, range(3000), timeout=120))
        assert warm == [i * i for i in range(3000)]
        # 0.3 ms each: fast enough to travel in batches, slow enough that the kills below
        # catch many of them waiting in the worker's pipe.
        fs = [ex.submit(tasks_shape.sleep_return, 0.0003, i * i) for i in range(300)]
        budget_end = time.monotonic() + 120  # all kill() waits together
        killed = {i: kill_now(fs[i], budget_end) for i in range(2, 300, 3)}  # behind 2 others
        unsettled, unsettled_how = settle(fs, 60)
        problems: Counter[str] = Counter()
        for i, f in enumerate(fs):
            got = outcome(f)
            if i in killed:
                problem = kill_problem(*killed[i], got, i * i)
                if problem:
                    problems[f"killed: {problem}"] += 1
            elif got != ("result", i * i):
                problems[f"not killed: {describe(got)}"] += 1
        returns = Counter(repr(ret) for ret, _ in killed.values())
        assert not unsettled and not problems, (
            f"{unsettled} of 300 futures unsettled after 60 s {dict(unsettled_how)}; kill() "
            f"returned {dict(returns)}; problems: {dict(problems)}"
        )


# -- item E.3: deadlines close to the task's run time --------------------------------------------


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("seconds", "n"), [(0.005, 300), (0.05, 100)])
def test_deadlines_close_to_the_run_time_settle_every_future(seconds: float, n: int) -> None:
    """issue 8 item E.3: ``schedule(time.sleep, (s,), timeout=s)``: every future settles, with
    None or TaskTimeoutError, nothing else."""
    with pool(2) as ex:
        fs = [ex.schedule(time.sleep, (seconds,), timeout=seconds) for _ in range(n)]
        unsettled, unsettled_how = settle(fs, 60)
        outcomes = Counter(
            "None" if o == ("result", None) else describe(o) for o in map(outcome, fs)
        )
        assert not unsettled and set(outcomes) <= {"None", "error TaskTimeoutError"}, (
            f"{unsettled} of {n} futures unsettled after 60 s {dict(unsettled_how)}; "
            f"outcomes {dict(outcomes)}"
        )


# -- item E.4: many threads, kills, cancels and deadlines at once --------------------------------


@pytest.mark.timeout(300)
def test_threads_mixing_kill_cancel_and_deadlines_settle_everything() -> None:
    """issue 8 item E.4: 4 threads x 1,500 short tasks (0-3 ms) with 5% kill(), 5% cancel(),
    5% deadlines about equal to the task's run time: all 6,000 futures settle within 120 s and
    no task that was neither killed nor given a deadline fails.

    Each thread keeps at most ``WINDOW`` of its tasks unfinished (it waits, bounded, for its
    oldest one), and kills or cancels a task a random 0..``WINDOW`` submissions after
    submitting it, so that the stops find tasks queued, waiting in a worker's pipe, running
    and finished, not only queued."""
    seed = new_seed()
    n_threads, per_thread, window_size = 4, 1500, 8
    start = time.monotonic()
    budget_end = start + 100  # all kill() and pacing waits together
    # one record per task: [action, future, what kill()/cancel() gave, expected value]
    records: list[list[list[Any]]] = [[] for _ in range(n_threads)]
    crashed: list[BaseException] = []

    def client(k: int, ex: NSPoolExecutor) -> None:
        rng = random.Random(seed + k)
        due: list[tuple[int, int, list[Any]]] = []  # heap of (submission index, seq, record)
        window: deque[list[Any]] = deque()

        def act(rec: list[Any]) -> None:
            rec[2] = kill_now(rec[1], budget_end) if rec[0] == "kill" else rec[1].cancel()

        try:
            for j in range(per_thread):
                s = rng.uniform(0, 0.003)
                roll = rng.random()
                value = (k, j)
                if roll < 0.05:
                    s = max(s, 0.0005)
                    f = ex.schedule(tasks_shape.sleep_return, (s, value), timeout=s)
                    rec = ["deadline", f, None, value]
                else:
                    action = "kill" if roll < 0.10 else "cancel" if roll < 0.15 else None
                    rec = [action, ex.submit(tasks_shape.sleep_return, s, value), None, value]
                records[k].append(rec)
                if rec[0] in ("kill", "cancel"):
                    heapq.heappush(due, (j + rng.randint(0, window_size), j, rec))
                while due and due[0][0] <= j:
                    act(heapq.heappop(due)[2])
                window.append(rec)
                while len(window) > window_size:
                    oldest = window.popleft()[1]
                    if not oldest.done():
                        wait([oldest], timeout=max(budget_end - time.monotonic(), 0))
            while due:
                act(heapq.heappop(due)[2])
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            crashed.append(exc)

    with pool(2) as ex:
        threads = [threading.Thread(target=client, args=(k, ex)) for k in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(start + 150 - time.monotonic(), 0.1))
        assert not any(t.is_alive() for t in threads), "client threads stuck for 150 s"
        assert not crashed, crashed
        clients_took = time.monotonic() - start
        futures = [rec[1] for recs in records for rec in recs]
        unsettled, unsettled_how = settle(futures, max(start + 120 - time.monotonic(), 0.1))
        elapsed = time.monotonic() - start
        problems: Counter[str] = Counter()
        for rec in (rec for recs in records for rec in recs):
            action, f, ret, value = rec
            got = outcome(f)
            if action is None:
                if got != ("result", value):
                    problems[f"plain task: {describe(got)}"] += 1
            elif action == "deadline":
                if got != ("result", value) and not (
                    got[0] == "error" and isinstance(got[1], TaskTimeoutError)
                ):
                    problems[f"deadline task: {describe(got)}"] += 1
            elif action == "cancel":
                if ret is True and got[0] != "cancelled":
                    problems[f"cancel() True, future: {describe(got)}"] += 1
                elif ret is False and got != ("result", value):
                    problems[f"cancel() False, future: {describe(got)}"] += 1
            else:
                problem = kill_problem(*ret, got, value)
                if problem:
                    problems[problem] += 1
        actions = Counter(str(rec[0]) for recs in records for rec in recs)
        kills = Counter(
            repr(rec[2][0]) if not isinstance(rec[2][0], BaseException) else "raised"
            for recs in records
            for rec in recs
            if rec[0] == "kill"
        )
        assert not unsettled and not problems, (
            f"seed {seed}: {unsettled} of {len(futures)} futures unsettled {elapsed:.1f} s after "
            f"the start {dict(unsettled_how)} (the client threads took {clients_took:.1f} s); "
            f"actions {dict(actions)}; kill() returned {dict(kills)}; problems {dict(problems)}"
        )


# -- item E.6: the deadline does not count the initializer ---------------------------------------


@pytest.mark.timeout(120)
def test_task_timeout_does_not_count_the_initializer() -> None:
    """issue 8 item E.6: with an initializer that takes 1 s and task_timeout=0.5, six 10 ms
    tasks all succeed."""
    with pool(2, initializer=tasks_shape.slow_init, initargs=(1.0,), task_timeout=0.5) as ex:
        fs = [ex.submit(tasks_shape.sleep_return, 0.01, i) for i in range(6)]
        _, not_done = wait(fs, timeout=60)
        got = [describe(o) if o[0] != "result" else o[1] for o in map(outcome, fs)]
        assert got == list(range(6)), f"{len(not_done)} unsettled after 60 s; outcomes {got}"


# -- item E.7: unpickling in the program raises a BaseException ----------------------------------


def _submit(ex: NSPoolExecutor, fn: Any, *args: Any) -> Future[Any] | BaseException:
    try:
        return ex.submit(fn, *args)
    except BaseException as exc:  # noqa: BLE001 - the pool refused: reported by the test
        return exc


def _settle(f: Future[Any] | BaseException, timeout: float) -> Any:
    if isinstance(f, BaseException):
        return ("submit raised", f)
    if not wait([f], timeout=timeout)[0]:
        return ("pending", None)
    return outcome(f)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("what", ["SystemExit", "CustomBaseError"])
@pytest.mark.parametrize("where", ["result", "exception"])
def test_unpickling_that_raises_a_base_exception_fails_only_that_future(
    where: str, what: str
) -> None:
    """issue 8 item E.7: a result (or an exception raised by the task) whose unpickling in the
    program raises SystemExit or another BaseException fails that future with
    TaskUnpicklingError (its __cause__ the original exception); a call running alongside
    succeeds and a later one works."""
    fn = (
        tasks_shape.return_explodes_on_unpickle
        if where == "result"
        else tasks_shape.raise_explodes_on_unpickle
    )
    expected_cause = SystemExit if what == "SystemExit" else tasks_shape.CustomBaseError
    with pool(2) as ex:
        bad = _submit(ex, fn, what)
        good = _submit(ex, tasks_shape.sleep_return, 0.3, "alongside")
        bad_got = _settle(bad, 30)
        good_got = _settle(good, 30)
        later_got = _settle(_submit(ex, tasks.square, 3), 30)
    kind, exc = bad_got
    assert kind == "error" and isinstance(exc, TaskUnpicklingError), (
        f"expected TaskUnpicklingError, got {bad_got!r}"
    )
    assert isinstance(exc.__cause__, expected_cause), (
        f"TaskUnpicklingError.__cause__ is {exc.__cause__!r}, expected a {expected_cause.__name__}"
    )
    assert good_got == ("result", "alongside"), f"the call alongside: {good_got!r}"
    assert later_got == ("result", 9), f"a later call: {later_got!r}"
