"""Where a sync round trip goes: a timestamped breakdown of one call, in both processes.

    python -m benchmarks.profile_roundtrip              # 5 rounds x 2,000 calls per setup
    python -m benchmarks.profile_roundtrip --calls 500 --rounds 2

One call at a time (``submit(probe, i).result()``) on a warm 2-worker ``NSPoolExecutor``,
next to the floor of ``bench_roundtrip`` (a length-prefixed pickle each way to one child over
two pipes). Nothing in nspool is edited: in this program the functions on the path are wrapped
(``_serialize``, ``PoolCore``, ``PoolDriver``, ``_complete``, the selector, ``os.readv`` /
``os.writev``, ``Future.set_result``); in the workers, this module is a ``preload`` of the
instrumented pool, so the launcher imports it before it forks any worker and it wraps the task
loop's pieces there (``os.readv`` / ``os.writev``, ``StateBlock``, ``run_task``, ``loads``,
``dumps_result``, ``_flush_stdio``, ``_wipe_leftovers``, ``send``). Every stamp is
``time.monotonic_ns()`` (CLOCK_MONOTONIC: one clock for every process of the machine, PID and
user namespaces included); the workers write theirs into a shared file in /dev/shm that this
program reads at the end. Per call, each segment is the difference of two stamps; the table
shows the median over every call of every round. Medians of segments do not add up exactly to
the median total, and the wrappers cost time themselves: the report prints the round trip with
and without them (same run, rounds interleaved), and that difference is the instrumentation.
Standard library and nspool only.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import mmap
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

now = time.monotonic_ns

#: set in this program's environment: where the workers write their stamps, and who we are
ENV_SHM = "NSPOOL_PROFILE_SHM"
ENV_PROGRAM = "NSPOOL_PROFILE_PROGRAM_PID"

# -- the worker's record of one call (int64 stamps) -----------------------------------------------
W_FIELDS = (
    "readv_ret",  # the task loop's blocking readv returned with the task frame
    "started0",  # state.set_started(seq, True): decode done
    "run0",  # run_task entered: doom check and split_task done
    "loads0",
    "loads1",
    "fn0",  # inside the task function
    "fn1",
    "dump0",  # dumps_result
    "dump1",
    "run1",  # run_task returned
    "stopped0",  # state.set_started(seq, False)
    "flush0",  # _flush_stdio
    "flush1",
    "wipe0",  # _wipe_leftovers
    "wipe1",
    "send0",  # TaskLoop.send
    "writev0",  # the result's writev syscall
    "writev1",
    "send1",
    "index",  # which call (probe's argument)
)
W = {name: i for i, name in enumerate(W_FIELDS)}
NW = len(W_FIELDS)

# -- the program's record of one call -------------------------------------------------------------
P_FIELDS = (
    "t0",  # the caller, just before submit()
    "dump0",  # _serialize.dump_task
    "dump1",
    "locked",  # _Engine.enqueue entered (the engine lock is held)
    "sched0",  # PoolCore.schedule (caller's thread)
    "sched1",
    "flush0",  # PoolDriver.flush (caller's thread)
    "writev0",  # the task's writev syscall
    "writev1",
    "flush1",
    "submitted",  # submit() returned
    "select_ret",  # the I/O thread's selector.select() returned
    "on_readable0",  # PoolDriver.on_readable entered (engine lock held)
    "readv_ret",  # first readv returned with data
    "on_result0",  # PoolCore.on_result
    "on_result1",
    "on_readable1",
    "complete0",  # _complete entered (lock released)
    "load0",  # _serialize.load_result
    "load1",
    "set0",  # Future.set_result (notify_all under the future's condition)
    "set1",
    "complete1",
    "woke",  # the caller: Future.result() returned
    "readvs",  # readv calls the I/O thread made for this result (a count, not a stamp)
)
P = {name: i for i, name in enumerate(P_FIELDS)}
NP = len(P_FIELDS)

# -- the floor's child record ----------------------------------------------------------------------
F_FIELDS = ("read_ret", "body", "loads1", "fn0", "fn1", "dump1", "write1", "index")
F = {name: i for i, name in enumerate(F_FIELDS)}
NF = len(F_FIELDS)

# the worker (or floor child) side: the record being filled, and the shared file
_W: list[int] = [0] * max(NW, NF)
_shm: memoryview | None = None


def probe(i: int) -> int:
    """The task: as trivial as ``noop``, but it stamps its own entry and exit."""
    _W[W["fn0"]] = now()
    _W[W["index"]] = i
    _W[W["fn1"]] = now()
    return i


def _unlink_quietly(*paths: str) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _map_shared(path: str) -> memoryview:
    fd = os.open(path, os.O_RDWR)
    try:
        mm = mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED)
    finally:
        os.close(fd)
    return memoryview(mm).cast("q")


def _commit(width: int, index_field: int) -> None:
    """Copy the finished record of one call into the shared file, at its call's slot."""
    assert _shm is not None
    i = _W[index_field]
    if i >= 0 and (i + 1) * width <= len(_shm):
        _shm[i * width : (i + 1) * width] = memoryview(struct.pack(f"{width}q", *_W[:width])).cast(
            "q"
        )
    for k in range(len(_W)):
        _W[k] = 0
    _W[index_field] = -1


# -- worker side (runs in the launcher's fork server, before workers fork) ------------------------
def _install_worker_hooks() -> None:
    global _shm
    from nspool._core import protocol as _protocol
    from nspool._core import serialize as _serialize
    from nspool.launcher import _taskloop

    _shm = _map_shared(os.environ[ENV_SHM])
    _W[W["index"]] = -1
    rec = _W

    real_readv, real_writev = os.readv, os.writev

    def readv(fd: int, buffers: Any) -> int:
        n = real_readv(fd, buffers)
        rec[W["readv_ret"]] = now()
        return n

    def writev(fd: int, buffers: Any) -> int:
        rec[W["writev0"]] = now()
        n = real_writev(fd, buffers)
        rec[W["writev1"]] = now()
        return n

    os.readv, os.writev = readv, writev  # this process and the workers it forks only

    real_set_started = _protocol.StateBlock.set_started

    def set_started(self: Any, seq: int, running: bool) -> None:
        rec[W["started0" if running else "stopped0"]] = now()
        real_set_started(self, seq, running)

    _protocol.StateBlock.set_started = set_started  # type: ignore[method-assign]

    loop = _taskloop.TaskLoop
    real_run, real_send = loop.run_task, loop.send

    def run_task(self: Any, seq: int, timeout: Any, data: Any) -> Any:
        rec[W["run0"]] = now()
        out = real_run(self, seq, timeout, data)
        rec[W["run1"]] = now()
        return out

    def send(self: Any, kind: Any, ident: int, payload: Any = b"", before: bytes = b"") -> None:
        rec[W["send0"]] = now()
        real_send(self, kind, ident, payload, before)
        rec[W["send1"]] = now()
        _commit(NW, W["index"])

    loop.run_task, loop.send = run_task, send  # type: ignore[method-assign]

    def stamped(mod: Any, name: str, start: str, end: str) -> None:
        real = getattr(mod, name)
        i0, i1 = W[start], W[end]

        def wrapper(*args: Any) -> Any:
            rec[i0] = now()
            try:
                return real(*args)
            finally:
                rec[i1] = now()

        setattr(mod, name, wrapper)

    stamped(_serialize, "loads", "loads0", "loads1")
    stamped(_serialize, "dumps_result", "dump0", "dump1")
    stamped(_taskloop, "_flush_stdio", "flush0", "flush1")
    stamped(_taskloop, "_wipe_leftovers", "wipe0", "wipe1")


if (
    os.environ.get(ENV_SHM)
    and os.environ.get(ENV_PROGRAM) != str(os.getpid())
    and "nspool.launcher._taskloop" in sys.modules  # imported as a preload by the fork server
):
    _install_worker_hooks()


# -- the floor's child: bench_roundtrip's loop, stamped ------------------------------------------
def _floor_child(path: str) -> None:
    import pickle

    global _shm
    _shm = _map_shared(path)
    rec = _W
    r, w = sys.stdin.buffer, sys.stdout.buffer
    while True:
        head = r.read(4)
        rec[F["read_ret"]] = now()
        if len(head) < 4:
            break
        body = r.read(struct.unpack("<I", head)[0])
        rec[F["body"]] = now()
        fn, args = pickle.loads(body)
        rec[F["loads1"]] = now()
        # probe() stamps fn0/fn1 and the index at the worker's offsets: move them over
        fn(*args)
        rec[F["fn0"]], rec[F["fn1"]], idx = rec[W["fn0"]], rec[W["fn1"]], rec[W["index"]]
        out = pickle.dumps(idx, protocol=5)
        rec[F["dump1"]] = now()
        w.write(struct.pack("<I", len(out)) + out)
        w.flush()
        rec[F["write1"]] = now()
        rec[F["index"]] = idx
        _commit(NF, F["index"])


# -- the program side ------------------------------------------------------------------------------
class _Patches:
    """Wrappers on the program's side, switched on only while the instrumented pool runs."""

    def __init__(self) -> None:
        self.items: list[tuple[Any, str, Any, Any]] = []

    def add(self, obj: Any, name: str, wrapper: Any) -> None:
        self.items.append((obj, name, getattr(obj, name), wrapper))

    def on(self) -> None:
        for obj, name, _, wrapper in self.items:
            setattr(obj, name, wrapper)

    def off(self) -> None:
        for obj, name, real, _ in self.items:
            setattr(obj, name, real)


class ProgramProbe:
    def __init__(self, total: int) -> None:
        from nspool import executor
        from nspool._core import driver as _driver
        from nspool._core import io_thread as _io_thread
        from nspool._core import pool as _pool
        from nspool._core import serialize as _serialize

        self.records = [[0] * NP for _ in range(total)]
        self.cur: list[int] = self.records[0]  # the caller's current call
        self.io: list[int] = self.records[0]  # the call the I/O thread is answering
        self.main = threading.get_ident()
        self.last_select = 0
        self.patches = p = _Patches()
        probe_ = self

        def caller(start: str, end: str, real: Callable[..., Any]) -> Callable[..., Any]:
            i0, i1 = P[start], P[end]

            def wrapper(*args: Any, **kw: Any) -> Any:
                if threading.get_ident() != probe_.main:
                    return real(*args, **kw)
                rec = probe_.cur
                if not rec[i0]:
                    rec[i0] = now()
                out = real(*args, **kw)
                if not rec[i1]:
                    rec[i1] = now()
                return out

            return wrapper

        def io(start: str, end: str, real: Callable[..., Any]) -> Callable[..., Any]:
            i0, i1 = P[start], P[end]

            def wrapper(*args: Any, **kw: Any) -> Any:
                rec = probe_.io
                rec[i0] = now()
                out = real(*args, **kw)
                rec[i1] = now()
                return out

            return wrapper

        p.add(_serialize, "dump_task", caller("dump0", "dump1", _serialize.dump_task))
        p.add(_pool.PoolCore, "schedule", caller("sched0", "sched1", _pool.PoolCore.schedule))
        p.add(_driver.PoolDriver, "flush", caller("flush0", "flush1", _driver.PoolDriver.flush))
        real_enqueue = _io_thread._Engine.enqueue

        def enqueue(self: Any, task: Any) -> None:
            probe_.cur[P["locked"]] = now()
            real_enqueue(self, task)

        p.add(_io_thread._Engine, "enqueue", enqueue)

        real_on_readable = _driver.PoolDriver.on_readable

        def on_readable(self: Any, conn: Any, done: Any, reads: Any = 64) -> None:
            rec = probe_.io = probe_.cur
            if threading.get_ident() != probe_.main:  # the I/O thread read it
                rec[P["select_ret"]] = probe_.last_select
            rec[P["on_readable0"]] = now()
            real_on_readable(self, conn, done, reads)
            rec[P["on_readable1"]] = now()

        p.add(_driver.PoolDriver, "on_readable", on_readable)
        real_read_led = _io_thread._Engine.read_led

        def read_led(self: Any, conn: Any, done: Any) -> None:
            # The waiting thread reads its own result (leader/follower): its poll returned
            # and it holds the lock now.
            probe_.cur[P["select_ret"]] = now()
            real_read_led(self, conn, done)

        p.add(_io_thread._Engine, "read_led", read_led)
        p.add(_pool.PoolCore, "on_result", io("on_result0", "on_result1", _pool.PoolCore.on_result))
        stamped_complete = io("complete0", "complete1", executor._complete)

        def complete(done: Any) -> None:
            # A reading thread also calls it with nothing done (before it waits): no stamps.
            (stamped_complete if done else executor_complete)(done)

        executor_complete = executor._complete
        # The I/O thread and a waiting caller (NSFuture) each settle futures with it.
        p.add(_io_thread, "_complete", complete)
        p.add(executor, "_complete", complete)
        p.add(_serialize, "load_result", io("load0", "load1", _serialize.load_result))
        p.add(executor.NSFuture, "set_result", io("set0", "set1", Future.set_result))

        real_readv, real_writev = os.readv, os.writev

        def readv(fd: int, buffers: Any) -> int:
            rec = probe_.io
            rec[P["readvs"]] += 1
            n = real_readv(fd, buffers)  # BlockingIOError: the round's last, empty read
            if not rec[P["readv_ret"]]:
                rec[P["readv_ret"]] = now()
            return n

        def writev(fd: int, buffers: Any) -> int:
            if threading.get_ident() != probe_.main:
                return real_writev(fd, buffers)
            rec = probe_.cur
            rec[P["writev0"]] = now()
            n = real_writev(fd, buffers)
            rec[P["writev1"]] = now()
            return n

        p.add(os, "readv", readv)
        p.add(os, "writev", writev)

    def watch(self, engine: Any) -> None:
        """Stamp the return of the pool's I/O-thread select (set before any task is timed)."""
        real_select = engine.sel.select
        probe_ = self

        def select(timeout: Any = None) -> Any:
            events = real_select(timeout)
            probe_.last_select = now()
            return events

        engine.sel.select = select


# -- the floor's parent (bench_roundtrip._RawPipe, stamped) ----------------------------------------
class Floor:
    def __init__(self, shm_path: str, reader_thread: bool = False) -> None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        code = f"import benchmarks.profile_roundtrip as m; m._floor_child({shm_path!r})"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=root
        )
        self.stamps: list[list[int]] = []
        self.reader_thread = reader_thread
        self.pending: Future[Any] | None = None
        self.cv = threading.Condition()
        if reader_thread:  # the floor plus the hop nspool's design has: a reader sets a Future
            self.thread = threading.Thread(target=self._reader, daemon=True)
            self.thread.start()

    def _read(self) -> Any:
        import pickle

        assert self.proc.stdout is not None
        head = self.proc.stdout.read(4)
        if len(head) < 4:
            return EOFError
        return pickle.loads(self.proc.stdout.read(struct.unpack("<I", head)[0]))

    def _reader(self) -> None:
        while True:
            value = self._read()
            if value is EOFError:
                return
            with self.cv:
                fut = self.pending
            assert fut is not None
            fut.set_result(value)

    def call(self, fn: Callable[..., Any], *args: Any) -> tuple[Any, list[int]]:
        import pickle

        assert self.proc.stdin is not None
        s = [now()]
        data = pickle.dumps((fn, args), protocol=5)
        s.append(now())
        fut: Future[Any] = Future()
        if self.reader_thread:
            with self.cv:
                self.pending = fut
        self.proc.stdin.write(struct.pack("<I", len(data)) + data)
        self.proc.stdin.flush()
        s.append(now())
        if self.reader_thread:
            value = fut.result()
        else:
            value = self._read()
            s.append(now())
            fut.set_result(value)
            value = fut.result()
        s.append(now())
        return value, s

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.wait()
        self.proc.stdout.close()


# -- the run -------------------------------------------------------------------------------------
def _shm_file(prefix: str, nbytes: int) -> str:
    folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
    fd, path = tempfile.mkstemp(prefix=prefix, dir=folder)
    os.ftruncate(fd, nbytes)
    os.close(fd)
    return path


def _med_us(values: Sequence[float]) -> float:
    return statistics.median(values) / 1e3 if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=2000, help="timed calls per round and setup")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--plain-only", action="store_true", help="no instrumentation (for strace)")
    args = ap.parse_args(argv)

    # ``probe`` must be pickled by reference: take it from the module, not from __main__.
    from benchmarks import profile_roundtrip as mod
    from benchmarks._tasks import noop
    from nspool import NSPoolExecutor

    if args.plain_only:
        with NSPoolExecutor(args.workers) as pool:
            for _ in range(args.calls):
                pool.submit(noop, None).result()
        return 0

    total = args.rounds * (args.calls + args.warmup)
    wpath = _shm_file("nspool-prof-w-", total * NW * 8)
    fpath = _shm_file("nspool-prof-f-", total * NF * 8)
    atexit.register(_unlink_quietly, wpath, fpath)  # also when a run fails half-way
    os.environ[ENV_SHM] = wpath
    os.environ[ENV_PROGRAM] = str(os.getpid())
    load = os.getloadavg()
    print(
        f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
        f"{os.cpu_count()} CPUs; Python {sys.version.split()[0]}"
    )
    prog = ProgramProbe(total)
    plain = NSPoolExecutor(args.workers)
    inst = NSPoolExecutor(args.workers, preload=["benchmarks.profile_roundtrip"])
    prog.watch(inst._engine)
    floor = Floor(fpath)
    floor_thr = Floor(fpath, reader_thread=True)  # its calls say -1: it records nothing
    totals: dict[str, list[int]] = {
        "nspool": [],
        "nspool, instrumented": [],
        "floor": [],
        "floor + reader thread": [],
    }
    floor_parent: list[list[int]] = []
    idx = 0
    fidx = 0
    try:
        for pool in (plain, inst):
            for _ in range(50):  # every worker up, code paths hot
                list(pool.map(noop, range(8)))
                pool.submit(noop, None).result()
        for rnd in range(args.rounds):
            order = ["nspool", "nspool, instrumented", "floor", "floor + reader thread"]
            order = order[rnd % 4 :] + order[: rnd % 4]
            for setup in order:
                gc.collect()
                gc.disable()
                try:
                    for k in range(args.warmup + args.calls):
                        timed = k >= args.warmup
                        if setup == "nspool":
                            t = now()
                            plain.submit(noop, None).result()
                            dt = now() - t
                        elif setup == "nspool, instrumented":
                            rec = prog.records[idx]
                            prog.cur = rec
                            prog.patches.on()
                            rec[P["t0"]] = t = now()
                            fut = inst.submit(mod.probe, idx)
                            rec[P["submitted"]] = now()
                            fut.result()
                            rec[P["woke"]] = now()
                            dt = rec[P["woke"]] - t
                            prog.patches.off()
                            if not timed:
                                rec[P["t0"]] = 0  # left out of the segments
                            idx += 1
                        elif setup == "floor":
                            _, s = floor.call(mod.probe, fidx if timed else -1)
                            if timed:
                                floor_parent.append([fidx, *s])
                                fidx += 1
                            dt = s[-1] - s[0]
                        else:
                            _, s = floor_thr.call(mod.probe, -1)
                            dt = s[-1] - s[0]
                        if timed:
                            totals[setup].append(dt)
                finally:
                    gc.enable()
    finally:
        prog.patches.off()
        plain.shutdown()
        inst.shutdown()
        floor.close()
        floor_thr.close()
    load = os.getloadavg()
    print(f"load average at end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")

    wshm = _map_shared(wpath)
    fshm = _map_shared(fpath)
    wrecs = [list(wshm[i * NW : (i + 1) * NW]) for i in range(total)]
    frecs = [list(fshm[i * NF : (i + 1) * NF]) for i in range(total)]
    _unlink_quietly(wpath, fpath)

    calls = [
        (p, w) for p, w in zip(prog.records, wrecs, strict=True) if p[P["t0"]] and w[W["send1"]]
    ]
    print(
        f"\n{len(calls)} instrumented nspool calls with both records "
        f"({args.rounds} rounds x {args.calls}, {args.warmup} warm-up calls per round left out)"
    )

    def seg(a: str, b: str) -> list[float]:
        out: list[float] = []
        for p, w in calls:
            ta = w[W[a[2:]]] if a.startswith("w:") else p[P[a]]
            tb = w[W[b[2:]]] if b.startswith("w:") else p[P[b]]
            if ta and tb:
                out.append(tb - ta)
        return out

    rows = [
        ("program", "submit() entry: check_open, NSFuture()", "t0", "dump0"),
        ("program", "pickle the call (cloudpickle dump_task)", "dump0", "dump1"),
        ("program", "Task(), weakref, engine lock, enqueue entry", "dump1", "locked"),
        ("program", "core.submit + step + PoolCore.schedule", "locked", "sched1"),
        ("program", "_perform: task head, deque, flush up to writev", "sched1", "writev0"),
        ("program", "writev syscall (task frame)", "writev0", "writev1"),
        (
            "worker",
            "wake-up: task writev returned -> worker readv returns",
            "writev1",
            "w:readv_ret",
        ),
        ("worker", "decode frame (FrameDecoder), dispatch", "w:readv_ret", "w:started0"),
        ("worker", "set_started + doom check + split_task", "w:started0", "w:run0"),
        ("worker", "run_task entry -> unpickle the call", "w:run0", "w:loads1"),
        ("worker", "call the function (probe)", "w:loads1", "w:fn1"),
        ("worker", "pickle the result (dumps_result)", "w:fn1", "w:dump1"),
        ("worker", "run_task exit + set_started(False)", "w:dump1", "w:flush0"),
        ("worker", "_flush_stdio", "w:flush0", "w:flush1"),
        ("worker", "_wipe_leftovers (kill(-1) + waitpid)", "w:wipe0", "w:wipe1"),
        ("worker", "send: header + writev up to syscall", "w:wipe1", "w:writev0"),
        ("worker", "writev syscall (result frame)", "w:writev0", "w:writev1"),
        (
            "program",
            "wake-up: result writev returned -> the reader wakes and holds the lock",
            "w:writev1",
            "select_ret",
        ),
        (
            "program",
            "reader: dispatch to on_readable",
            "select_ret",
            "on_readable0",
        ),
        ("program", "readv + decode + _on_frame up to on_result", "on_readable0", "on_result0"),
        ("program", "PoolCore.on_result", "on_result0", "on_result1"),
        ("program", "on_readable exit (a short read ends the round)", "on_result1", "on_readable1"),
        (
            "program",
            "rest of the reader's round under the lock (step, give the pipe back)",
            "on_readable1",
            "complete0",
        ),
        ("program", "_complete -> unpickle the result", "complete0", "load1"),
        ("program", "Future.set_result", "load1", "set1"),
        ("program", "result() returns to the caller", "set1", "woke"),
    ]
    table = [(side, label, _med_us(seg(a, b))) for side, label, a, b in rows]
    seg_sum = sum(v for *_, v in table)
    inst_total = _med_us(seg("t0", "woke"))
    print("\n| side | segment | median µs | share |\n|---|---|---:|---:|")
    for side, label, v in table:
        print(f"| {side} | {label} | {v:.1f} | {100 * v / seg_sum:.0f}% |")
    print(f"| | sum of the segment medians | {seg_sum:.1f} | 100% |")
    print(f"| | median instrumented total (submit -> result) | {inst_total:.1f} | |")
    readvs = [p[P["readvs"]] for p, _ in calls]
    print(f"\nI/O-thread readv calls per result: median {statistics.median(readvs):.0f}")
    extra = [
        (
            "worker: worker wait in readv -> run (total worker time readv->send end)",
            "w:readv_ret",
            "w:send1",
        ),
        ("program: submit() call total", "t0", "submitted"),
        ("program: I/O thread select return -> set_result done", "select_ret", "set1"),
        ("worker: after the call: fn exit -> result writev end", "w:fn1", "w:writev1"),
    ]
    for label, a, b in extra:
        print(f"  {label}: {_med_us(seg(a, b)):.1f} µs")

    # the floor
    fcalls = [(s, frecs[s[0]]) for s in floor_parent if frecs[s[0]][F["write1"]]]
    # parent stamps: [idx, t0, pickled, written, read, woke]

    def fseg(a: tuple[str, Any], b: tuple[str, Any]) -> list[float]:
        out = []
        for s, c in fcalls:
            ta = s[a[1]] if a[0] == "p" else c[F[a[1]]]
            tb = s[b[1]] if b[0] == "p" else c[F[b[1]]]
            out.append(tb - ta)
        return out

    frows = [
        ("parent: pickle the call (pickle.dumps)", ("p", 1), ("p", 2)),
        ("parent: write + flush (one write syscall)", ("p", 2), ("p", 3)),
        ("child wakes: write done -> child read(4) returns", ("p", 3), ("c", "read_ret")),
        ("child: read body (buffered, no syscall)", ("c", "read_ret"), ("c", "body")),
        ("child: unpickle", ("c", "body"), ("c", "loads1")),
        ("child: call", ("c", "loads1"), ("c", "fn1")),
        ("child: pickle the result", ("c", "fn1"), ("c", "dump1")),
        ("child: write + flush", ("c", "dump1"), ("c", "write1")),
        (
            "parent wakes: child write done -> parent read returns, unpickle",
            ("c", "write1"),
            ("p", 4),
        ),
        ("parent: Future() set_result + result()", ("p", 4), ("p", 5)),
    ]
    ftable = [(label, _med_us(fseg(a, b))) for label, a, b in frows]
    fsum = sum(v for _, v in ftable)
    print(f"\nfloor ({len(fcalls)} calls)\n| segment | median µs | share |\n|---|---:|---:|")
    for label, v in ftable:
        print(f"| {label} | {v:.1f} | {100 * v / fsum:.0f}% |")
    print(f"| sum of the segment medians | {fsum:.1f} | 100% |")

    print("\nround trip, median per call (µs), rounds interleaved; then each round's median:")
    for name, vals in totals.items():
        per_round = [
            _med_us(vals[r * args.calls : (r + 1) * args.calls]) for r in range(args.rounds)
        ]
        print(
            f"  {name:24s} {_med_us(vals):7.1f}   (n={len(vals)})   "
            + " ".join(f"{v:.0f}" for v in per_round)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
