"""Scheduling rules of the pool core, without processes: events in, actions out.

Tasks are answered by their seq on their worker (1, 2, ... in the order sent), not by their id;
several tests give tasks ids far from their seqs so that mixing the two up fails."""

from __future__ import annotations

import pytest

from nspool._core.pool import (
    TRANSITIONS,
    Actions,
    Ev,
    ExitOutcome,
    Fate,
    PoolCore,
    StopAction,
    Task,
    TState,
    WorkerEnd,
    WorkerSlot,
    WState,
)


def make_tasks(n: int, start: int = 1) -> list[Task]:
    return [Task(i, b"payload-%d" % i) for i in range(start, start + n)]


def submit(core: PoolCore, n: int, start: int = 1) -> list[Task]:
    tasks = make_tasks(n, start)
    for t in tasks:
        core.submit(t)
    return tasks


def ready(core: PoolCore, slots: list[WorkerSlot], now: float = 0.0) -> None:
    for slot in slots:
        core.on_ready(slot.wid, 1000 + slot.wid, now)


def sent(actions: Actions) -> dict[int, list[int]]:
    """wid -> ids of the tasks sent to it."""
    return {slot.wid: [t.id for t in tasks] for slot, tasks in actions.send}


def queue_ids(core: PoolCore) -> list[int]:
    return [t.id for t in core.queue]


def inflight_ids(slot: WorkerSlot) -> list[int]:
    return [t.id for t in slot.inflight]


def inflight_seqs(slot: WorkerSlot) -> list[int]:
    return [t.seq for t in slot.inflight]


def ended(out: ExitOutcome) -> list[tuple[int, Fate]]:
    """(task id, fate) of each task an exit ended."""
    return [(t.id, fate) for t, fate in out.ended]


def started_pool(
    n: int, *, now: float = 0.0, **kwargs: object
) -> tuple[PoolCore, list[WorkerSlot]]:
    """A core with ``n`` READY workers and nothing queued."""
    core = PoolCore(n, **kwargs)  # type: ignore[arg-type]
    for t in make_tasks(n, start=10_000):
        core.submit(t)
    slots = core.schedule(now).spawn
    assert len(slots) == n
    core.drain_queue()
    ready(core, slots, now)
    return core, slots


# ---------------------------------------------------------------------------------------------
# Construction
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, -1])
def test_max_workers_must_be_positive(n: int) -> None:
    with pytest.raises(ValueError, match="max_workers"):
        PoolCore(n)


@pytest.mark.parametrize("n", [0, -3])
def test_max_tasks_per_child_must_be_positive(n: int) -> None:
    with pytest.raises(ValueError, match="max_tasks_per_child"):
        PoolCore(2, max_tasks_per_child=n)


@pytest.mark.parametrize("n", [0, -1, 4096, 10_000])
def test_max_batch_must_fit_the_state_block(n: int) -> None:
    with pytest.raises(ValueError, match="max_batch"):
        PoolCore(2, max_batch=n)


@pytest.mark.parametrize("n", [1, 4095])
def test_max_batch_bounds_are_accepted(n: int) -> None:
    core = PoolCore(1, max_batch=n)
    core.avg_task_time = 0.0
    assert core.depth() == n


def test_actions_truthiness() -> None:
    assert not Actions()
    assert Actions(spawn=[WorkerSlot(1)])
    assert Actions(send=[(WorkerSlot(1), [])])
    assert Actions(close=[WorkerSlot(1)])


# ---------------------------------------------------------------------------------------------
# Spawning
# ---------------------------------------------------------------------------------------------


def test_nothing_to_do_without_tasks() -> None:
    core = PoolCore(4)
    assert not core.schedule(0.0)
    assert core.workers == {}
    assert core.idle


def test_spawns_one_worker_per_queued_task_up_to_max_workers() -> None:
    core = PoolCore(3)
    submit(core, 2)
    actions = core.schedule(0.0)
    assert [s.wid for s in actions.spawn] == [1, 2]
    assert all(s.state is WState.STARTING and s.budget is None for s in actions.spawn)
    assert actions.send == [] and actions.close == []
    assert set(core.workers) == {1, 2}

    submit(core, 5, start=3)
    actions = core.schedule(0.0)
    assert [s.wid for s in actions.spawn] == [3]  # capped at max_workers
    assert len(core.workers) == 3

    submit(core, 5, start=8)
    assert not core.schedule(0.0)
    assert len(core.workers) == 3


def test_task_queued_while_workers_start_spawns_only_what_is_missing() -> None:
    core = PoolCore(4)
    submit(core, 1)
    assert [s.wid for s in core.schedule(0.0).spawn] == [1]
    # Scheduling again with the same queue must not ask for another worker.
    assert not core.schedule(0.0)
    # One more task while worker 1 starts: one more worker, not two.
    submit(core, 1, start=2)
    actions = core.schedule(0.0)
    assert [s.wid for s in actions.spawn] == [2]
    assert actions.send == []
    assert queue_ids(core) == [1, 2]  # nobody is READY: nothing is handed out


def test_spawn_false_only_assigns() -> None:
    core = PoolCore(2)
    submit(core, 3)
    assert not core.schedule(0.0, spawn=False)
    assert core.workers == {}
    assert queue_ids(core) == [1, 2, 3]


def test_wids_are_never_reused() -> None:
    core = PoolCore(1)
    submit(core, 1)
    (slot,) = core.schedule(0.0).spawn
    core.on_exit(slot.wid, WorkerEnd())
    (again,) = core.schedule(0.0).spawn
    assert again.wid != slot.wid


# ---------------------------------------------------------------------------------------------
# Assignment
# ---------------------------------------------------------------------------------------------


def test_only_ready_workers_get_tasks() -> None:
    core = PoolCore(2)
    submit(core, 3)
    w1, w2 = core.schedule(0.0).spawn
    core.on_ready(w1.wid, 4321, 1.0)
    assert w1.state is WState.READY and w1.pid == 4321
    assert w2.state is WState.STARTING
    actions = core.schedule(1.0)
    assert sent(actions) == {w1.wid: [1]}
    assert actions.spawn == []  # both slots are taken already
    assert list(w2.inflight) == []
    assert queue_ids(core) == [2, 3]

    core.on_ready(w2.wid, 4322, 2.0)
    assert sent(core.schedule(2.0)) == {w2.wid: [2]}
    assert queue_ids(core) == [3]


def test_sent_tasks_are_in_flight_and_claimed() -> None:
    core, (w,) = started_pool(1)
    (task,) = submit(core, 1, start=77)
    assert not task.claimed
    assert (task.state, task.wid, task.seq) == (TState.QUEUED, 0, 0)
    actions = core.schedule(5.0)
    ((slot, tasks),) = actions.send
    assert slot is w and tasks == [task]
    assert task.claimed
    assert (task.state, task.wid, task.seq) == (TState.SENT, w.wid, 1)
    assert w.last_seq == 1
    assert list(w.inflight) == [task]
    assert w.head_since == 5.0
    assert not core.idle


def test_fifo_order() -> None:
    core, (w,) = started_pool(1)
    submit(core, 6)
    order: list[int] = []
    now = 0.0
    while not core.idle:
        for _, tasks in core.schedule(now).send:
            order.extend(t.id for t in tasks)
        now += 1.0  # slow tasks: depth stays 1
        core.on_result(w.wid, w.inflight[0].seq, now)
    assert order == [1, 2, 3, 4, 5, 6]


def test_claim_drops_cancelled_tasks() -> None:
    cancelled = {2, 3, 5}
    claimed: list[int] = []

    def claim(task: Task) -> bool:
        claimed.append(task.id)
        return task.id not in cancelled

    core, (w1, w2) = started_pool(2, claim=claim)
    tasks = submit(core, 6)
    core.avg_task_time = 0.0  # deep batches: everything goes out at once
    actions = core.schedule(0.0)
    assert sent(actions) == {w1.wid: [1, 6], w2.wid: [4]}
    assert claimed == [1, 2, 3, 4, 5, 6]
    assert list(core.queue) == []
    assert [t.claimed for t in tasks] == [True, False, False, True, False, True]
    # Dropped tasks left the pool without a seq; sent ones count 1, 2 on their worker.
    assert [(t.state, t.seq) for t in tasks] == [
        (TState.SENT, 1),
        (TState.DONE, 0),
        (TState.DONE, 0),
        (TState.SENT, 1),
        (TState.DONE, 0),
        (TState.SENT, 2),
    ]


def test_claim_dropping_everything_sends_nothing() -> None:
    core, _ = started_pool(2, claim=lambda task: False)
    submit(core, 4)
    actions = core.schedule(0.0)
    assert actions.send == []
    assert list(core.queue) == []
    assert core.idle


def test_claim_is_asked_once_per_task() -> None:
    claimed: list[int] = []

    def claim(task: Task) -> bool:
        claimed.append(task.id)
        return True

    core, (w,) = started_pool(1, claim=claim)
    submit(core, 3)
    core.schedule(0.0)
    core.schedule(0.0)  # worker full (depth 1): nothing more is claimed
    assert claimed == [1]
    core.on_result(w.wid, 1, 1.0)
    core.schedule(1.0)
    assert claimed == [1, 2]


def test_requeued_tasks_are_not_claimed_again() -> None:
    claimed: list[int] = []

    def claim(task: Task) -> bool:
        claimed.append(task.id)
        return False  # would drop any task it is asked about

    core, (w1, w2) = started_pool(2, claim=claim)
    t1, t2 = make_tasks(2)
    # Handed out once already (their futures are running): claim is not consulted again.
    t1.claimed = t2.claimed = True
    core.submit(t1)
    core.submit(t2)
    assert sent(core.schedule(0.0)) == {w1.wid: [1], w2.wid: [2]}
    assert claimed == []


# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------


def test_depth_is_one_without_an_estimate() -> None:
    core = PoolCore(1)
    assert core.avg_task_time is None
    assert core.depth() == 1


@pytest.mark.parametrize("took", [1.0, 2.0, 100.0])
def test_depth_is_one_for_slow_tasks(took: float) -> None:
    core, (w,) = started_pool(1, batch_window=1.0)
    submit(core, 1)
    core.schedule(0.0)
    core.on_result(w.wid, 1, took)
    assert core.avg_task_time == took
    assert core.depth() == 1


@pytest.mark.parametrize(("took", "expected"), [(0.5, 2), (0.25, 4), (0.125, 8), (0.375, 2)])
def test_depth_grows_with_fast_tasks(took: float, expected: int) -> None:
    core, (w,) = started_pool(1, batch_window=1.0)
    submit(core, 1)
    core.schedule(10.0)
    core.on_result(w.wid, 1, 10.0 + took)
    assert core.avg_task_time == took
    assert core.depth() == expected


@pytest.mark.parametrize("avg", [0.0, 1e-9, 0.001])
def test_depth_is_capped_by_max_batch(avg: float) -> None:
    core = PoolCore(1, max_batch=8, batch_window=1.0)
    core.avg_task_time = avg
    assert core.depth() == 8


def test_estimate_is_a_moving_average_of_service_times() -> None:
    core, (w,) = started_pool(1, batch_window=100.0)
    submit(core, 3)
    core.avg_task_time = None
    core.schedule(0.0)  # depth 1: task 1 only
    core.on_result(w.wid, 1, 1.0)
    assert core.avg_task_time == 1.0
    core.schedule(3.0)  # task 2 starts at 3.0, not at 1.0: idle time is not service time
    core.on_result(w.wid, 2, 3.5)
    assert core.avg_task_time == pytest.approx(1.0 + 0.2 * (0.5 - 1.0))


def test_batched_tasks_are_timed_from_the_previous_result() -> None:
    core, (w,) = started_pool(1, batch_window=1.0)
    core.avg_task_time = 0.25  # depth 4
    submit(core, 2)
    assert sent(core.schedule(0.0)) == {w.wid: [1, 2]}
    core.on_result(w.wid, 1, 0.25)
    assert w.head_since == 0.25
    core.on_result(w.wid, 2, 0.5)
    assert core.avg_task_time == pytest.approx(0.25)


def test_topping_up_a_busy_worker_does_not_restart_its_clock() -> None:
    core, (w,) = started_pool(1, batch_window=1.0)
    core.avg_task_time = 0.5  # depth 2
    submit(core, 1)
    core.schedule(0.0)
    submit(core, 1, start=2)
    assert sent(core.schedule(0.4)) == {w.wid: [2]}  # task 1 still running since 0.0
    assert w.head_since == 0.0
    core.on_result(w.wid, 1, 0.5)
    assert core.avg_task_time == pytest.approx(0.5)  # took 0.5, not 0.1


def test_result_timestamps_going_backwards_count_as_zero() -> None:
    core, (w,) = started_pool(1)
    submit(core, 1)
    core.schedule(10.0)
    core.on_result(w.wid, 1, 9.0)
    assert core.avg_task_time == 0.0


def test_tasks_spread_level_by_level() -> None:
    core, (w1, w2, w3) = started_pool(3, batch_window=1.0)
    core.avg_task_time = 0.25  # depth 4
    submit(core, 7)
    actions = core.schedule(0.0)
    assert sent(actions) == {w1.wid: [1, 4, 7], w2.wid: [2, 5], w3.wid: [3, 6]}
    assert [inflight_ids(w) for w in (w1, w2, w3)] == [[1, 4, 7], [2, 5], [3, 6]]


def test_batches_are_capped_at_depth() -> None:
    core, (w1, w2) = started_pool(2, batch_window=1.0)
    core.avg_task_time = 0.25  # depth 4
    submit(core, 11)
    actions = core.schedule(0.0)
    assert sent(actions) == {w1.wid: [1, 3, 5, 7], w2.wid: [2, 4, 6, 8]}
    assert queue_ids(core) == [9, 10, 11]
    # Full workers get nothing more until they answer.
    assert not core.schedule(0.0, spawn=False)


def test_partly_full_workers_are_topped_up_level_by_level() -> None:
    core, (w1, w2) = started_pool(2, batch_window=1.0)
    core.avg_task_time = 0.5  # depth 2
    submit(core, 4)
    core.schedule(0.0)
    assert inflight_ids(w1) == [1, 3] and inflight_ids(w2) == [2, 4]
    core.on_result(w2.wid, 1, 0.0)  # task 2
    core.on_result(w2.wid, 2, 0.0)  # task 4
    core.avg_task_time = 0.3  # depth 3
    submit(core, 4, start=5)
    # Level 1 and 2: only the empty w2 has room; level 3: both.
    assert sent(core.schedule(0.0)) == {w1.wid: [7], w2.wid: [5, 6, 8]}
    assert inflight_ids(w1) == [1, 3, 7]
    # Seqs go on counting on each worker, whatever was answered meanwhile.
    assert inflight_seqs(w1) == [1, 2, 3] and inflight_seqs(w2) == [3, 4, 5]


def test_slow_estimate_sends_one_task_at_a_time() -> None:
    core, (w1, w2) = started_pool(2, batch_window=1.0)
    core.avg_task_time = 5.0
    submit(core, 5)
    assert sent(core.schedule(0.0)) == {w1.wid: [1], w2.wid: [2]}
    assert queue_ids(core) == [3, 4, 5]


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


def test_results_come_back_in_order() -> None:
    core, (w,) = started_pool(1)
    core.avg_task_time = 0.0
    tasks = submit(core, 3)
    core.schedule(0.0)
    assert core.on_result(w.wid, 1, 0.0) is tasks[0]
    assert core.on_result(w.wid, 2, 0.0) is tasks[1]
    assert core.on_result(w.wid, 3, 0.0) is tasks[2]
    assert list(w.inflight) == []
    assert core.idle


def test_results_are_matched_by_seq_not_by_task_id() -> None:
    core, (w1, w2) = started_pool(2)
    core.avg_task_time = 0.0
    tasks = submit(core, 4, start=501)
    assert sent(core.schedule(0.0)) == {w1.wid: [501, 503], w2.wid: [502, 504]}
    assert inflight_seqs(w1) == [1, 2] and inflight_seqs(w2) == [1, 2]
    assert core.on_result(w2.wid, 1, 0.0) is tasks[1]
    assert core.on_result(w1.wid, 1, 0.0) is tasks[0]
    assert core.on_result(w1.wid, 2, 0.0) is tasks[2]
    with pytest.raises(RuntimeError, match="expected 2"):
        core.on_result(w2.wid, 504, 0.0)  # the task id is not its seq
    assert core.on_result(w2.wid, 2, 0.0) is tasks[3]
    assert all(t.state is TState.DONE for t in tasks)


def test_result_for_the_wrong_task_raises() -> None:
    core, (w,) = started_pool(1)
    core.avg_task_time = 0.0
    submit(core, 2)
    core.schedule(0.0)
    with pytest.raises(RuntimeError, match="answered task seq 2, expected 1"):
        core.on_result(w.wid, 2, 1.0)  # not the head
    with pytest.raises(RuntimeError, match="expected 1"):
        core.on_result(w.wid, 99, 1.0)
    assert inflight_ids(w) == [1, 2]  # nothing was popped
    assert core.avg_task_time == 0.0  # nor timed


def test_result_from_an_idle_worker_raises() -> None:
    core, (w,) = started_pool(1)
    with pytest.raises(RuntimeError, match="expected None"):
        core.on_result(w.wid, 1, 0.0)


# ---------------------------------------------------------------------------------------------
# Worker exits
# ---------------------------------------------------------------------------------------------


def test_exit_fails_only_the_running_task_and_requeues_the_rest_in_front() -> None:
    core, (w1, w2) = started_pool(2, batch_window=1.0)
    core.avg_task_time = 0.25  # depth 4
    tasks = submit(core, 10)
    core.schedule(0.0)
    assert inflight_ids(w1) == [1, 3, 5, 7]
    assert queue_ids(core) == [9, 10]

    out = core.on_exit(w1.wid, WorkerEnd(started=1))
    assert out.ended == [(tasks[0], Fate.DIED)]
    assert tasks[0].state is TState.DONE
    assert w1.state is WState.DEAD
    assert list(w1.inflight) == []
    assert w1.wid not in core.workers
    assert w1.wid not in core.workers
    # The tasks it had not started go first, in their order, already claimed, without a seq.
    assert queue_ids(core) == [3, 5, 7, 9, 10]
    assert all(t.claimed for t in list(core.queue)[:3])
    assert not any(t.claimed for t in list(core.queue)[3:])
    assert all((t.state, t.wid, t.seq) == (TState.QUEUED, 0, 0) for t in core.queue)
    # The other worker is untouched.
    assert inflight_ids(w2) == [2, 4, 6, 8]


def test_requeued_tasks_go_to_the_next_worker_first() -> None:
    core, (w1, w2) = started_pool(2, batch_window=1.0)
    core.avg_task_time = 0.25
    submit(core, 10)
    core.schedule(0.0)
    core.on_exit(w1.wid, WorkerEnd(started=1))
    # w2 finishes its batch; requeued 3, 5, 7 go out before 9 and 10.
    for seq in (1, 2, 3, 4):
        core.on_result(w2.wid, seq, 0.0)
    core.avg_task_time = 0.25
    # Until w1's replacement is up, w2 takes one task at a time (no batching while the pool
    # could start a worker): the requeued 3 first.
    actions = core.schedule(0.0)
    assert sent(actions) == {w2.wid: [3]}
    assert inflight_seqs(w2) == [5]  # a new seq on its new worker
    (w3,) = actions.spawn
    ready(core, [w3])
    actions = core.schedule(0.0, spawn=False)
    # Every worker is up: batches again, the requeued 5 and 7 still before 9 and 10.
    assert sent(actions) == {w3.wid: [5, 9], w2.wid: [7, 10]}
    assert not core.queue


def test_exit_of_an_idle_worker_loses_nothing() -> None:
    core, (w,) = started_pool(1)
    submit(core, 2)
    out = core.on_exit(w.wid, WorkerEnd())
    assert out.ended == []
    assert queue_ids(core) == [1, 2]
    assert not core.startup_failing
    # A replacement is asked for.
    assert len(core.schedule(1.0).spawn) == 1


def test_exit_with_only_the_head_in_flight_requeues_nothing() -> None:
    core, (w,) = started_pool(1)
    (t1, t2) = submit(core, 2)
    core.schedule(0.0)
    out = core.on_exit(w.wid, WorkerEnd(started=1))
    assert out.ended == [(t1, Fate.DIED)]
    assert list(core.queue) == [t2]
    assert not t2.claimed


def test_exit_of_unknown_worker_raises() -> None:
    core = PoolCore(1)
    with pytest.raises(KeyError):
        core.on_exit(42, WorkerEnd())


# ---------------------------------------------------------------------------------------------
# Startup failures
# ---------------------------------------------------------------------------------------------


def test_exits_before_ready_are_startup_failures() -> None:
    core = PoolCore(1, max_startup_failures=3)
    submit(core, 1)
    for attempt in range(3):
        assert not core.startup_failing
        (slot,) = core.schedule(float(attempt)).spawn
        out = core.on_exit(slot.wid, WorkerEnd())
        assert out.ended == [] and queue_ids(core) == [1]
    assert core.startup_failing
    # No more spawning: it would only loop.
    assert not core.schedule(10.0)
    assert core.workers == {}
    assert queue_ids(core) == [1]


def test_startup_failures_across_several_workers() -> None:
    core = PoolCore(4, max_startup_failures=2)
    submit(core, 4)
    slots = core.schedule(0.0).spawn
    assert len(slots) == 4
    core.on_exit(slots[0].wid, WorkerEnd())
    assert not core.startup_failing
    core.on_exit(slots[1].wid, WorkerEnd())
    assert core.startup_failing
    assert core.schedule(0.0).spawn == []


def test_ready_resets_startup_failures() -> None:
    core = PoolCore(2, max_startup_failures=2)
    submit(core, 2)
    a, b = core.schedule(0.0).spawn
    core.on_exit(a.wid, WorkerEnd())
    core.on_ready(b.wid, 1, 0.0)
    (c,) = core.schedule(0.0).spawn  # one task left for it after b took one
    core.on_exit(c.wid, WorkerEnd())
    assert not core.startup_failing  # one failure since the last READY, not two
    (d,) = core.schedule(0.0).spawn
    core.on_exit(d.wid, WorkerEnd())
    assert core.startup_failing


def test_crash_of_a_ready_worker_is_not_a_startup_failure() -> None:
    core, slots = started_pool(3, max_startup_failures=1)
    submit(core, 3)
    core.schedule(0.0)
    for s in slots:
        core.on_exit(s.wid, WorkerEnd(started=1))
    assert not core.startup_failing  # one failure would be enough with max_startup_failures=1


def test_startup_failing_still_feeds_ready_workers() -> None:
    core = PoolCore(2, max_startup_failures=1)
    submit(core, 2)
    a, b = core.schedule(0.0).spawn
    core.on_ready(a.wid, 1, 0.0)
    core.on_exit(b.wid, WorkerEnd())
    assert core.startup_failing
    actions = core.schedule(0.0)
    assert sent(actions) == {a.wid: [1]}
    assert actions.spawn == []


# ---------------------------------------------------------------------------------------------
# max_tasks_per_child
# ---------------------------------------------------------------------------------------------


def test_budget_closes_the_worker_and_never_over_assigns() -> None:
    core, (w,) = started_pool(1, max_tasks_per_child=3, batch_window=1.0)
    assert w.budget == 3
    core.avg_task_time = 0.0  # depth 64, but the budget wins
    submit(core, 10)
    actions = core.schedule(0.0)
    assert sent(actions) == {w.wid: [1, 2, 3]}
    assert actions.close == [w]
    assert w.state is WState.CLOSING
    assert w.budget == 0
    # While it finishes, nothing more goes to it and no extra worker exceeds max_workers.
    for seq in (1, 2):
        core.on_result(w.wid, seq, 0.0)
        assert not core.schedule(0.0)
    # Its last result is in: it only exits now, so a fresh worker with a fresh budget
    # replaces it already (it does not count against max_workers any more).
    core.on_result(w.wid, 3, 0.0)
    actions = core.schedule(0.0)
    (fresh,) = actions.spawn
    assert fresh.budget == 3 and not actions.send
    assert core.occupied() == 1 and len(core.workers) == 2
    # It exits on purpose: nothing lost, and nothing more is started.
    out = core.on_exit(w.wid, WorkerEnd(started=3))
    assert out.ended == []
    assert not core.schedule(0.0).spawn
    assert queue_ids(core) == [4, 5, 6, 7, 8, 9, 10]


def test_budget_spent_over_several_schedules() -> None:
    core, (w,) = started_pool(1, max_tasks_per_child=3)
    submit(core, 5)
    closes = []
    given: list[int] = []
    now = 0.0
    for _ in range(5):
        actions = core.schedule(now)
        closes.extend(actions.close)
        for _, tasks in actions.send:
            given.extend(t.id for t in tasks)
        if w.inflight:
            now += 1.0
            core.on_result(w.wid, w.inflight[0].seq, now)
    assert given == [1, 2, 3]
    assert closes == [w]  # closed exactly once, with its last task
    assert queue_ids(core) == [4, 5]


def test_budget_of_one_spreads_tasks_one_per_worker() -> None:
    core, slots = started_pool(3, max_tasks_per_child=1, batch_window=1.0)
    core.avg_task_time = 0.0
    submit(core, 5)
    actions = core.schedule(0.0)
    assert sent(actions) == {1: [1], 2: [2], 3: [3]}
    assert actions.close == slots
    assert all(s.state is WState.CLOSING for s in slots)
    assert actions.spawn == []  # the closing workers still hold all max_workers slots


def test_budget_counts_requeued_tasks_on_the_new_worker() -> None:
    core, (w1, w2) = started_pool(2, max_tasks_per_child=2, batch_window=1.0)
    core.avg_task_time = 0.0
    submit(core, 4)
    core.schedule(0.0)
    assert inflight_ids(w1) == [1, 3] and inflight_ids(w2) == [2, 4]
    core.on_exit(w1.wid, WorkerEnd(started=1))  # 1 died, 3 requeued
    (w3,) = core.schedule(0.0).spawn
    core.on_ready(w3.wid, 3, 0.0)
    actions = core.schedule(0.0)
    assert sent(actions) == {w3.wid: [3]}
    assert w3.budget == 1
    assert w3.state is WState.READY


# ---------------------------------------------------------------------------------------------
# Cancelling, draining, looking up
# ---------------------------------------------------------------------------------------------


def test_cancel_queued_keeps_claimed_tasks() -> None:
    core, (w1, w2) = started_pool(2, batch_window=1.0)
    core.avg_task_time = 0.5  # depth 2
    tasks = submit(core, 6)
    core.schedule(0.0)
    assert inflight_ids(w1) == [1, 3]
    core.on_exit(w1.wid, WorkerEnd(started=1))  # 3 requeued in front of 5, 6
    assert queue_ids(core) == [3, 5, 6]
    dropped = core.cancel_queued()
    # 3 is running already; 5 stays for the worker the pool may still start in w1's place.
    assert dropped == [tasks[5]]
    assert all(t.state is TState.DONE for t in dropped)
    assert queue_ids(core) == [3, 5]
    assert core.cancel_queued() == []
    assert queue_ids(core) == [3, 5]


def test_cancel_queued_keeps_what_free_workers_would_take() -> None:
    """As the stdlib pool runs what is in its call queue: on a cold pool, cancel_futures
    keeps one task per worker the pool may start, and one per idle or starting worker."""
    core = PoolCore(3)
    tasks = submit(core, 10)
    assert core.cancel_queued() == tasks[3:]
    assert queue_ids(core) == [1, 2, 3]

    core = PoolCore(3)
    submit(core, 2)
    w1, w2 = core.schedule(0.0).spawn
    ready(core, [w1, w2])
    core.schedule(0.0)
    assert inflight_ids(w1) == [1] and inflight_ids(w2) == [2]
    tasks = submit(core, 10, start=3)
    assert core.cancel_queued() == tasks[1:]  # one stays: the third worker may still start
    assert queue_ids(core) == [3]


def test_drain_queue() -> None:
    core, (w,) = started_pool(1)
    tasks = submit(core, 3)
    core.schedule(0.0)
    assert core.drain_queue() == tasks[1:]
    assert all(t.state is TState.DONE for t in tasks[1:])
    assert tasks[0].state is TState.SENT
    assert list(core.queue) == []
    assert inflight_ids(w) == [1]


def test_drain_all_takes_queued_and_in_flight() -> None:
    core, (w1, w2) = started_pool(2)
    tasks = submit(core, 5)
    core.schedule(0.0)
    assert not core.idle
    drained = core.drain_all()
    assert sorted(t.id for t in drained) == [1, 2, 3, 4, 5]
    assert len(drained) == len(tasks)
    assert all(t.state is TState.DONE for t in tasks)
    assert list(core.queue) == [] and list(w1.inflight) == [] and list(w2.inflight) == []
    assert core.idle
    assert core.drain_all() == []


def test_idle() -> None:
    core, (w,) = started_pool(1)
    assert core.idle
    submit(core, 1)
    assert not core.idle  # queued
    core.schedule(0.0)
    assert list(core.queue) == []
    assert not core.idle  # in flight
    core.on_result(w.wid, 1, 1.0)
    assert core.idle


def test_idle_workers_close_only_ready_workers_idle_long_enough() -> None:
    core, (w1, w2, w3) = started_pool(3, now=0.0)
    submit(core, 1)
    core.schedule(5.0)  # w1 busy since 5.0
    assert core.idle_workers(100.0, 10.0) == [w2, w3]
    assert w2.state is WState.CLOSING and w3.state is WState.CLOSING
    assert w1.state is WState.READY
    # Closing workers get no more tasks, even idle ones.
    submit(core, 2, start=2)
    assert core.schedule(100.0, spawn=False).send == []
    assert core.idle_workers(200.0, 10.0) == []  # something is queued: nobody goes


def test_idle_workers_waits_for_the_timeout_and_for_the_queue() -> None:
    core, (w,) = started_pool(1, now=0.0)
    submit(core, 1)
    core.schedule(1.0)
    core.on_result(w.wid, 1, 2.0)  # idle since 2.0
    assert core.idle_workers(11.9, 10.0) == []
    submit(core, 1, start=2)  # queued, not handed out yet: the idle worker is needed
    assert core.idle_workers(12.0, 10.0) == []
    assert w.state is WState.READY
    core.drain_queue()
    assert core.idle_workers(12.0, 10.0) == [w]
    assert core.idle_workers(50.0, 10.0) == []  # returned once


# ---------------------------------------------------------------------------------------------
# The task state table
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", list(TState))
@pytest.mark.parametrize("ev", list(Ev))
def test_move_follows_the_transition_table(state: TState, ev: Ev) -> None:
    task = Task(7, b"", state=state, wid=3, seq=9)
    target = TRANSITIONS.get((state, ev))
    if target is None:
        with pytest.raises(RuntimeError, match=f"task 7: no transition from {state.name} on"):
            PoolCore._move(task, ev)
        assert task.state is state  # unchanged
        assert (task.wid, task.seq) == (3, 9)
    else:
        PoolCore._move(task, ev)
        assert task.state is target
        # Back in the queue a task belongs to no worker; anywhere else it keeps its place.
        expected = (0, 0) if target is TState.QUEUED else (3, 9)
        assert (task.wid, task.seq) == expected


def test_transition_table_shape() -> None:
    states = {s for s, _ in TRANSITIONS} | set(TRANSITIONS.values())
    assert states == set(TState)
    # DONE is final: nothing leaves it.
    assert not [k for k in TRANSITIONS if k[0] is TState.DONE]
    # Only a sent task that was not being stopped goes back to the queue.
    assert [k for k, v in TRANSITIONS.items() if v is TState.QUEUED] == [(TState.SENT, Ev.REQUEUE)]
    # Every task can always be dropped (shutdown, broken pool) unless it already left.
    assert all(TRANSITIONS[(s, Ev.DROP)] is TState.DONE for s in TState if s is not TState.DONE)
    # A skip answers only a stop.
    assert [k for k in TRANSITIONS if k[1] is Ev.SKIP] == [(TState.STOPPING, Ev.SKIP)]


# ---------------------------------------------------------------------------------------------
# Stopping one task
# ---------------------------------------------------------------------------------------------


def test_stop_a_queued_task_dequeues_it() -> None:
    core, (w,) = started_pool(1)
    tasks = submit(core, 4)
    core.schedule(0.0)  # task 1 in flight
    exc = RuntimeError("killed")
    assert core.stop(tasks[2], exc) is StopAction.DEQUEUED
    assert tasks[2].state is TState.DONE
    assert tasks[2].stop_error is exc
    assert queue_ids(core) == [2, 4]
    # Once it left, a stop is too late and changes nothing.
    assert core.stop(tasks[2], RuntimeError("again")) is StopAction.TOO_LATE
    assert tasks[2].stop_error is exc
    # It is never handed out.
    core.on_result(w.wid, 1, 1.0)
    assert sent(core.schedule(1.0)) == {w.wid: [2]}
    core.on_result(w.wid, 2, 2.0)
    assert sent(core.schedule(2.0)) == {w.wid: [4]}


def test_stop_a_sent_task_asks_its_worker() -> None:
    core, (w1, w2) = started_pool(2)
    core.avg_task_time = 0.0
    tasks = submit(core, 4, start=31)
    core.schedule(0.0)
    t = tasks[3]  # task 34: seq 2 on w2
    first = RuntimeError("first")
    assert core.stop(t, first) is StopAction.ASK_WORKER
    assert (t.state, t.wid, t.seq) == (TState.STOPPING, w2.wid, 2)
    assert t.stop_error is first
    assert inflight_ids(w2) == [32, 34]  # still in flight: its outcome comes from w2
    # A second stop adds nothing: the first one's outcome will come.
    assert core.stop(t, RuntimeError("second")) is StopAction.PENDING
    assert t.stop_error is first
    assert t.state is TState.STOPPING


def test_stop_after_the_result_is_too_late() -> None:
    core, (w,) = started_pool(1)
    (t,) = submit(core, 1)
    core.schedule(0.0)
    core.on_result(w.wid, 1, 1.0)
    assert core.stop(t, RuntimeError("late")) is StopAction.TOO_LATE
    assert t.stop_error is None
    assert t.state is TState.DONE


def test_stop_after_a_drop_is_too_late() -> None:
    core, _ = started_pool(1)
    (t,) = submit(core, 1)
    core.drain_queue()
    assert core.stop(t, RuntimeError("late")) is StopAction.TOO_LATE
    assert t.stop_error is None


def test_a_result_still_settles_a_stopping_task() -> None:
    core, (w,) = started_pool(1)
    (t,) = submit(core, 1)
    core.schedule(0.0)
    core.stop(t, RuntimeError("killed"))
    assert core.on_result(w.wid, 1, 1.0) is t  # the stop came too late
    assert t.state is TState.DONE
    assert core.idle


def test_skipped_stopping_task_leaves_the_worker() -> None:
    core, (w,) = started_pool(1, batch_window=1.0)
    core.avg_task_time = 0.5  # depth 2
    t1, t2 = submit(core, 2, start=40)
    core.schedule(0.0)
    core.stop(t2, RuntimeError("killed"))
    core.on_result(w.wid, 1, 0.5)
    avg = core.avg_task_time
    assert core.on_skipped(w.wid, 2, 0.75) is t2
    assert t2.state is TState.DONE
    assert list(w.inflight) == []
    assert w.head_since == 0.75
    assert core.avg_task_time == avg  # a skip is not a service time
    assert core.idle


def test_skip_out_of_order_raises() -> None:
    core, (w,) = started_pool(1)
    core.avg_task_time = 0.0
    t1, t2 = submit(core, 2)
    core.schedule(0.0)
    core.stop(t2, RuntimeError("killed"))
    with pytest.raises(RuntimeError, match="answered task seq 2, expected 1"):
        core.on_skipped(w.wid, 2, 0.0)
    assert inflight_ids(w) == [1, 2]


def test_skip_of_a_task_never_stopped_raises() -> None:
    core, (w,) = started_pool(1)
    submit(core, 1)
    core.schedule(0.0)
    with pytest.raises(RuntimeError, match="no transition from SENT on SKIP"):
        core.on_skipped(w.wid, 1, 0.0)


def test_refused_skip_leaves_the_task_in_flight() -> None:
    """A refused answer must not take the task out of its worker (else nobody settles it)."""
    core, (w,) = started_pool(1)
    (t,) = submit(core, 1)
    core.schedule(0.0)
    with pytest.raises(RuntimeError):
        core.on_skipped(w.wid, 1, 0.0)
    assert list(w.inflight) == [t]


# ---------------------------------------------------------------------------------------------
# What a worker's exit decides
# ---------------------------------------------------------------------------------------------


def batch_of_four() -> tuple[PoolCore, WorkerSlot, list[Task]]:
    """One READY worker holding tasks 101..104 as seqs 1..4, and task 105 queued."""
    core, (w,) = started_pool(1, batch_window=1.0)
    core.avg_task_time = 0.25  # depth 4
    tasks = submit(core, 5, start=101)
    assert sent(core.schedule(0.0)) == {w.wid: [101, 102, 103, 104]}
    return core, w, tasks


@pytest.mark.parametrize(("timed_out", "fate"), [(False, Fate.STOPPED), (True, Fate.TIMED_OUT)])
def test_task_stopped_by_the_init_gets_its_fate(timed_out: bool, fate: Fate) -> None:
    core, w, tasks = batch_of_four()
    core.on_result(w.wid, 1, 0.1)
    core.stop(tasks[1], RuntimeError("killed"))
    out = core.on_exit(w.wid, WorkerEnd(started=2, stopped=2, timed_out=timed_out))
    assert ended(out) == [(102, fate)]
    assert queue_ids(core) == [103, 104, 105]


def test_deadline_stops_a_task_nobody_asked_to_stop() -> None:
    core, w, tasks = batch_of_four()
    out = core.on_exit(w.wid, WorkerEnd(started=1, stopped=1, timed_out=True))
    assert ended(out) == [(101, Fate.TIMED_OUT)]
    assert tasks[0].stop_error is None


def test_stop_reported_for_a_task_never_stopped_counts_as_died() -> None:
    core, w, _ = batch_of_four()
    out = core.on_exit(w.wid, WorkerEnd(started=1, stopped=1, timed_out=False))
    assert ended(out) == [(101, Fate.DIED)]


def test_every_started_task_without_an_answer_died() -> None:
    core, w, _ = batch_of_four()
    # Its answers for seqs 1 and 2 never came (a task closed the result pipe...).
    out = core.on_exit(w.wid, WorkerEnd(started=3))
    assert ended(out) == [(101, Fate.DIED), (102, Fate.DIED), (103, Fate.DIED)]
    assert queue_ids(core) == [104, 105]


def test_started_task_asked_to_stop_that_dies_is_stopped() -> None:
    core, w, tasks = batch_of_four()
    core.stop(tasks[0], RuntimeError("killed"))
    # The worker died (or was wiped) before its init could report the stop.
    out = core.on_exit(w.wid, WorkerEnd(started=1))
    assert ended(out) == [(101, Fate.STOPPED)]
    assert queue_ids(core) == [102, 103, 104, 105]


def test_unstarted_tasks_being_stopped_are_cancelled_not_requeued() -> None:
    core, w, tasks = batch_of_four()
    core.on_result(w.wid, 1, 0.1)
    core.stop(tasks[2], RuntimeError("killed"))  # seq 3, not started yet
    out = core.on_exit(w.wid, WorkerEnd(started=2))
    # In the order they were sent: the running one died, the stopped one never runs.
    assert ended(out) == [(102, Fate.DIED), (103, Fate.CANCELLED)]
    assert queue_ids(core) == [104, 105]
    assert tasks[2].state is TState.DONE
    assert (tasks[3].state, tasks[3].wid, tasks[3].seq) == (TState.QUEUED, 0, 0)


def test_exit_before_any_task_started_requeues_all_in_order() -> None:
    core, w, tasks = batch_of_four()
    out = core.on_exit(w.wid, WorkerEnd())
    assert out.ended == []
    assert list(core.queue) == tasks
    assert all(t.claimed for t in tasks[:4])


def test_forced_worker_cancels_what_it_had_not_started() -> None:
    core, w, tasks = batch_of_four()
    dropped = core.force("kill_workers()")
    assert dropped == [tasks[4]]
    assert w.forced == "kill_workers()"
    out = core.on_exit(w.wid, WorkerEnd(started=2))
    assert ended(out) == [
        (101, Fate.DIED),  # started, no answer
        (102, Fate.DIED),
        (103, Fate.CANCELLED),
        (104, Fate.CANCELLED),
    ]
    assert list(core.queue) == []
    assert all(t.state is TState.DONE for t in tasks)
    assert core.idle


def test_answered_tasks_are_not_decided_again_by_the_exit() -> None:
    core, w, tasks = batch_of_four()
    core.on_result(w.wid, 1, 0.1)
    core.on_result(w.wid, 2, 0.2)
    out = core.on_exit(w.wid, WorkerEnd(started=2))  # crashed between tasks
    assert out.ended == []
    assert queue_ids(core) == [103, 104, 105]


# ---------------------------------------------------------------------------------------------
# Forcing every worker down
# ---------------------------------------------------------------------------------------------


def test_force_drains_the_queue_and_marks_every_worker() -> None:
    core, (w1, w2) = started_pool(2)
    submit(core, 1)
    assert sent(core.schedule(0.0)) == {w1.wid: [1]}
    tasks = submit(core, 3, start=2)
    dropped = core.force("terminate_workers()")
    assert dropped == tasks
    assert all(t.state is TState.DONE for t in dropped)
    assert list(core.queue) == []
    assert w1.forced == w2.forced == "terminate_workers()"
    # The running task may still answer.
    core.on_result(w1.wid, 1, 1.0)
    assert core.idle


def test_forced_workers_get_no_tasks_and_hold_their_slots() -> None:
    core, (w1, w2) = started_pool(2)
    core.force("kill_workers()")
    submit(core, 2)
    actions = core.schedule(0.0)
    assert actions.send == []
    assert actions.spawn == []  # both slots still held by workers on their way out
    out = core.on_exit(w1.wid, WorkerEnd())
    assert out.ended == [] and queue_ids(core) == [1, 2]
    # A fresh worker is not forced and gets the tasks once ready.
    (fresh,) = core.schedule(1.0).spawn
    assert fresh.forced is None
    core.on_ready(fresh.wid, 7, 1.0)
    assert sent(core.schedule(1.0, spawn=False)) == {fresh.wid: [1]}
    assert w2.forced == "kill_workers()"


def test_forced_worker_still_starting_gets_no_task_once_ready() -> None:
    core = PoolCore(1)
    submit(core, 1)
    (w,) = core.schedule(0.0).spawn
    core.force("kill_workers()")
    core.on_ready(w.wid, 5, 0.0)
    submit(core, 1, start=2)
    assert not core.schedule(0.0)
    assert queue_ids(core) == [2]


def test_no_batching_while_the_pool_could_start_a_worker() -> None:
    """The batching trap: one warm worker, short tasks so far, and room for seven more
    workers: eight new tasks must not queue behind each other in the warm one."""
    core = PoolCore(8, batch_window=1.0)
    submit(core, 1)
    (w1,) = core.schedule(0.0).spawn
    ready(core, [w1])
    core.schedule(0.0)
    core.on_result(w1.wid, 1, 0.001)  # tasks look tiny: depth would allow batches
    assert core.depth() > 1
    submit(core, 8, start=2)
    actions = core.schedule(0.0)
    assert sent(actions) == {w1.wid: [2]}
    assert len(actions.spawn) == 7
    ready(core, actions.spawn[:6])
    actions = core.schedule(0.0)  # one worker still starting: still one task per worker
    assert sorted(len(ts) for _, ts in actions.send) == [1] * 6
    assert queue_ids(core) == [9]
