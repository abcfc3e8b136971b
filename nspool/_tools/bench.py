"""python -m nspool bench: what isolation costs on this machine, measured in about a minute.

Needs nothing but the standard library and nspool's own dependencies. nspool is compared with
concurrent.futures.ProcessPoolExecutor (forkserver context), 2 workers each. Inside every
repeat each contender runs once, in an order that changes from repeat to repeat; every figure
is the median over repeats and every ratio the median of the per-repeat ratios nspool / peer,
so it only ever divides figures of the same repeat. Figures:

- spawn: forking a worker in a new PID namespace (as root: unshare(CLONE_NEWPID) + fork +
  setns back; unprivileged: the same inside a user + PID namespace made first, as nspool does),
  against a plain os.fork() (what ProcessPoolExecutor's fork server does per worker); timed in
  a fresh single-threaded interpreter (nspool._tools.bench_probe), median of many spawns per repeat.
- spawn_private_proc: the same, with the child also mounting a private /proc.
- round_trip: submit a trivial function and wait for its result, one call at a time; a repeat's
  figure is its median call.
- throughput: that many trivial tasks submitted at once, then every result; tasks per second.
- teardown: a task starts a tree of sleep processes (one in ten a setsid'd, double-forked
  daemon) and returns; time from its return to /proc showing every process of the tree gone
  (nspool's kill_leftovers; the worker sends the result only once the tree is dead, so this
  includes the result's way back). ProcessPoolExecutor never stops them: no figure there.
- teardown_left: how many processes of that tree still run a fixed time after the task
  returned. The run kills the stdlib pool's survivors itself afterwards.

--json prints one JSON object instead of the table (progress lines always go to stderr):

- "nspool": the version; "quick": whether --quick ran; "isolation": "root" (a PID namespace
  per worker) or "user namespace" (a user + PID namespace, when not root).
- "machine": {"cpus", "kernel", "python", "uid", "root"}.
- "params": {"workers", "repeats", "spawns", "calls", "tasks", "tree", "left_after_s"}: the
  sizes used (spawns per probe, round-trip calls, tasks per throughput batch, processes per
  tree, seconds after the return at which teardown_left counts).
- "figures": one object per figure named above, each with "label", "unit" ("ms", "us",
  "tasks/s" or "processes"), "nspool" and "peer" (medians; the peer is a plain fork for the
  spawn figures and ProcessPoolExecutor otherwise), "ratio" (nspool / peer), the [min, max]
  over repeats of each as "nspool_range", "peer_range" and "ratio_range", "note", and "error"
  (why it was not measured). Numbers are null where there is no such value.
- "left_behind": processes the run found still running at its end (and killed).
- "seconds": the run's wall time; "ok": every figure measured and nothing left behind.

The exit status is 0 when "ok" holds, 1 otherwise.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

#: seconds any single result or probe may take before the measurement fails
TIMEOUT = 120.0
#: seconds the end-of-run check waits for the run's processes to exit
GONE_TIMEOUT = 10.0
#: one process in this many of a teardown tree is a setsid'd, double-forked daemon
DAEMON_EVERY = 10
#: tree processes exit on their own after this long, whatever happens to the run
TREE_LIFETIME = 30
PEER = "ProcessPoolExecutor"


# -- tasks: run in workers of both pools, so only the standard library at import ----------------


def noop(x: object) -> object:
    """The trivial task."""
    return x


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of ``pid`` from /proc, or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    return fields[0].decode(), int(fields[19])


def start_tree(n: int, lifetime: float) -> list[tuple[int, bool]]:
    """Start ``n`` processes that block in ``sleep`` for ``lifetime`` seconds (fork, then exec,
    so each is equally small whatever the caller's size), one in ``DAEMON_EVERY`` a daemon
    (``setsid`` and a double fork: it leaves the caller's tree). Returns once each has
    reported: its host PID (``/proc/self`` in the host's /proc, even inside a worker's PID
    namespace: the PID another process can watch) and whether it is a daemon.

    The tree of this bench's teardown figures and of the benchmark suite's (benchmarks/_tree.py).
    """
    sleep = shutil.which("sleep") or "/bin/sleep"
    r, w = os.pipe()
    for i in range(n):
        daemon = i % DAEMON_EVERY == DAEMON_EVERY - 1
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                if daemon:
                    os.setsid()
                    if os.fork():
                        os._exit(0)  # the daemon is orphaned: it leaves the worker's tree
                # /proc/self in the host's /proc: the PID the bench process can watch.
                host_pid = int(os.readlink("/proc/self"))
                os.write(w, b"%c%d\n" % (b"d" if daemon else b"p", host_pid))
                os.close(w)
                os.execv(sleep, [sleep, str(int(lifetime))])
            finally:
                os._exit(1)
        if daemon:
            os.waitpid(pid, 0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):  # EOF once every process wrote and closed (or exec'd)
        chunks.append(chunk)
    os.close(r)
    return [(int(line[1:]), line[:1] == b"d") for line in b"".join(chunks).split()]


def make_tree(n: int) -> tuple[int, dict[int, int]]:
    """Start ``n`` processes that block in ``sleep`` and return at once.

    Returns the CLOCK_MONOTONIC time of the return (the same clock in every process) and each
    process's host PID with its start time, so that a recycled PID is never taken for it.
    """
    pids = [pid for pid, _ in start_tree(n, TREE_LIFETIME)]
    if len(pids) != n:
        raise RuntimeError(f"{n - len(pids)} of the {n} tree processes failed to start")
    starts = {}
    for pid in pids:
        st = proc_stat(pid)
        if st is None or st[0] in "ZX":
            raise RuntimeError(f"tree process {pid} is not running")
        starts[pid] = st[1]
    return time.monotonic_ns(), starts


def reap_children() -> int:
    """Collect the worker's dead children (the killed tree); how many there were."""
    n = 0
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return n
        if pid == 0:
            return n
        n += 1


# -- /proc checks from the bench process --------------------------------------------------------


def running(pids: dict[int, int]) -> list[int]:
    """The processes of ``pids`` still running; a zombie or a reused PID counts as gone."""
    out = []
    for pid, start in pids.items():
        st = proc_stat(pid)
        if st is not None and st[0] not in "ZX" and st[1] == start:
            out.append(pid)
    return out


def wait_gone(pids: dict[int, int], timeout: float) -> list[int]:
    """Poll /proc until none of ``pids`` runs, or ``timeout``; those still running."""
    deadline = time.monotonic() + timeout
    while True:
        left = running(pids)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.001)


def kill_all(pids: dict[int, int]) -> int:
    """SIGKILL whichever of ``pids`` still runs and wait until it is gone; how many ran."""
    alive = running(pids)
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_gone({p: pids[p] for p in alive}, GONE_TIMEOUT)
    return len(alive)


def _descendants() -> dict[int, int]:
    """Running descendants of this process -> their start times."""
    table: dict[int, tuple[str, int, int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rindex(b")") + 2 :].split()
        table[int(name)] = (fields[0].decode(), int(fields[1]), int(fields[19]))
    children: dict[int, list[int]] = {}
    for pid, (_, ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out: dict[int, int] = {}
    todo = list(children.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        if table[pid][0] not in "ZX":
            out[pid] = table[pid][2]
        todo.extend(children.get(pid, []))
    return out


# -- the run ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Params:
    workers: int
    repeats: int
    spawns: int
    calls: int
    tasks: int
    tree: int
    left_after_s: float


DEFAULT = Params(
    workers=2, repeats=11, spawns=200, calls=1000, tasks=20_000, tree=100, left_after_s=0.2
)
QUICK = Params(workers=2, repeats=2, spawns=20, calls=50, tasks=500, tree=20, left_after_s=0.05)


@dataclass
class Figure:
    label: str
    unit: str
    note: str
    #: whether it has a ratio: nspool's figure divided by the peer's of the same repeat
    compared: bool
    nspool: list[float] = field(default_factory=list)
    peer: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    error: str | None = None

    def add(self, nspool: float | None, peer: float | None) -> None:
        if nspool is not None:
            self.nspool.append(nspool)
        if peer is not None:
            self.peer.append(peer)
        if self.compared and nspool is not None and peer:
            self.ratios.append(nspool / peer)

    def fail(self, why: str) -> None:
        if self.error is None:
            self.error = why


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _span(values: Sequence[float]) -> list[float] | None:
    return [min(values), max(values)] if values else None


@contextmanager
def _no_gc() -> Iterator[None]:
    """Keep the cyclic GC out of a timed section, as timeit does."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _progress(text: str) -> None:
    print(f"nspool bench: {text}", file=sys.stderr, flush=True)


def _why(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0] if text else type(exc).__name__


class ProbeError(Exception):
    """The probe failed; the message is its own last line (the machine's refusal, usually)."""


def _probe(mode: str, count: int) -> float:
    """Median spawn time (ms) of one mechanism, timed in a fresh interpreter."""
    from .._core.launcher_link import module_command  # (not at the top: workers import this module)

    done = subprocess.run(
        [*module_command("nspool._tools.bench_probe"), mode, str(count)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise ProbeError(lines[-1] if lines else f"the probe exited with status {done.returncode}")
    times = json.loads(done.stdout)
    if not isinstance(times, list) or len(times) != count:
        raise ProbeError(f"the probe printed {done.stdout[:100]!r}")
    return float(statistics.median(times)) / 1e6


def _bench_spawn(p: Params, figs: dict[str, Figure], root: bool) -> None:
    ns = "pidns" if root else "userns"
    modes = {"fork": "fork", "spawn": ns, "spawn_private_proc": f"{ns}+proc"}
    keys = list(modes)
    for rep in range(p.repeats):
        _progress(f"worker spawn, repeat {rep + 1}/{p.repeats}")
        got: dict[str, float] = {}
        for key in keys[rep % 3 :] + keys[: rep % 3]:  # a rotating order: drift hits all alike
            if key != "fork" and figs[key].error is not None:
                continue  # the machine refused it once: it will again
            try:
                got[key] = _probe(modes[key], p.spawns)
            except (ProbeError, subprocess.SubprocessError) as exc:
                if key == "fork":
                    raise ProbeError(f"plain fork failed: {exc}") from exc
                figs[key].fail(f"refused here: {exc}")
        for key in keys[1:]:
            if key in got:
                figs[key].add(got[key], got["fork"])


def _round_trip(ex: Executor, calls: int) -> float:
    samples = []
    with _no_gc():
        for _ in range(calls):
            t = time.perf_counter_ns()
            ex.submit(noop, None).result(TIMEOUT)
            samples.append(time.perf_counter_ns() - t)
    return statistics.median(samples) / 1e3


def _throughput(ex: Executor, tasks: int) -> float:
    with _no_gc():
        t = time.perf_counter_ns()
        futures = [ex.submit(noop, i) for i in range(tasks)]
        for f in futures:
            f.result(TIMEOUT)
        took = time.perf_counter_ns() - t
    return tasks / (took / 1e9)


def _warm_up(ex: Executor, workers: int) -> None:
    """Start every worker and run the code paths once before anything is timed."""
    for f in [ex.submit(noop, i) for i in range(4 * workers)]:
        f.result(TIMEOUT)
    for _ in range(20):
        ex.submit(noop, None).result(TIMEOUT)


def _pools(stack: ExitStack, workers: int) -> tuple[Executor, Executor]:
    """A warm NSPoolExecutor and a warm forkserver ProcessPoolExecutor, closed by ``stack``."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from ..executor import NSPoolExecutor

    ns = stack.enter_context(NSPoolExecutor(workers))
    ppe = stack.enter_context(
        ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver"))
    )
    _warm_up(ns, workers)
    _warm_up(ppe, workers)
    return ns, ppe


def _in_turn(
    rep: int, ns: Executor, ppe: Executor, fn: Callable[[Executor], float]
) -> tuple[float, float]:
    """``fn`` on both pools, nspool first in even repeats, so that drift hits both alike."""
    if rep % 2 == 0:
        a = fn(ns)
        return a, fn(ppe)
    b = fn(ppe)
    return fn(ns), b


def _bench_pools(p: Params, figs: dict[str, Figure]) -> None:
    rt, tp = figs["round_trip"], figs["throughput"]
    with ExitStack() as stack:
        _progress(f"starting NSPoolExecutor and {PEER} (forkserver), {p.workers} workers each")
        try:
            ns, ppe = _pools(stack, p.workers)
        except Exception as exc:  # noqa: BLE001 - reported as the figures' error
            for fig in (rt, tp):
                fig.fail(f"a pool did not start: {_why(exc)}")
            return
        for rep in range(p.repeats):
            _progress(f"round trip and throughput, repeat {rep + 1}/{p.repeats}")
            rt.add(*_in_turn(rep, ns, ppe, lambda ex: _round_trip(ex, p.calls)))
            tp.add(*_in_turn(rep, ns, ppe, lambda ex: _throughput(ex, p.tasks)))


def _bench_teardown(p: Params, figs: dict[str, Figure], trees: dict[int, int]) -> None:
    """Time nspool's teardown of a returned task's tree; count what the stdlib leaves."""
    gone, left = figs["teardown"], figs["teardown_left"]
    with ExitStack() as stack:
        _progress(f"starting 1-worker pools for the teardown of {p.tree}-process trees")
        try:
            # One worker each: the stdlib pool's killed tree must be reaped by the worker
            # that started it, and with one worker the reaping task reaches that one.
            ns, ppe = _pools(stack, 1)
        except Exception as exc:  # noqa: BLE001 - reported as the figures' error
            for fig in (gone, left):
                fig.fail(f"a pool did not start: {_why(exc)}")
            return

        def nspool_tree() -> tuple[float, float]:
            returned, starts = ns.submit(make_tree, p.tree).result(TIMEOUT)
            trees.update(starts)
            if wait_gone(starts, GONE_TIMEOUT):
                raise TimeoutError(f"the tree still ran {GONE_TIMEOUT:g} s after the return")
            took = (time.monotonic_ns() - returned) / 1e6
            time.sleep(max(0.0, returned / 1e9 + p.left_after_s - time.monotonic()))
            return took, float(len(running(starts)))

        def ppe_tree() -> float:
            returned, starts = ppe.submit(make_tree, p.tree).result(TIMEOUT)
            trees.update(starts)
            time.sleep(max(0.0, returned / 1e9 + p.left_after_s - time.monotonic()))
            survivors = len(running(starts))
            kill_all(starts)  # what the stdlib leaves, this run stops itself
            ppe.submit(reap_children).result(TIMEOUT)
            return float(survivors)

        for rep in range(p.repeats):
            _progress(f"teardown, repeat {rep + 1}/{p.repeats}")
            if rep % 2 == 0:
                took, ns_left = nspool_tree()
                ppe_left = ppe_tree()
            else:
                ppe_left = ppe_tree()
                took, ns_left = nspool_tree()
            gone.add(took, None)
            left.add(ns_left, ppe_left)


def _figures(p: Params, root: bool) -> dict[str, Figure]:
    how = "unshare(NEWPID)+fork+setns" if root else "unshare(NEWPID)+fork+setns in a user ns"
    return {
        "spawn": Figure(
            "worker spawn",
            "ms",
            f"{how} vs plain fork",
            True,
        ),
        "spawn_private_proc": Figure(
            "worker spawn, private /proc",
            "ms",
            "the same + mount ns + proc mount vs plain fork",
            True,
        ),
        "round_trip": Figure(
            "round trip, submit->result",
            "us",
            f"median of {p.calls:,} sequential calls",
            True,
        ),
        "throughput": Figure(
            f"throughput, {p.tasks:,} tasks at once",
            "tasks/s",
            "until the last result is in",
            True,
        ),
        "teardown": Figure(
            f"teardown, {p.tree}-process tree",
            "ms",
            "task return -> /proc shows all gone",
            False,
        ),
        "teardown_left": Figure(
            f"  still running {p.left_after_s:g} s later",
            "processes",
            f"of {p.tree} ({p.tree // DAEMON_EVERY} setsid'd); the run kills the stdlib's",
            False,
        ),
    }


def _machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count() or 1,
        "kernel": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "uid": os.geteuid(),
        "root": os.geteuid() == 0,
    }


def _cleanup(trees: dict[int, int]) -> int:
    """Stop the per-program helpers (nspool's shared launcher, multiprocessing's), then find
    (and kill) whatever this run left running: its descendants and the processes of its
    trees. How many there were."""
    from multiprocessing import forkserver, resource_tracker

    from .._core.shared_launcher import close_shared_launcher

    close_shared_launcher()

    # Private, but the only way to end them (CPython's own tests do so); absent: nothing to do.
    helpers = (
        getattr(forkserver, "_forkserver", None),
        getattr(resource_tracker, "_resource_tracker", None),
    )
    for helper in helpers:
        stop = getattr(helper, "_stop", None)
        if stop is not None:
            try:
                stop()
            except Exception:  # noqa: BLE001 - a helper that is already gone is fine
                pass
    if wait_gone(_descendants(), GONE_TIMEOUT) or running(trees):
        left = {**_descendants(), **{p: trees[p] for p in running(trees)}}
        _progress(f"killing {len(left)} processes the run left behind: {sorted(left)}")
        return kill_all(left)
    return 0


def _fmt(x: float | None, unit: str = "") -> str:
    """Three significant digits, thousands separated, counts whole; '-' for a missing value."""
    if x is None or math.isnan(x):
        return "-"
    if unit == "processes":
        return f"{x:.0f}"
    if x == 0:
        text = "0"
    else:
        digits = max(0, 2 - int(math.floor(math.log10(abs(x)))))
        text = f"{x:,.{digits}f}"
    return f"{text} {unit}".rstrip()


def _round(x: float | None) -> float | None:
    return None if x is None else float(f"{x:.6g}")


def _as_json(fig: Figure) -> dict[str, Any]:
    def span(v: Sequence[float]) -> list[float | None] | None:
        s = _span(v)
        return None if s is None else [_round(s[0]), _round(s[1])]

    return {
        "label": fig.label.strip(),
        "unit": fig.unit,
        "nspool": _round(_median(fig.nspool)),
        "peer": _round(_median(fig.peer)),
        "ratio": _round(_median(fig.ratios)),
        "nspool_range": span(fig.nspool),
        "peer_range": span(fig.peer),
        "ratio_range": span(fig.ratios),
        "note": fig.note,
        "error": fig.error,
    }


def _table(figs: dict[str, Figure]) -> list[str]:
    """The table's lines, then a footnote for each distinct reason a figure was not measured."""
    head = ("figure", "nspool", PEER, "ratio", "notes")
    rows: list[tuple[str, ...]] = [head]
    reasons: list[str] = []
    for key, fig in figs.items():
        if fig.error is not None:
            if fig.error not in reasons:
                reasons.append(fig.error)
            note = f"not measured [{reasons.index(fig.error) + 1}]"
            rows.append((fig.label, "-", "-", "-", note))
            continue
        ratio = _median(fig.ratios)
        rtext = "-"
        if ratio is not None:
            rtext = f"{ratio:.2f}x"
            if len(fig.ratios) > 1:
                rtext += f" [{min(fig.ratios):.2f}-{max(fig.ratios):.2f}]"
        ns, peer = _fmt(_median(fig.nspool), fig.unit), _fmt(_median(fig.peer), fig.unit)
        if key == "teardown":
            peer = "never"
        rows.append((fig.label, ns, peer, rtext, fig.note))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    out = []
    for r in rows:
        cells = [r[0].ljust(widths[0]), r[1].rjust(widths[1]), r[2].rjust(widths[2])]
        out.append("  ".join([*cells, r[3].ljust(widths[3]), r[4]]).rstrip())
    out.insert(1, "-" * max(len(line) for line in out))
    if reasons:
        out.append("")
        out.extend(f"[{i}] {why}" for i, why in enumerate(reasons, 1))
    return out


def run(quick: bool, as_json: bool) -> int:
    """Measure, print the report (table or JSON) and return the exit status."""
    from .. import __version__

    t0 = time.monotonic()
    p = QUICK if quick else DEFAULT
    root = os.geteuid() == 0
    figs = _figures(p, root)
    trees: dict[int, int] = {}
    sections: list[tuple[Callable[[], None], tuple[str, ...]]] = [
        (lambda: _bench_spawn(p, figs, root), ("spawn", "spawn_private_proc")),
        (lambda: _bench_pools(p, figs), ("round_trip", "throughput")),
        (lambda: _bench_teardown(p, figs, trees), ("teardown", "teardown_left")),
    ]
    try:
        for section, keys in sections:
            try:
                section()
            except Exception as exc:  # noqa: BLE001 - a failed measurement is reported
                _progress(f"{', '.join(keys)} failed: {_why(exc)}")
                for key in keys:
                    figs[key].fail(_why(exc))
    except KeyboardInterrupt:
        # Ctrl-C: the pools are closed on the way out; end the run's processes, report nothing.
        killed = _cleanup(trees)
        _progress("interrupted" + (f"; killed {killed} processes it left" if killed else ""))
        return 130
    left_behind = _cleanup(trees)
    seconds = time.monotonic() - t0
    ok = left_behind == 0 and all(f.error is None for f in figs.values())
    machine = _machine()
    if as_json:
        report = {
            "nspool": __version__,
            "quick": quick,
            "isolation": "root" if root else "user namespace",
            "machine": machine,
            "params": {
                "workers": p.workers,
                "repeats": p.repeats,
                "spawns": p.spawns,
                "calls": p.calls,
                "tasks": p.tasks,
                "tree": p.tree,
                "left_after_s": p.left_after_s,
            },
            "figures": {key: _as_json(fig) for key, fig in figs.items()},
            "left_behind": left_behind,
            "seconds": round(seconds, 2),
            "ok": ok,
        }
        print(json.dumps(report, indent=2))
        return 0 if ok else 1
    who = (
        "root (uid 0): each worker is a PID namespace"
        if root
        else f"not root (uid {machine['uid']}): each worker is a PID namespace in a user namespace"
    )
    print(f"nspool {__version__} bench: what isolation costs on this machine")
    print(f"machine: {machine['cpus']} CPUs, {machine['kernel']}, {machine['python']}, {who}")
    print(
        f"pools: {p.workers} workers each, {PEER} with the forkserver context; "
        f"medians of {p.repeats} repeats, the two pools in turn"
    )
    print()
    for line in _table(figs):
        print(line)
    print()
    print("ratio: nspool / the peer column, median of the per-repeat ratios [min-max];")
    print("       nspool is faster where a time's ratio is below 1 and a rate's is above 1")
    measured = sum(f.error is None for f in figs.values())
    rest = "nothing left behind" if left_behind == 0 else f"{left_behind} processes LEFT BEHIND"
    print(f"took {seconds:.0f} s; {measured} of {len(figs)} figures measured; {rest}")
    return 0 if ok else 1
