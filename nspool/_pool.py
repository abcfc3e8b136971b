"""Pool core: worker slots, the task queue and the task -> worker bookkeeping.

No I/O, no threads, no clocks: the fronts (``executor.py``, ``aio.py``) feed it events (a task
was submitted, a worker is ready, a result arrived, a worker exited, the time is now ``t``) and
perform the actions it returns (spawn worker N, send these tasks to worker M, close worker K).
That keeps every scheduling rule testable without a process.
"""

from __future__ import annotations

import enum
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import TaskTimeoutError


def default_max_workers() -> int:
    """The stdlib's default: the CPUs this process may use."""
    return max(getattr(os, "process_cpu_count", os.cpu_count)() or 1, 1)


class WState(enum.Enum):
    STARTING = "starting"  #: spawn requested, READY not yet seen
    READY = "ready"  #: accepting tasks
    CLOSING = "closing"  #: has all the tasks it will ever get; finishes them, then exits
    DEAD = "dead"


@dataclass(eq=False)
class Task:
    """One call on its way through the pool. ``handle`` belongs to the front (a Future...)."""

    id: int
    payload: bytes
    handle: Any = None
    #: handed to a worker at least once (its future is running and cannot be cancelled)
    started: bool = False
    #: seconds this task may run once its worker starts it (None: no limit)
    timeout: float | None = None
    #: set when the task is being killed (hard cancel, deadline): how its caller is failed
    fail_with: BaseException | None = None


@dataclass(eq=False)
class WorkerSlot:
    wid: int
    state: WState = WState.STARTING
    #: tasks written to this worker and not yet answered; the head is the one running
    inflight: deque[Task] = field(default_factory=deque)
    #: tasks this worker may still be given (``max_tasks_per_child``); None = unlimited
    budget: int | None = None
    pid: int = 0
    #: when the head of ``inflight`` started, or when the worker went idle
    head_since: float = 0.0
    #: a kill of this worker was requested (the head task is being stopped)
    killing: bool = False


@dataclass
class Actions:
    """What the front must do after an event, in this order."""

    spawn: list[WorkerSlot] = field(default_factory=list)
    send: list[tuple[WorkerSlot, list[Task]]] = field(default_factory=list)
    #: workers whose task stream ends here: close their task pipe after the sends
    close: list[WorkerSlot] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.spawn or self.send or self.close)


@dataclass
class ExitOutcome:
    """What a worker's exit means for its tasks."""

    slot: WorkerSlot
    #: the task it was running when it died (fails), or None if it died idle or on purpose
    lost: Task | None
    #: tasks it had been given but had not started: they went back to the queue
    requeued: int
    #: whether it died before it ever became ready
    during_startup: bool


class PoolCore:
    """Scheduling state of one pool.

    ``claim(task)`` is called just before a task is handed to a worker; it returns False when
    the front's future was cancelled meanwhile, and the task is dropped.

    Batching: a worker may hold more than one task, but only as much queued work as fits in
    ``batch_window`` seconds at the current average task time, at most ``max_batch`` tasks. Short
    tasks thus travel many to a frame; long tasks go one at a time so no worker hoards work.
    """

    def __init__(
        self,
        max_workers: int | None,
        *,
        max_tasks_per_child: int | None = None,
        claim: Callable[[Task], bool] = lambda task: True,
        max_batch: int = 64,
        batch_window: float = 0.002,
        max_startup_failures: int = 3,
    ) -> None:
        # Both fronts take their argument checks from here, before any process starts.
        if max_workers is None:
            max_workers = default_max_workers()
        if max_workers < 1:
            raise ValueError("max_workers must be greater than 0")
        if max_tasks_per_child is not None and max_tasks_per_child < 1:
            raise ValueError("max_tasks_per_child must be >= 1")
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.max_workers = max_workers
        self.max_tasks_per_child = max_tasks_per_child
        self.claim = claim
        self.max_batch = max_batch
        self.batch_window = batch_window
        self.max_startup_failures = max_startup_failures
        self.queue: deque[Task] = deque()
        self.workers: dict[int, WorkerSlot] = {}
        self.avg_task_time: float | None = None
        self._next_wid = 1
        self._startup_failures = 0
        #: tasks in the pool with a deadline or a pending kill: heads_to_kill has work only then
        self.watched = 0

    # -- queries ------------------------------------------------------------------------------
    @property
    def idle(self) -> bool:
        """No task queued or in flight."""
        return not self.queue and not any(w.inflight for w in self.workers.values())

    def depth(self) -> int:
        """How many tasks one worker may hold right now."""
        avg = self.avg_task_time
        if avg is None or avg >= self.batch_window:
            return 1
        return max(1, min(self.max_batch, int(self.batch_window / max(avg, 1e-7))))

    # -- events -------------------------------------------------------------------------------
    def submit(self, task: Task) -> None:
        if task.timeout is not None:
            self.watched += 1
        self.queue.append(task)

    def _leave(self, task: Task) -> Task:
        """A task leaves the pool (answered, lost or drained)."""
        if task.timeout is not None or task.fail_with is not None:
            self.watched -= 1
        return task

    def doom(self, task: Task, exc: BaseException) -> None:
        """Mark a task to be failed with ``exc`` (and its worker killed if it runs)."""
        if task.timeout is None and task.fail_with is None:
            self.watched += 1
        task.fail_with = exc

    def on_ready(self, wid: int, pid: int, now: float) -> None:
        slot = self.workers[wid]
        slot.pid = pid
        if slot.state is WState.STARTING:
            slot.state = WState.READY
        slot.head_since = now
        self._startup_failures = 0

    def on_result(self, wid: int, task_id: int, now: float) -> Task:
        """A worker answered its head task; returns it. Updates the service-time estimate."""
        slot = self.workers[wid]
        if not slot.inflight or slot.inflight[0].id != task_id:
            expected = slot.inflight[0].id if slot.inflight else None
            raise RuntimeError(f"worker {wid} answered task {task_id}, expected {expected}")
        task = self._leave(slot.inflight.popleft())
        took = max(now - slot.head_since, 0.0)
        avg = self.avg_task_time
        self.avg_task_time = took if avg is None else avg + 0.2 * (took - avg)
        slot.head_since = now
        return task

    def on_exit(self, wid: int) -> ExitOutcome:
        """A worker is gone. Its running task is lost; tasks it had not started are requeued."""
        slot = self.workers.pop(wid)
        during_startup = slot.state is WState.STARTING
        slot.state = WState.DEAD
        lost = self._leave(slot.inflight.popleft()) if slot.inflight else None
        rest = list(slot.inflight)
        slot.inflight.clear()
        self.queue.extendleft(reversed(rest))
        if during_startup:
            self._startup_failures += 1
        return ExitOutcome(slot, lost, len(rest), during_startup)

    @property
    def startup_failing(self) -> bool:
        """Workers keep dying before they become ready: spawning more would only loop."""
        return self._startup_failures >= self.max_startup_failures

    def take_task(self, task_id: int) -> tuple[Task, WorkerSlot | None] | None:
        """Find a task by id: drop it from the queue, or tell which worker holds it."""
        for t in self.queue:
            if t.id == task_id:
                self.queue.remove(t)
                return self._leave(t), None
        for w in self.workers.values():
            for t in w.inflight:
                if t.id == task_id:
                    return t, w
        return None

    def heads_to_kill(self, now: float) -> tuple[list[WorkerSlot], float | None]:
        """Workers whose running task must be stopped now (hard-cancelled, or past its
        deadline), and the next moment a deadline falls due (None if none is pending).

        A task that was hard-cancelled while it waited in a worker's pipe is stopped the moment
        it becomes that worker's head: the tasks behind it are requeued, not lost."""
        kill: list[WorkerSlot] = []
        next_due: float | None = None
        if not self.watched:
            return kill, next_due
        for w in self.workers.values():
            if not w.inflight or w.killing or w.state is WState.STARTING:
                continue
            head = w.inflight[0]
            if head.fail_with is None and head.timeout is not None:
                due = w.head_since + head.timeout
                if now >= due:
                    head.fail_with = TaskTimeoutError(
                        f"the task ran longer than its {head.timeout:g} s deadline; its "
                        "worker and every process it started were killed"
                    )
                else:
                    next_due = due if next_due is None else min(next_due, due)
            if head.fail_with is not None:
                w.killing = True
                kill.append(w)
        return kill, next_due

    def idle_workers(self, now: float, idle_timeout: float) -> list[WorkerSlot]:
        """Ready workers idle for ``idle_timeout`` seconds while nothing is queued: they are
        marked closing and returned (the front closes their task pipe)."""
        if self.queue:
            return []
        out = []
        for w in self.workers.values():
            if w.state is WState.READY and not w.inflight and now - w.head_since >= idle_timeout:
                w.state = WState.CLOSING
                out.append(w)
        return out

    def drain_queue(self) -> list[Task]:
        """Remove and return every queued (not yet sent) task."""
        tasks = [self._leave(t) for t in self.queue]
        self.queue.clear()
        return tasks

    def drain_all(self) -> list[Task]:
        """Remove and return every task, queued or in flight (the pool is going away)."""
        tasks = self.drain_queue()
        for w in self.workers.values():
            tasks.extend(self._leave(t) for t in w.inflight)
            w.inflight.clear()
        return tasks

    def cancel_queued(self) -> list[Task]:
        """Remove and return queued tasks never handed to a worker (``cancel_futures``);
        tasks requeued after their worker died are already running and stay."""
        keep = [t for t in self.queue if t.started]
        dropped = [self._leave(t) for t in self.queue if not t.started]
        self.queue.clear()
        self.queue.extend(keep)
        return dropped

    def _claim_next(self) -> Task | None:
        queue = self.queue
        while queue:
            task = queue.popleft()
            if task.started or self.claim(task):
                task.started = True
                return task
            self._leave(task)
        return None

    # -- decisions ----------------------------------------------------------------------------
    def schedule(self, now: float, *, spawn: bool = True) -> Actions:
        """Hand queued tasks to workers with room, and ask for workers that are missing."""
        actions = Actions()
        queue = self.queue
        if queue:
            # A worker being killed gets nothing more: it would only be requeued.
            cap = self.depth()
            room = [
                w
                for w in self.workers.values()
                if w.state is WState.READY
                and not w.killing
                and len(w.inflight) < cap
                and w.budget != 0
            ]
            if room:
                batches: dict[int, list[Task]] = {}
                # Fill level by level so tasks spread evenly over the workers.
                level = min(len(w.inflight) for w in room) + 1
                while queue and level <= cap:
                    for w in room:
                        if not queue:
                            break
                        if len(w.inflight) >= level or w.budget == 0:
                            continue
                        task = self._claim_next()
                        if task is None:
                            break
                        if not w.inflight:
                            w.head_since = now
                        w.inflight.append(task)
                        batches.setdefault(w.wid, []).append(task)
                        if w.budget is not None:
                            w.budget -= 1
                            if w.budget == 0:
                                w.state = WState.CLOSING
                                actions.close.append(w)
                    level += 1
                actions.send = [(self.workers[wid], ts) for wid, ts in batches.items()]
        if spawn and queue and not self.startup_failing:
            starting = sum(1 for w in self.workers.values() if w.state is WState.STARTING)
            live = len(self.workers)
            want = min(len(queue) - starting, self.max_workers - live)
            for _ in range(max(want, 0)):
                slot = WorkerSlot(self._next_wid, budget=self.max_tasks_per_child)
                self._next_wid += 1
                self.workers[slot.wid] = slot
                actions.spawn.append(slot)
        return actions
