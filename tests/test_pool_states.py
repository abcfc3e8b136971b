"""The pool core as a state machine: Hypothesis plays the fronts and the worker processes in
any order and checks, after every step, that every task is in exactly one place and settles
exactly once, with an outcome the workers' own story allows.

The worker model is honest: it receives tasks in send order, starts them one at a time in that
order, answers only the task it runs, skips only a task it was asked to stop before it started
it, and on its exit reports (as its state block would) the seq it started last and the seq its
init stopped. It never looks at the core's bookkeeping to decide what it does.

Hypothesis turns a random part of the rules off in each example (swarm testing), so the rules
that throw work away (cancel_queued, force, a mid-run shutdown) only run where they test
something, and a front may be ``eager`` (schedule after every event, as the I/O loops do):
otherwise few examples would get as far as results, skips and stops.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from nspool._core.pool import Fate, PoolCore, StopAction, Task, TState, WorkerEnd, WState

PICK = st.integers(0, 7)  # which of the eligible workers or tasks (modulo their number)


@dataclass
class Worker:
    """One worker process, as the worker itself knows it."""

    wid: int
    ready: bool = False
    #: tasks received and not answered, in the order received
    pipe: deque[Task] = field(default_factory=deque)
    last_seq: int = 0  #: seq of the last task received
    started: int = 0  #: seq of the last task its loop started (its state block's word)
    running: bool = False  #: the task ``started`` runs now (no answer yet)
    given: int = 0  #: tasks received over its life
    closed: bool = False  #: its task pipe was closed: it gets nothing more
    forced: bool = False  #: force() was called while it lived
    stops: set[int] = field(default_factory=set)  #: seqs its init was asked to stop


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.all: list[Task] = []
        self.queue: list[Task] = []  # the queue as it must be, front first
        self.workers: dict[int, Worker] = {}
        self.wids_seen: set[int] = set()
        self.settled: dict[int, str] = {}  # task id -> how it left the pool
        self.stop_asked: set[int] = set()  # ids whose stop took effect (DEQUEUED/ASK_WORKER)
        self.refuse: set[int] = set()  # ids whose future the front cancelled while queued
        self.claims: list[int] = []  # ids claim() was asked about, in order
        self.refused: list[Task] = []  # tasks claim() refused, not yet checked
        self.fails = 0  # startup failures since the last READY
        self.now = 0.0
        self.shut = False
        self.next_id = 1
        self.answers = 0  # tasks settled by a worker (result, skip, exit)

    @initialize(
        max_workers=st.integers(1, 3),
        per_child=st.none() | st.integers(1, 3),
        max_batch=st.integers(1, 4),
        max_startup_failures=st.integers(1, 3),
        eager=st.booleans(),
        estimate=st.sampled_from([None, 0.0, 0.0005]),
    )
    def init_core(
        self,
        max_workers: int,
        per_child: int | None,
        max_batch: int,
        max_startup_failures: int,
        eager: bool,
        estimate: float | None,
    ) -> None:
        self.core = PoolCore(
            max_workers,
            max_tasks_per_child=per_child,
            claim=self._claim,
            max_batch=max_batch,
            batch_window=0.002,
            max_startup_failures=max_startup_failures,
        )
        # Its service-time estimate as if it had run tasks before: none (one task per
        # worker), or short tasks (batches of up to max_batch) from the start.
        self.core.avg_task_time = estimate
        self.per_child = per_child
        #: schedule after every event, as the fronts' I/O loops do (otherwise only when the
        #: schedule rule says so)
        self.eager = eager

    # -- helpers --------------------------------------------------------------------------------
    def _claim(self, task: Task) -> bool:
        # Asked once per task, only while it is queued and was never handed out.
        assert task.state is TState.QUEUED and not task.claimed
        assert task.id not in self.claims
        self.claims.append(task.id)
        if task.id in self.refuse:
            self.refused.append(task)
            return False
        return True

    def _settle(self, task: Task, how: str) -> None:
        """The core reported ``task`` as having left the pool (``how``): once, and DONE."""
        assert task.state is TState.DONE, (task.id, task.state, how)
        assert task.id not in self.settled, (task.id, self.settled[task.id], how)
        self.settled[task.id] = how
        self.answers += how in ("result", "skip", "exit")

    def _pick(self, cands: list[Worker], pick: int) -> Worker:
        return cands[pick % len(cands)]

    def _startable(self) -> list[Worker]:
        return [w for w in self.workers.values() if not w.running and w.pipe]

    def _running(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.running]

    def _skippable(self) -> list[Worker]:
        return [w for w in self._startable() if w.pipe[0].seq in w.stops]

    def _stoppable(self, deadline: bool) -> list[Worker]:
        out = []
        for w in self._running():
            t = w.pipe[0]
            if (t.timeout is not None) if deadline else (t.seq in w.stops):
                out.append(w)
        return out

    def _exit(self, w: Worker, end: WorkerEnd) -> None:
        """Worker ``w`` is gone; its answers are all in. Check what the core decides."""
        expect: list[tuple[Task, Fate]] = []
        requeue: list[Task] = []
        for t in w.pipe:
            asked = t.id in self.stop_asked
            if end.stopped and t.seq == end.stopped:
                fate = Fate.TIMED_OUT if end.timed_out else Fate.STOPPED
            elif t.seq <= end.started:
                fate = Fate.STOPPED if asked else Fate.DIED
            elif asked or w.forced:
                fate = Fate.CANCELLED
            else:
                requeue.append(t)
                continue
            expect.append((t, fate))
        slot = self.core.workers[w.wid]
        out = self.core.on_exit(w.wid, end)
        assert slot.state is WState.DEAD
        assert w.wid not in self.core.workers
        assert [(t.id, f) for t, f in out.ended] == [(t.id, f) for t, f in expect]
        # What went back to the queue, and the startup failures, the invariants check.
        for t, fate in out.ended:
            # Each fate must be one the worker's story allows.
            started = t.seq <= end.started
            if fate is Fate.STOPPED:
                assert t.id in self.stop_asked and started
            elif fate is Fate.TIMED_OUT:
                assert t.timeout is not None and started and t.seq == end.stopped
            elif fate is Fate.DIED:
                assert started
            else:
                assert fate is Fate.CANCELLED and not started
                assert t.id in self.stop_asked or w.forced
            self._settle(t, "exit")
        for t in requeue:
            assert t.state is TState.QUEUED and t.claimed and t.seq == 0 and t.wid == 0
        self.queue[:0] = requeue
        if not w.ready:
            self.fails += 1
        del self.workers[w.wid]

    # -- the fronts -----------------------------------------------------------------------------
    @precondition(lambda self: not self.shut and len(self.queue) < 4)
    @rule(timed=st.booleans())
    def submit(self, timed: bool) -> None:
        """A call is submitted (a short queue shows every rule; a long one only slows)."""
        task = Task(self.next_id, b"", timeout=1.0 if timed else None)
        self.next_id += 1
        self.core.submit(task)
        self.all.append(task)
        self.queue.append(task)
        self._step()

    @precondition(lambda self: not self.shut and bool(self.queue))
    @rule(spawn=st.booleans())
    def schedule(self, spawn: bool) -> None:
        """The front hands out queued tasks (and starts missing workers, if ``spawn``)."""
        self._schedule(spawn)

    def _step(self) -> None:
        """An event was handled: an eager front schedules now."""
        if self.eager and not self.shut and self.queue:
            self._schedule(True)

    def _schedule(self, spawn: bool) -> None:
        core = self.core
        before = list(self.queue)
        claimed_before = {t.id: t.claimed for t in before}
        n_claims = len(self.claims)
        depth = core.depth()
        failing = core.startup_failing
        starting = sum(1 for w in self.workers.values() if not w.ready)
        # A closed worker with no task left only exits: its replacement may start already.
        live = sum(1 for w in self.workers.values() if not (w.closed and not w.pipe))

        actions = core.schedule(self.now, spawn=spawn)

        sent: list[Task] = []
        for slot, batch in actions.send:
            w = self.workers[slot.wid]
            assert slot is core.workers[slot.wid]
            assert w.ready and not w.closed and not w.forced
            assert batch
            for t in batch:
                assert t.state is TState.SENT and t.claimed and t.wid == w.wid
                w.last_seq += 1
                assert t.seq == w.last_seq  # 1, 2, 3... in send order
            # A worker gets its tasks in queue order.
            positions = [before.index(t) for t in batch]
            assert positions == sorted(positions)
            w.pipe.extend(batch)
            w.given += len(batch)
            assert len(w.pipe) <= depth
            if self.per_child is not None:
                assert w.given <= self.per_child
            sent.extend(batch)
        refused, self.refused = self.refused, []
        for t in refused:
            self._settle(t, "refused")
        # What left the queue is its front: the tasks claim refused and those it let through.
        took = len(sent) + len(refused)
        assert {t.id for t in before[:took]} == {t.id for t in sent + refused}
        self.queue = before[took:]
        assert self.claims[n_claims:] == [t.id for t in before[:took] if not claimed_before[t.id]]

        closing = {slot.wid for slot in actions.close}
        assert len(closing) == len(actions.close)
        for slot in actions.close:
            w = self.workers[slot.wid]
            assert slot.state is WState.CLOSING and slot.budget == 0
            assert w.given == self.per_child
            w.closed = True
        for slot, _ in actions.send:
            # A worker that spent its budget now is closed now, exactly once.
            assert (slot.wid in closing) == (self.workers[slot.wid].given == self.per_child)

        if not spawn or failing or not self.queue:
            assert actions.spawn == []
        else:
            want = min(len(self.queue) - starting, core.max_workers - live)
            assert len(actions.spawn) == max(want, 0)
        for slot in actions.spawn:
            assert slot.wid not in self.wids_seen
            assert slot.state is WState.STARTING and slot.budget == self.per_child
            assert slot.forced is None and not slot.inflight
            self.wids_seen.add(slot.wid)
            self.workers[slot.wid] = Worker(slot.wid)

    def _cancellable(self) -> list[Task]:
        return [t for t in self.queue if not t.claimed and t.id not in self.refuse]

    @precondition(lambda self: not self.shut and bool(self._cancellable()))
    @rule(pick=PICK)
    def cancel_future(self, pick: int) -> None:
        """The front's future is cancelled, which it can be only while it never ran: claim()
        will refuse it."""
        cands = self._cancellable()
        self.refuse.add(cands[pick % len(cands)].id)

    def _in_flight(self) -> list[Task]:
        return [t for w in self.workers.values() for t in w.pipe]

    @precondition(lambda self: bool(self.queue or self._in_flight() or self.shut))
    @rule(pick=PICK)
    def stop(self, pick: int) -> None:
        """kill() or a cancellation, on a task in any state: tasks in flight come first, then
        queued ones, then those that left (picked while few tasks remain in the pool, and
        always once it shut down)."""
        cands = self._in_flight() + self.queue
        cands += [t for t in self.all if t.state is TState.DONE]
        self._stop(cands[pick % len(cands)])

    def _stop(self, task: Task) -> None:
        prior = task.state
        prior_error = task.stop_error
        exc = RuntimeError(f"stop {task.id}")
        how = self.core.stop(task, exc)
        expected = {
            TState.QUEUED: StopAction.DEQUEUED,
            TState.SENT: StopAction.ASK_WORKER,
            TState.STOPPING: StopAction.PENDING,
            TState.DONE: StopAction.TOO_LATE,
        }[prior]
        assert how is expected
        if how is StopAction.DEQUEUED:
            assert task.stop_error is exc
            self.queue.remove(task)
            self.stop_asked.add(task.id)
            self._settle(task, "dequeued")
        elif how is StopAction.ASK_WORKER:
            assert task.stop_error is exc and task.state is TState.STOPPING
            w = self.workers[task.wid]
            assert task in w.pipe
            w.stops.add(task.seq)  # the front tells the worker's init
            self.stop_asked.add(task.id)
        else:
            assert task.stop_error is prior_error and task.state is prior

    @precondition(lambda self: not self.shut and any(t.claimed for t in self.queue))
    @rule()
    def cancel_queued(self) -> None:
        """shutdown(cancel_futures=True) once some task went back to the queue: it must stay."""
        out = self.core.cancel_queued()
        unclaimed = [t for t in self.queue if not t.claimed]
        # Only unclaimed tasks go, from the back: those at the head stay for free workers.
        assert out == unclaimed[len(unclaimed) - len(out) :]
        assert len(unclaimed) - len(out) <= self.core.max_workers
        self.queue = [t for t in self.queue if t not in out]
        for t in out:
            self._settle(t, "cancel_queued")

    @precondition(lambda self: not self.shut and any(w.pipe for w in self.workers.values()))
    @rule()
    def force(self) -> None:
        """kill_workers()/terminate_workers() while tasks are in flight."""
        out = self.core.force("kill_workers()")
        assert out == self.queue
        self.queue = []
        for t in out:
            self._settle(t, "force")
        for w in self.workers.values():
            w.forced = True
            assert self.core.workers[w.wid].forced == "kill_workers()"

    @precondition(
        lambda self: (
            not self.shut
            and any(w.ready and not w.closed and not w.pipe for w in self.workers.values())
        )
    )
    @rule(later=st.sampled_from([0.0, 0.0005, 0.5]), timeout=st.sampled_from([0.0, 0.001, 1.0]))
    def idle_workers(self, later: float, timeout: float) -> None:
        """``later`` seconds on, the front lets workers idle for ``timeout`` seconds go."""
        self.now += later
        slots = {w.wid: w for w in self.core.workers.values()}
        due = [
            wid
            for wid, s in slots.items()
            if s.state is WState.READY and not s.inflight and self.now - s.head_since >= timeout
        ]
        out = self.core.idle_workers(self.now, timeout)
        if self.queue:
            assert out == []
        else:
            assert [s.wid for s in out] == due
        for s in out:
            w = self.workers[s.wid]
            assert s.state is WState.CLOSING
            assert w.ready and not w.closed and not w.pipe
            w.closed = True

    @precondition(lambda self: not self.shut and self.answers >= 4 and bool(self._in_flight()))
    @rule()
    def shutdown(self) -> None:
        """drain_all: the pool goes away (shutdown, or broken) while tasks are in flight, after
        it did some work; its workers still start and exit afterwards. (Every example also
        ends with one: see teardown.)"""
        self._drain_all()

    def _drain_all(self) -> None:
        held = list(self.queue) + [t for w in self.workers.values() for t in w.pipe]
        out = self.core.drain_all()
        assert out == held
        for t in out:
            self._settle(t, "drain")
        self.queue = []
        for w in self.workers.values():
            # The core forgot them; the processes are being torn down and answer no more.
            w.pipe.clear()
            w.running = False
        self.shut = True

    # -- the workers ----------------------------------------------------------------------------
    @precondition(lambda self: any(not w.ready for w in self.workers.values()))
    @rule(pick=PICK)
    def ready(self, pick: int) -> None:
        """A starting worker's initializer ran: it says READY."""
        w = self._pick([w for w in self.workers.values() if not w.ready], pick)
        self.core.on_ready(w.wid, 1000 + w.wid, self.now)
        assert self.core.workers[w.wid].state is WState.READY
        w.ready = True
        self.fails = 0
        self._step()

    @precondition(lambda self: bool(self._startable()))
    @rule(pick=PICK)
    def start_next(self, pick: int) -> None:
        """Its loop starts the next task (a stop its init has not handled yet cannot hold it)."""
        self._start(self._pick(self._startable(), pick))

    def _start(self, w: Worker) -> None:
        assert not w.running and w.pipe[0].seq > w.started
        w.started = w.pipe[0].seq
        w.running = True

    @precondition(lambda self: any(w.pipe for w in self.workers.values()))
    @rule(pick=PICK, took=st.sampled_from([0.0, 0.0005, 0.003, 1.0]))
    def result(self, pick: int, took: float) -> None:
        """It answers its oldest task: the one it runs, or the next one, which it starts
        first."""
        w = self._pick([w for w in self.workers.values() if w.pipe], pick)
        if not w.running:
            self._start(w)
        t = w.pipe[0]
        assert t.seq == w.started
        self.now += took
        assert self.core.on_result(w.wid, t.seq, self.now) is t
        w.pipe.popleft()
        w.running = False
        self._settle(t, "result")
        self._step()

    @precondition(lambda self: bool(self._skippable()))
    @rule(pick=PICK)
    def skip(self, pick: int) -> None:
        """Its loop finds the next task doomed by its init and skips it."""
        w = self._pick(self._skippable(), pick)
        t = w.pipe[0]
        assert t.id in self.stop_asked
        assert self.core.on_skipped(w.wid, t.seq, self.now) is t
        w.pipe.popleft()
        self._settle(t, "skip")
        self._step()

    @precondition(lambda self: bool(self._stoppable(False) or self._stoppable(True)))
    @rule(pick=PICK, deadline=st.booleans())
    def init_stops_running_task(self, pick: int, deadline: bool) -> None:
        """Its init kills the running task (asked to, or past its deadline) and the worker
        exits; its state block names the task it stopped."""
        cands = self._stoppable(deadline)
        if not cands:
            deadline = not deadline
            cands = self._stoppable(deadline)
        w = self._pick(cands, pick)
        self._exit(w, WorkerEnd(started=w.started, stopped=w.started, timed_out=deadline))
        self._step()

    @precondition(lambda self: any(w.ready for w in self.workers.values()))
    @rule(pick=PICK)
    def exit(self, pick: int) -> None:
        """It exits: a crash, a kill, or a closed worker done with its tasks. Its state block
        tells the last task it started (maybe one already answered), and no stop."""
        w = self._pick([w for w in self.workers.values() if w.ready], pick)
        self._exit(w, WorkerEnd(started=w.started))
        self._step()

    @precondition(lambda self: any(not w.ready for w in self.workers.values()))
    @rule(pick=PICK)
    def startup_fails(self, pick: int) -> None:
        """It dies before it ever said READY."""
        w = self._pick([w for w in self.workers.values() if not w.ready], pick)
        self._exit(w, WorkerEnd())
        self._step()

    def teardown(self) -> None:
        """Every example ends with the pool going away: what is left is drained, every worker
        exits, and then every task has left the pool, reported exactly once."""
        if not hasattr(self, "core") or sys.exc_info()[0] is not None:
            # A step failed (teardown runs in Hypothesis's ``finally``): let that error be the
            # one reported.
            return
        if not self.shut:
            self._drain_all()
        for w in list(self.workers.values()):
            self._exit(w, WorkerEnd(started=w.started))
        self.tasks_are_where_they_should_be()
        assert set(self.settled) == {t.id for t in self.all}
        assert self.core.workers == {} and self.core.idle

    # -- invariants -----------------------------------------------------------------------------
    @invariant()
    def tasks_are_where_they_should_be(self) -> None:
        core = self.core
        assert list(core.queue) == self.queue
        assert set(core.workers) == set(self.workers)
        where: dict[int, str] = {}
        for t in core.queue:
            assert t.id not in where
            where[t.id] = "queue"
            assert t.state is TState.QUEUED and t.seq == 0 and t.wid == 0
        for wid, slot in core.workers.items():
            w = self.workers[wid]
            assert list(slot.inflight) == list(w.pipe)
            assert slot.last_seq == w.last_seq
            assert slot.state is not WState.DEAD
            assert (slot.forced is not None) == w.forced
            assert len(slot.inflight) <= core.max_batch
            seqs = [t.seq for t in slot.inflight]
            assert seqs == sorted(set(seqs))  # strictly increasing
            assert all(0 < s <= slot.last_seq for s in seqs)
            for t in slot.inflight:
                assert t.id not in where, (t.id, where[t.id], wid)
                where[t.id] = f"worker {wid}"
                assert t.state in (TState.SENT, TState.STOPPING)
                assert t.wid == wid
                assert (t.state is TState.STOPPING) == (t.id in self.stop_asked)
            if self.per_child is not None:
                assert w.given <= self.per_child
                assert slot.budget == self.per_child - w.given
        for t in self.all:
            # DONE exactly when reported (once: _settle refuses a second report), and then
            # in no place; otherwise in exactly one.
            assert (t.state is TState.DONE) == (t.id in self.settled)
            assert (t.id in where) == (t.state is not TState.DONE)
            assert (t.stop_error is not None) == (t.id in self.stop_asked)
        assert len(self.all) == len(core.queue) + sum(
            len(w.inflight) for w in core.workers.values()
        ) + len(self.settled)
        assert core.idle == (not where)

    @invariant()
    def workers_and_startup_failures_are_bounded(self) -> None:
        core = self.core
        # Working (or starting) workers stay within max_workers; exiting ones come on top.
        assert sum(1 for w in self.workers.values() if not (w.closed and not w.pipe)) <= (
            core.max_workers
        )
        assert core.occupied() <= core.max_workers
        assert core.startup_failing == (self.fails >= core.max_startup_failures)
        starting = sum(1 for s in core.workers.values() if s.state is WState.STARTING)
        assert starting == sum(1 for w in self.workers.values() if not w.ready)
        # Spawning stops at the limit, so only workers already starting can add to it.
        assert self.fails + starting <= core.max_startup_failures - 1 + core.max_workers


TestPoolStates = PoolMachine.TestCase
# About 5 s on 3.13 (10-20 s on 3.10); fewer examples miss the rarer paths (a stop then a
# crash). As randomised as the race tests, it takes their length too (NSPOOL_RACE_SCALE, see
# tests/_racing.py): `make test`'s later stages run the same logic shorter.
# database=None: no .hypothesis folder left behind; a failure prints its own reproduction.
_SCALE = float(os.environ.get("NSPOOL_RACE_SCALE") or 1.0)
TestPoolStates.settings = settings(
    max_examples=max(30, round(300 * _SCALE)),
    stateful_step_count=100,
    deadline=None,
    database=None,
)
