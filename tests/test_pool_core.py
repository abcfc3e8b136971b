"""Scheduling rules of the pool core, without processes: events in, actions out."""

from __future__ import annotations

import random

import pytest

from nspool._pool import Actions, PoolCore, Task, WorkerSlot, WState


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
    core.on_exit(slot.wid)
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


def test_sent_tasks_are_in_flight_and_started() -> None:
    core, (w,) = started_pool(1)
    (task,) = submit(core, 1)
    assert not task.started
    actions = core.schedule(5.0)
    ((slot, tasks),) = actions.send
    assert slot is w and tasks == [task]
    assert task.started
    assert list(w.inflight) == [task]
    assert w.head_since == 5.0
    assert not core.idle


def test_fifo_order() -> None:
    core, (w,) = started_pool(1)
    submit(core, 6)
    order = []
    now = 0.0
    while not core.idle:
        for _, tasks in core.schedule(now).send:
            order.extend(t.id for t in tasks)
        now += 1.0  # slow tasks: depth stays 1
        core.on_result(w.wid, w.inflight[0].id, now)
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
    assert [t.started for t in tasks] == [True, False, False, True, False, True]


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
    t1.started = t2.started = True
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
    core.on_result(w2.wid, 2, 0.0)
    core.on_result(w2.wid, 4, 0.0)
    core.avg_task_time = 0.3  # depth 3
    submit(core, 4, start=5)
    # Level 1 and 2: only the empty w2 has room; level 3: both.
    assert sent(core.schedule(0.0)) == {w1.wid: [7], w2.wid: [5, 6, 8]}
    assert inflight_ids(w1) == [1, 3, 7]


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


def test_result_for_the_wrong_task_raises() -> None:
    core, (w,) = started_pool(1)
    core.avg_task_time = 0.0
    submit(core, 2)
    core.schedule(0.0)
    with pytest.raises(RuntimeError, match="answered task 2, expected 1"):
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

    out = core.on_exit(w1.wid)
    assert out.slot is w1
    assert out.lost is tasks[0]
    assert out.requeued == 3
    assert not out.during_startup
    assert w1.state is WState.DEAD
    assert list(w1.inflight) == []
    assert w1.wid not in core.workers
    assert w1.wid not in core.workers
    # The tasks it had not started go first, in their order, already marked started.
    assert queue_ids(core) == [3, 5, 7, 9, 10]
    assert all(t.started for t in list(core.queue)[:3])
    assert not any(t.started for t in list(core.queue)[3:])
    # The other worker is untouched.
    assert inflight_ids(w2) == [2, 4, 6, 8]


def test_requeued_tasks_go_to_the_next_worker_first() -> None:
    core, (w1, w2) = started_pool(2, batch_window=1.0)
    core.avg_task_time = 0.25
    submit(core, 10)
    core.schedule(0.0)
    core.on_exit(w1.wid)
    # w2 finishes its batch; requeued 3, 5, 7 go out before 9 and 10.
    for tid in (2, 4, 6, 8):
        core.on_result(w2.wid, tid, 0.0)
    core.avg_task_time = 0.25
    actions = core.schedule(0.0, spawn=False)
    assert sent(actions) == {w2.wid: [3, 5, 7, 9]}
    assert queue_ids(core) == [10]


def test_exit_of_an_idle_worker_loses_nothing() -> None:
    core, (w,) = started_pool(1)
    submit(core, 2)
    out = core.on_exit(w.wid)
    assert out.lost is None
    assert out.requeued == 0
    assert not out.during_startup
    assert queue_ids(core) == [1, 2]
    assert not core.startup_failing
    # A replacement is asked for.
    assert len(core.schedule(1.0).spawn) == 1


def test_exit_with_only_the_head_in_flight_requeues_nothing() -> None:
    core, (w,) = started_pool(1)
    (t1, t2) = submit(core, 2)
    core.schedule(0.0)
    out = core.on_exit(w.wid)
    assert out.lost is t1
    assert out.requeued == 0
    assert list(core.queue) == [t2]
    assert not t2.started


def test_exit_of_unknown_worker_raises() -> None:
    core = PoolCore(1)
    with pytest.raises(KeyError):
        core.on_exit(42)


# ---------------------------------------------------------------------------------------------
# Startup failures
# ---------------------------------------------------------------------------------------------


def test_exits_before_ready_are_startup_failures() -> None:
    core = PoolCore(1, max_startup_failures=3)
    submit(core, 1)
    for attempt in range(3):
        assert not core.startup_failing
        (slot,) = core.schedule(float(attempt)).spawn
        out = core.on_exit(slot.wid)
        assert out.during_startup
        assert out.lost is None and out.requeued == 0
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
    core.on_exit(slots[0].wid)
    assert not core.startup_failing
    core.on_exit(slots[1].wid)
    assert core.startup_failing
    assert core.schedule(0.0).spawn == []


def test_ready_resets_startup_failures() -> None:
    core = PoolCore(2, max_startup_failures=2)
    submit(core, 2)
    a, b = core.schedule(0.0).spawn
    core.on_exit(a.wid)
    core.on_ready(b.wid, 1, 0.0)
    (c,) = core.schedule(0.0).spawn  # one task left for it after b took one
    core.on_exit(c.wid)
    assert not core.startup_failing  # one failure since the last READY, not two
    (d,) = core.schedule(0.0).spawn
    core.on_exit(d.wid)
    assert core.startup_failing


def test_crash_of_a_ready_worker_is_not_a_startup_failure() -> None:
    core, slots = started_pool(3, max_startup_failures=1)
    submit(core, 3)
    core.schedule(0.0)
    for s in slots:
        assert not core.on_exit(s.wid).during_startup
    assert not core.startup_failing


def test_startup_failing_still_feeds_ready_workers() -> None:
    core = PoolCore(2, max_startup_failures=1)
    submit(core, 2)
    a, b = core.schedule(0.0).spawn
    core.on_ready(a.wid, 1, 0.0)
    core.on_exit(b.wid)
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
    for tid in (1, 2, 3):
        core.on_result(w.wid, tid, 0.0)
        assert not core.schedule(0.0)
    assert w not in [s for s, _ in core.schedule(0.0).send]
    # It exits on purpose: nothing lost, and a fresh worker with a fresh budget replaces it.
    out = core.on_exit(w.wid)
    assert out.lost is None and out.requeued == 0
    (fresh,) = core.schedule(0.0).spawn
    assert fresh.budget == 3
    assert queue_ids(core) == [4, 5, 6, 7, 8, 9, 10]


def test_budget_spent_over_several_schedules() -> None:
    core, (w,) = started_pool(1, max_tasks_per_child=3)
    submit(core, 5)
    closes = []
    given = []
    now = 0.0
    for _ in range(5):
        actions = core.schedule(now)
        closes.extend(actions.close)
        for _, tasks in actions.send:
            given.extend(t.id for t in tasks)
        if w.inflight:
            now += 1.0
            core.on_result(w.wid, w.inflight[0].id, now)
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
    core.on_exit(w1.wid)  # 1 lost, 3 requeued
    (w3,) = core.schedule(0.0).spawn
    core.on_ready(w3.wid, 3, 0.0)
    actions = core.schedule(0.0)
    assert sent(actions) == {w3.wid: [3]}
    assert w3.budget == 1
    assert w3.state is WState.READY


# ---------------------------------------------------------------------------------------------
# Cancelling, draining, looking up
# ---------------------------------------------------------------------------------------------


def test_cancel_queued_keeps_started_tasks() -> None:
    core, (w1, w2) = started_pool(2, batch_window=1.0)
    core.avg_task_time = 0.5  # depth 2
    tasks = submit(core, 6)
    core.schedule(0.0)
    assert inflight_ids(w1) == [1, 3]
    core.on_exit(w1.wid)  # 3 requeued in front of 5, 6
    assert queue_ids(core) == [3, 5, 6]
    dropped = core.cancel_queued()
    assert dropped == [tasks[4], tasks[5]]
    assert queue_ids(core) == [3]
    assert core.cancel_queued() == []
    assert queue_ids(core) == [3]


def test_drain_queue() -> None:
    core, (w,) = started_pool(1)
    tasks = submit(core, 3)
    core.schedule(0.0)
    assert core.drain_queue() == tasks[1:]
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
    assert list(core.queue) == [] and list(w1.inflight) == [] and list(w2.inflight) == []
    assert core.idle
    assert core.drain_all() == []


def test_take_task_from_the_queue() -> None:
    core, (w,) = started_pool(1)
    tasks = submit(core, 3)
    core.schedule(0.0)  # task 1 in flight
    assert core.take_task(3) == (tasks[2], None)
    assert queue_ids(core) == [2]
    assert core.take_task(3) is None


def test_take_task_in_flight_stays_put() -> None:
    core, (w,) = started_pool(1)
    tasks = submit(core, 2)
    core.schedule(0.0)
    assert core.take_task(1) == (tasks[0], w)
    assert inflight_ids(w) == [1]  # only found, not removed
    assert core.take_task(404) is None


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


# ---------------------------------------------------------------------------------------------
# A long random run: invariants hold whatever the order of events
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(25))
@pytest.mark.parametrize("per_child", [None, 1, 3])
def test_random_event_sequences_keep_invariants(seed: int, per_child: int | None) -> None:
    rng = random.Random(seed)
    max_workers = rng.randint(1, 4)
    cancelled: set[int] = set()
    claimed: list[int] = []

    def claim(task: Task) -> bool:
        claimed.append(task.id)
        return task.id not in cancelled

    core = PoolCore(
        max_workers, max_tasks_per_child=per_child, claim=claim, max_batch=5, batch_window=1.0
    )
    given: dict[int, int] = {}  # wid -> tasks handed to it
    sends: dict[int, int] = {}  # task id -> times sent
    finished: dict[int, str] = {}  # task id -> "ok" | "lost"
    next_id = 1
    now = 0.0

    def schedule() -> None:
        actions = core.schedule(now)
        for slot, tasks in actions.send:
            assert slot.state in (WState.READY, WState.CLOSING)
            assert tasks and all(t.started for t in tasks)
            given[slot.wid] = given.get(slot.wid, 0) + len(tasks)
            if per_child is not None:
                assert given[slot.wid] <= per_child
            for t in tasks:
                sends[t.id] = sends.get(t.id, 0) + 1
                assert t.id not in finished
        for slot in actions.close:
            assert slot.state is WState.CLOSING
            assert per_child is not None and given[slot.wid] == per_child
        assert len(core.workers) <= max_workers

    requeued: dict[int, int] = {}  # task id -> times requeued after a crash

    def exit_worker(w: WorkerSlot) -> None:
        rest = [t.id for t in list(w.inflight)[1:]]
        out = core.on_exit(w.wid)
        assert out.requeued == len(rest)
        assert [t.id for t in list(core.queue)[: len(rest)]] == rest
        for tid in rest:
            requeued[tid] = requeued.get(tid, 0) + 1
        if out.lost is not None:
            finish(out.lost.id, "lost")

    def finish(tid: int, how: str) -> None:
        assert tid not in finished
        finished[tid] = how

    for _ in range(300):
        event = rng.random()
        if event < 0.3:
            core.submit(Task(next_id, b""))
            if rng.random() < 0.1:
                cancelled.add(next_id)
            next_id += 1
        elif event < 0.45:
            starting = [w for w in core.workers.values() if w.state is WState.STARTING]
            if starting:
                core.on_ready(rng.choice(starting).wid, 1, now)
        elif event < 0.8:
            busy = [w for w in core.workers.values() if w.inflight]
            if busy:
                w = rng.choice(busy)
                now += rng.choice([0.0, 0.01, 0.3, 2.0])
                finish(core.on_result(w.wid, w.inflight[0].id, now).id, "ok")
        elif event < 0.87:
            # A crash, but never before READY (startup failures are tested on their own).
            live = [w for w in core.workers.values() if w.state is not WState.STARTING]
            if live:
                exit_worker(rng.choice(live))
        else:
            # Closing workers that are done exit on purpose.
            for w in list(core.workers.values()):
                if w.state is WState.CLOSING and not w.inflight:
                    exit_worker(w)
        schedule()

    # Let the pool finish everything.
    for _ in range(10_000):
        if core.idle:
            break
        for w in list(core.workers.values()):
            if w.state is WState.STARTING:
                core.on_ready(w.wid, 1, now)
            elif w.inflight:
                finish(core.on_result(w.wid, w.inflight[0].id, now).id, "ok")
            elif w.state is WState.CLOSING:
                exit_worker(w)
        schedule()
    assert core.idle

    submitted = list(range(1, next_id))
    # Every task was claimed exactly once, in submission order (requeued ones are not
    # claimed again).
    assert claimed == submitted
    # Every task not cancelled ended exactly once (done or lost); cancelled ones were never sent.
    assert set(finished) == {i for i in submitted if i not in cancelled}
    assert not (set(sends) & cancelled)
    # A task is sent again only after its worker died before starting it.
    for tid, n in sends.items():
        assert n == 1 + requeued.get(tid, 0)


def test_watched_counts_only_tasks_with_deadlines_or_pending_kills() -> None:
    core = PoolCore(1)
    timed = Task(1, b"", timeout=5.0)
    plain = Task(2, b"")
    core.submit(timed)
    core.submit(plain)
    assert core.watched == 1
    actions = core.schedule(0.0)
    core.on_ready(actions.spawn[0].wid, 10, 0.0)
    core.schedule(0.0)
    wid = actions.spawn[0].wid
    core.doom(plain, RuntimeError("killed"))
    assert core.watched == 2
    assert core.heads_to_kill(1.0) == ([], 5.0)  # the timed head is not due yet
    core.on_result(wid, 1, 2.0)
    assert core.watched == 1
    core.schedule(2.0)
    kill, _ = core.heads_to_kill(2.0)  # the doomed task is now the head
    assert [w.wid for w in kill] == [wid]
    core.on_exit(wid)
    assert core.watched == 0
    assert core.heads_to_kill(3.0) == ([], None)
