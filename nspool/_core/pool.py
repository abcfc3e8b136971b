"""Pool core: worker slots, the task queue and the task -> worker bookkeeping.

No I/O, no threads, no clocks: the fronts (``executor.py``, ``aio.py``) feed it events (a task
was submitted, a worker is ready, a result arrived, a worker exited, a task must stop) and
perform the actions it returns (spawn worker N, send these tasks to worker M, ask worker K to
stop task S, close worker J). That keeps every scheduling rule testable without a process.

A task's life is the table ``TRANSITIONS`` below and nothing else: every change of
``Task.state`` goes through :meth:`PoolCore._move`, which refuses a move the table lacks.
"""

from __future__ import annotations

import enum
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .protocol import STATE_SLOTS


def default_max_workers() -> int:
    """The stdlib's default: the CPUs this process may use."""
    return max(getattr(os, "process_cpu_count", os.cpu_count)() or 1, 1)


class TState(enum.Enum):
    """Where a task is."""

    # Members are singletons: hash by identity, in C (Enum's own __hash__ is Python code,
    # and TRANSITIONS is looked up on every move of every task).
    __hash__ = object.__hash__

    QUEUED = "queued"  #: in the pool's queue, in no worker
    SENT = "sent"  #: written to a worker; its outcome will come from that worker
    STOPPING = "stopping"  #: sent, and that worker was asked to stop it
    DONE = "done"  #: left the pool; its front settles it (exactly once)


class Ev(enum.Enum):
    """What happens to a task."""

    __hash__ = object.__hash__  # as TState's

    SEND = "send"  #: handed to a worker (its seq there is set)
    STOP = "stop"  #: kill()/cancellation: dequeued, or its worker asked to stop it
    RESULT = "result"  #: its worker answered it (it ran to the end)
    SKIP = "skip"  #: its worker skipped it: stopped before it started
    END = "end"  #: its worker is gone, and it had started (or been stopped) there
    REQUEUE = "requeue"  #: its worker is gone before it started it: back to the queue
    DROP = "drop"  #: taken out without running (cancel_futures, shutdown, broken pool)


#: The whole life of a task. A stopped task never goes back to the queue; a task that has not
#: been sent can only be dropped or stopped, which settles it at once.
TRANSITIONS: dict[tuple[TState, Ev], TState] = {
    (TState.QUEUED, Ev.SEND): TState.SENT,
    (TState.QUEUED, Ev.STOP): TState.DONE,
    (TState.QUEUED, Ev.DROP): TState.DONE,
    (TState.SENT, Ev.STOP): TState.STOPPING,
    (TState.SENT, Ev.RESULT): TState.DONE,
    (TState.SENT, Ev.END): TState.DONE,
    (TState.SENT, Ev.REQUEUE): TState.QUEUED,
    (TState.SENT, Ev.DROP): TState.DONE,
    (TState.STOPPING, Ev.RESULT): TState.DONE,
    (TState.STOPPING, Ev.SKIP): TState.DONE,
    (TState.STOPPING, Ev.END): TState.DONE,
    (TState.STOPPING, Ev.DROP): TState.DONE,
}


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
    #: seconds this task may run once it starts (None: no limit)
    timeout: float | None = None
    state: TState = TState.QUEUED
    #: the front's claim succeeded: its future runs and can no longer be cancelled
    claimed: bool = False
    #: while SENT or STOPPING: its worker and its seq there (1, 2, ... in the order sent)
    wid: int = 0
    seq: int = 0
    #: how its caller fails if the stop takes effect (set by :meth:`PoolCore.stop`)
    stop_error: BaseException | None = None


@dataclass(eq=False)
class WorkerSlot:
    wid: int
    state: WState = WState.STARTING
    #: tasks written to this worker and not yet answered, in the order written
    inflight: deque[Task] = field(default_factory=deque)
    #: tasks this worker may still be given (``max_tasks_per_child``); None = unlimited
    budget: int | None = None
    pid: int = 0
    #: when the head of ``inflight`` started, or when the worker went idle
    head_since: float = 0.0
    #: the seq of the last task written to it
    last_seq: int = 0
    #: being stopped as a whole (``kill_workers()``...): why; it gets no more tasks, and on its
    #: exit the tasks it had not started are cancelled instead of requeued
    forced: str | None = None


@dataclass
class Actions:
    """What the front must do after an event, in this order."""

    spawn: list[WorkerSlot] = field(default_factory=list)
    send: list[tuple[WorkerSlot, list[Task]]] = field(default_factory=list)
    #: workers whose task stream ends here: close their task pipe after the sends
    close: list[WorkerSlot] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.spawn or self.send or self.close)


class StopAction(enum.Enum):
    """What :meth:`PoolCore.stop` did."""

    DEQUEUED = "dequeued"  #: it was queued: it is DONE, settle it now
    ASK_WORKER = "ask_worker"  #: ask worker ``task.wid`` to stop seq ``task.seq``
    PENDING = "pending"  #: a stop was already asked; its outcome will come
    TOO_LATE = "too_late"  #: it had already left the pool


@dataclass(frozen=True)
class WorkerEnd:
    """What a dead worker left in its state block, as the core needs it."""

    #: seq of the last task the worker started (0: none)
    started: int = 0
    #: seq of the task its init stopped (0: none), and whether for its deadline
    stopped: int = 0
    timed_out: bool = False


class Fate(enum.Enum):
    """How a task that was in a dead worker ends."""

    STOPPED = "stopped"  #: its stop took effect: fail it with ``task.stop_error``
    TIMED_OUT = "timed_out"  #: its deadline took effect
    DIED = "died"  #: it was running when its worker died: WorkerDiedError
    CANCELLED = "cancelled"  #: it never started and must not run (stopped, or forced down)


@dataclass
class ExitOutcome:
    """What a worker's exit means for its tasks (those it had not started went back to the
    front of the queue)."""

    #: tasks that end with the worker, in the order they were sent
    ended: list[tuple[Task, Fate]]


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
        if not 1 <= max_batch < STATE_SLOTS:
            raise ValueError(f"max_batch must be >= 1 and < {STATE_SLOTS}")
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

    @property
    def startup_failing(self) -> bool:
        """Workers keep dying before they become ready: spawning more would only loop."""
        return self._startup_failures >= self.max_startup_failures

    # -- the one place a task changes state ---------------------------------------------------
    @staticmethod
    def _next_state(task: Task, ev: Ev) -> TState:
        new = TRANSITIONS.get((task.state, ev))
        if new is None:
            raise RuntimeError(f"task {task.id}: no transition from {task.state.name} on {ev.name}")
        return new

    @classmethod
    def _move(cls, task: Task, ev: Ev) -> None:
        new = cls._next_state(task, ev)
        task.state = new
        if new is TState.QUEUED:
            task.wid = task.seq = 0

    # -- events -------------------------------------------------------------------------------
    def submit(self, task: Task) -> None:
        if task.state is not TState.QUEUED:
            raise RuntimeError(f"task {task.id} submitted twice")
        self.queue.append(task)

    def on_ready(self, wid: int, pid: int, now: float) -> None:
        slot = self.workers[wid]
        slot.pid = pid
        if slot.state is WState.STARTING:
            slot.state = WState.READY
        slot.head_since = now
        self._startup_failures = 0

    def _answered(self, wid: int, seq: int, ev: Ev) -> Task:
        slot = self.workers[wid]
        if not slot.inflight or slot.inflight[0].seq != seq:
            expected = slot.inflight[0].seq if slot.inflight else None
            raise RuntimeError(f"worker {wid} answered task seq {seq}, expected {expected}")
        self._next_state(slot.inflight[0], ev)  # refuse before taking it out of the worker
        task = slot.inflight.popleft()
        self._move(task, ev)
        return task

    def on_result(self, wid: int, seq: int, now: float) -> Task:
        """A worker answered its oldest task; returns it. Updates the service-time estimate."""
        task = self._answered(wid, seq, Ev.RESULT)
        slot = self.workers[wid]
        took = max(now - slot.head_since, 0.0)
        avg = self.avg_task_time
        self.avg_task_time = took if avg is None else avg + 0.2 * (took - avg)
        slot.head_since = now
        return task

    def on_skipped(self, wid: int, seq: int, now: float) -> Task:
        """A worker skipped its oldest task (stopped before it started); returns it."""
        task = self._answered(wid, seq, Ev.SKIP)
        self.workers[wid].head_since = now
        return task

    def stop(self, task: Task, exc: BaseException) -> StopAction:
        """Stop ``task`` wherever it is; ``exc`` is how its caller fails if the stop wins."""
        if task.state is TState.DONE:
            return StopAction.TOO_LATE
        if task.state is TState.STOPPING:
            return StopAction.PENDING
        task.stop_error = exc
        if task.state is TState.QUEUED:
            self.queue.remove(task)
            self._move(task, Ev.STOP)
            return StopAction.DEQUEUED
        self._move(task, Ev.STOP)
        return StopAction.ASK_WORKER

    def on_exit(self, wid: int, end: WorkerEnd) -> ExitOutcome:
        """A worker is gone (its answers are all in). Decide each task it still held, from what
        its state block says: stopped by its init, running when it died, or never started."""
        slot = self.workers.pop(wid)
        during_startup = slot.state is WState.STARTING
        slot.state = WState.DEAD
        ended: list[tuple[Task, Fate]] = []
        requeue: list[Task] = []
        for task in slot.inflight:
            if end.stopped and task.seq == end.stopped:
                fate = Fate.TIMED_OUT if end.timed_out else Fate.STOPPED
            elif task.seq <= end.started:
                fate = Fate.DIED
            elif task.state is TState.STOPPING or slot.forced is not None:
                fate = Fate.CANCELLED
            else:
                self._move(task, Ev.REQUEUE)
                requeue.append(task)
                continue
            if fate is Fate.STOPPED and task.stop_error is None:
                fate = Fate.DIED  # never asked for: the worker reported nonsense
            elif fate is Fate.DIED and task.stop_error is not None:
                fate = Fate.STOPPED  # asked to stop, and it did stop (its worker died)
            self._move(task, Ev.END)
            ended.append((task, fate))
        slot.inflight.clear()
        self.queue.extendleft(reversed(requeue))
        if during_startup:
            self._startup_failures += 1
        return ExitOutcome(ended)

    def force(self, reason: str) -> list[Task]:
        """Every worker is being stopped as a whole (``kill_workers()``...): they get no more
        tasks and requeue nothing. Returns the queued tasks, dropped."""
        for w in self.workers.values():
            w.forced = reason
        return self.drain_queue()

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
        tasks = list(self.queue)
        self.queue.clear()
        for t in tasks:
            self._move(t, Ev.DROP)
        return tasks

    def drain_all(self) -> list[Task]:
        """Remove and return every task, queued or in flight (the pool is going away)."""
        tasks = self.drain_queue()
        for w in self.workers.values():
            for t in w.inflight:
                self._move(t, Ev.DROP)
                tasks.append(t)
            w.inflight.clear()
        return tasks

    def occupied(self) -> int:
        """Workers that count against ``max_workers``: all but those that only exit now (closing
        with no task left: their last result is in), so that their replacement starts while
        they go (``max_tasks_per_child``, idle workers closing)."""
        return sum(1 for w in self.workers.values() if w.inflight or w.state is not WState.CLOSING)

    def can_grow(self) -> bool:
        """Whether one more worker may start now."""
        return self.occupied() < self.max_workers

    def cancel_queued(self) -> list[Task]:
        """Remove and return the queued tasks no worker would take now (``cancel_futures``).

        As in the stdlib pool, where tasks already in its call queue run: a task at the head
        of the queue stays if a worker is free for it (idle, starting, or one the pool may
        still start). Tasks requeued after their worker died are already running and stay.
        """
        free = max(self.max_workers - self.occupied(), 0) + sum(
            1
            for w in self.workers.values()
            if w.forced is None
            and w.budget != 0
            and (w.state is WState.STARTING or (w.state is WState.READY and not w.inflight))
        )
        keep: list[Task] = []
        dropped: list[Task] = []
        for t in self.queue:
            if t.claimed:
                keep.append(t)
            elif free > 0:
                keep.append(t)
                free -= 1
            else:
                dropped.append(t)
        self.queue.clear()
        self.queue.extend(keep)
        for t in dropped:
            self._move(t, Ev.DROP)
        return dropped

    def _claim_next(self) -> Task | None:
        queue = self.queue
        while queue:
            task = queue.popleft()
            if task.claimed or self.claim(task):
                task.claimed = True
                return task
            self._move(task, Ev.DROP)
        return None

    # -- decisions ----------------------------------------------------------------------------
    def _send_to_idle(self, actions: Actions, now: float) -> bool:
        """The single queued task to the first idle worker, if there is one (what the general
        path below picks too: the first worker at the lowest level); False if none is idle."""
        for w in self.workers.values():
            if w.state is WState.READY and not w.inflight and w.forced is None and w.budget != 0:
                break
        else:
            return False
        task = self._claim_next()
        if task is not None:  # (None: it was cancelled meanwhile; nothing to send or start)
            self._assign(task, w, now, actions)
            actions.send = [(w, [task])]
        return True

    def _assign(self, task: Task, w: WorkerSlot, now: float, actions: Actions) -> None:
        """Give a claimed task to worker ``w`` (its next seq); close ``w`` if that spent its
        budget."""
        if not w.inflight:
            w.head_since = now
        self._move(task, Ev.SEND)
        w.last_seq += 1
        task.wid, task.seq = w.wid, w.last_seq
        w.inflight.append(task)
        if w.budget is not None:
            w.budget -= 1
            if w.budget == 0:
                w.state = WState.CLOSING
                actions.close.append(w)

    def schedule(self, now: float, *, spawn: bool = True) -> Actions:
        """Hand queued tasks to workers with room, and ask for workers that are missing."""
        actions = Actions()
        queue = self.queue
        if len(queue) == 1 and self._send_to_idle(actions, now):
            return actions  # the common case of one call at a time, decided as below would
        if queue:
            cap = self.depth()
            if cap > 1 and (
                self.can_grow() or any(w.state is WState.STARTING for w in self.workers.values())
            ):
                # A task may wait behind another only when every worker the pool may have is
                # up: until then it waits in the queue for the next free or new worker.
                cap = 1
            room = [
                w
                for w in self.workers.values()
                if w.state is WState.READY
                and w.forced is None
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
                        self._assign(task, w, now, actions)
                        batches.setdefault(w.wid, []).append(task)
                    level += 1
                actions.send = [(self.workers[wid], ts) for wid, ts in batches.items()]
        if spawn and queue and not self.startup_failing:
            starting = sum(1 for w in self.workers.values() if w.state is WState.STARTING)
            want = min(len(queue) - starting, self.max_workers - self.occupied())
            for _ in range(max(want, 0)):
                slot = WorkerSlot(self._next_wid, budget=self.max_tasks_per_child)
                self._next_wid += 1
                self.workers[slot.wid] = slot
                actions.spawn.append(slot)
        return actions
