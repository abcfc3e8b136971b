"""A program that owns a pool, used by tests that must kill or interrupt the owner.

usage: owner.py MODE
  hold     start a daemon and a 200-process tree in tasks, print the PIDs as JSON, then block
  print    run a task that prints to stdout and stderr, then exit
  ctrlc    run long tasks and wait for them (the test sends SIGINT), printing PIDs first
  daemonic run a pool inside a daemonic multiprocessing process
  noshutdown  submit a task and exit without shutting the pool down
  forkchild   like hold, but also fork a child that outlives the owner
  limits   a pool with resource limits and a daemon in it; print PIDs and cgroups, block
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tasks  # noqa: E402

from nspool import NSPoolExecutor  # noqa: E402


def report(**info: object) -> None:
    print(json.dumps(info), flush=True)


def hold() -> None:
    ex = NSPoolExecutor(2, kill_leftovers=False)
    tree_future = ex.submit(tasks.spawn_tree, 200)
    ex.submit(tasks.sleep_forever)  # the second worker runs this one
    tree = tree_future.result()
    while len(ex.worker_pids()) < 2:
        time.sleep(0.01)
    report(launcher=ex.launcher_pid, workers=ex.worker_pids(), tree=tree)
    sys.stdin.read()  # block until killed


def forkchild() -> None:
    ex = NSPoolExecutor(1, kill_leftovers=False)
    daemon = ex.submit(tasks.spawn_daemon).result()
    child = os.fork()
    if child == 0:  # a forked child (as multiprocessing's fork start method makes) lives on
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(1000)
        os._exit(0)
    report(launcher=ex.launcher_pid, workers=ex.worker_pids(), daemon=daemon, child=child)
    sys.stdin.read()


def limits() -> None:
    from _procs import pool_cgroups

    ex = NSPoolExecutor(1, kill_leftovers=False, memory_limit="128M", pids_limit=16)
    daemon = ex.submit(tasks.spawn_daemon).result()
    report(launcher=ex.launcher_pid, daemon=daemon, cgroups=sorted(pool_cgroups()))
    sys.stdin.read()


def print_mode() -> None:
    with NSPoolExecutor(1) as ex:
        ex.submit(tasks.print_and_return, "hello from a task").result()


def ctrlc() -> None:
    with NSPoolExecutor(2) as ex:
        futures = [ex.submit(tasks.sleep_forever) for _ in range(3)]
        daemon = ex.submit(tasks.spawn_daemon)
        while len(ex.worker_pids()) < 2:
            time.sleep(0.01)
        report(launcher=ex.launcher_pid, workers=ex.worker_pids())
        for f in futures:
            f.result()
        daemon.result()


def noshutdown() -> None:
    ex = NSPoolExecutor(1)
    report(launcher=ex.launcher_pid)
    ex.submit(tasks.print_and_return, "finished at exit")
    # no shutdown: the interpreter's exit must finish the task and tear the pool down


def ctrlc_bare() -> None:
    ex = NSPoolExecutor(2)  # no `with`, no shutdown: the interpreter's exit must clean up
    futures = [ex.submit(tasks.sleep_forever) for _ in range(2)]
    while len(ex.worker_pids()) < 2:
        time.sleep(0.01)
    report(launcher=ex.launcher_pid, workers=ex.worker_pids())
    for f in futures:
        f.result()


def _daemonic_child(q: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    with NSPoolExecutor(2) as ex:
        q.put(sorted(ex.map(tasks.square, range(5))))


def daemonic() -> None:
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_daemonic_child, args=(q,))
    p.daemon = True
    p.start()
    report(result=q.get(timeout=60))
    p.join(60)
    report(exitcode=p.exitcode)


if __name__ == "__main__":
    {
        "hold": hold,
        "limits": limits,
        "print": print_mode,
        "ctrlc": ctrlc,
        "daemonic": daemonic,
        "noshutdown": noshutdown,
        "forkchild": forkchild,
        "ctrlc-bare": ctrlc_bare,
    }[sys.argv[1]]()
