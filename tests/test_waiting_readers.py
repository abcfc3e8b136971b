"""A thread waiting in ``NSFuture.result()`` reads its worker's result pipe itself (leader/
follower, ``_core.io_thread._Engine.try_lead``). These tests make that path collide with everything
else that can settle a future or close a pipe: other waiters on the same worker, kills,
deadlines, crashing workers, cancellations, callbacks that wait on another future of the same
worker, timeouts, and a shutdown, thousands of times; every future must settle exactly once,
with an outcome its task allows, and no wait may hang."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from concurrent.futures import CancelledError, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from typing import Any

import pytest
import tasks_race
from _racing import (  # noqa: F401 - fixtures used by name
    SCALE,
    frequent_thread_switches,
    run_threads,
    seed_fixture,
)

from nspool import NSPoolExecutor, TaskTimeoutError, WorkerDiedError

WAIT = 10.0  # a wait that takes this long is a hang


#: what each kind of task may end with
ALLOWED: dict[str, tuple[type[BaseException], ...]] = {
    "plain": (),
    "kill": (CancelledError,),
    "deadline": (TaskTimeoutError,),
    "cancel": (CancelledError,),
    "crash": (WorkerDiedError,),
}


class _Hung(Exception):
    pass


def _wait(f: Any, timeout: float, via_exception: bool) -> tuple[Any, BaseException | None]:
    """(result, None) or (None, the task's exception), through ``exception()`` or
    ``result()``; _Hung if the wait timed out (a task's own TaskTimeoutError is an outcome)."""
    try:
        if via_exception:
            exc = f.exception(timeout)
            return (None, exc) if exc is not None else (f.result(0), None)
        return f.result(timeout), None
    except TaskTimeoutError as exc:
        return None, exc
    except FuturesTimeout as exc:
        raise _Hung from exc
    except BaseException as exc:  # noqa: BLE001 - CancelledError, WorkerDiedError...
        return None, exc


def test_waiters_collide_with_stops_crashes_and_each_other(seed: int) -> None:
    rng0 = random.Random(seed)
    threads, rounds = 4, max(1, round(150 * SCALE))
    violations: list[str] = []
    counts: Counter[str] = Counter()
    callbacks: Counter[int] = Counter()
    lock = threading.Lock()

    def violation(text: str) -> None:
        with lock:
            violations.append(text)

    def settle(i: int) -> Any:
        def callback(f: Any) -> None:
            with lock:
                callbacks[i] += 1

        return callback

    ids = iter(range(10**9))
    with NSPoolExecutor(2) as ex, ThreadPoolExecutor(4) as killers:

        def client(rng: random.Random) -> None:
            for _ in range(rounds):
                if len(violations) > 20:
                    return
                batch = []
                for _ in range(rng.randint(1, 5)):
                    kind = rng.choices(
                        ["plain", "kill", "deadline", "cancel", "crash"], [70, 10, 10, 5, 5]
                    )[0]
                    d = rng.uniform(0, 1.5e-3)
                    i = next(ids)
                    if kind == "crash":
                        f = ex.submit(tasks_race.die, d)
                    elif kind == "deadline":
                        f = ex.schedule(
                            tasks_race.spin, (d, i), timeout=max(1e-4, d + rng.uniform(-4e-4, 4e-4))
                        )
                    else:
                        f = ex.submit(tasks_race.spin, d, i)
                    f.add_done_callback(settle(i))
                    if kind == "kill":
                        delay = rng.uniform(0, 2e-3)
                        killers.submit(lambda f=f, delay=delay: (time.sleep(delay), f.kill(WAIT)))
                    elif kind == "cancel":
                        f.cancel()
                    batch.append((i, kind, f))
                rng.shuffle(batch)
                for i, kind, f in batch:
                    how = rng.random()
                    if how < 0.15:  # a wait that gives up first; the outcome is read below
                        try:
                            _wait(f, rng.uniform(0, 3e-4), rng.random() < 0.5)
                        except _Hung:
                            pass
                    try:
                        value, exc = _wait(f, WAIT, how < 0.5)
                    except _Hung:
                        violation(f"{kind} task {i}: result() hung")
                        continue
                    with lock:
                        counts[kind] += 1
                    if exc is None:
                        if kind == "crash" or value != i:
                            violation(f"{kind} task {i} returned {value!r}")
                    elif not isinstance(exc, ALLOWED[kind]):
                        violation(f"{kind} task {i} ended with {exc!r}")

        clients = [
            threading.Thread(target=client, args=(random.Random(rng0.getrandbits(32)),))
            for _ in range(threads)
        ]
        if run_threads(clients, 60 * max(1.0, SCALE)):
            violation("a client thread hung")
    settled_twice = {i: n for i, n in callbacks.items() if n != 1}
    total = sum(counts.values())
    print(f"seed {seed}: {total} futures waited on, by kind {dict(counts)}")
    assert not violations, f"seed {seed}: {violations[:10]}"
    assert not settled_twice, f"seed {seed}: callbacks not run exactly once: {settled_twice}"
    assert len(callbacks) == total


def test_a_callback_may_wait_on_a_future_of_the_worker_its_reader_held() -> None:
    """The waiting thread reads worker 1's pipe; the first result's callback (run by that
    thread) waits for the second task on the same worker. It must get it."""
    got: list[object] = []
    with NSPoolExecutor(1, max_batch=4) as ex:
        ex.submit(tasks_race.spin, 0, 0).result(WAIT)  # the worker is up: both go to it
        a = ex.submit(tasks_race.spin, 0.01, "a")
        b = ex.submit(tasks_race.spin, 0.05, "b")
        a.add_done_callback(lambda _: got.append(b.result(WAIT)))
        assert a.result(WAIT) == "a"
        assert b.result(WAIT) == "b"
    assert got == ["b"]


def test_a_waiter_times_out_then_reads_its_result() -> None:
    with NSPoolExecutor(1) as ex:
        f = ex.submit(tasks_race.spin, 0.2, "late")
        with pytest.raises(FuturesTimeout):
            f.result(0.01)
        assert f.result(WAIT) == "late"


def test_shutdown_while_a_thread_reads_its_result() -> None:
    ex = NSPoolExecutor(1)
    f = ex.submit(tasks_race.spin, 0.1, "done")
    results: list[object] = []
    reader = threading.Thread(target=lambda: results.append(f.result(WAIT)))
    reader.start()
    ex.shutdown(wait=False)
    reader.join(WAIT)
    assert results == ["done"]
    t0 = time.monotonic()
    ex.shutdown(wait=True)  # the I/O thread noticed the pool is done
    assert time.monotonic() - t0 < WAIT


def test_a_reader_learns_of_its_worker_dying() -> None:
    with NSPoolExecutor(1) as ex:
        f = ex.submit(tasks_race.die, 0.05)
        with pytest.raises(WorkerDiedError):
            f.result(WAIT)
        assert ex.submit(tasks_race.spin, 0, 1).result(WAIT) == 1
