"""nspool as the executor of Dask workers (``nspool.dask``), on a real LocalCluster: 2 worker
processes under nannies (so the workers are daemonic), one cluster for the whole module."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip(
    "distributed",
    reason="nspool.dask needs the optional extra: pip install 'nspool[dask]'",
)

import dask  # noqa: E402
import tasks_dask  # noqa: E402
from _procs import (  # noqa: E402
    alive,
    cmdline,
    descendants,
    nspool_processes,
    shared_launcher_pids,
    wait_for,
    wait_gone,
)
from distributed import Client, LocalCluster  # noqa: E402

from nspool import TaskTimeoutError  # noqa: E402
from nspool.dask import NSPoolPlugin  # noqa: E402

# The cluster lives across tests, so the per-test leak check cannot apply: the module fixture
# checks at its end that the cluster left nothing behind.
pytestmark = [pytest.mark.leaks_ok, pytest.mark.timeout(60)]

#: multiprocessing's per-program helper, started by the cluster and kept until the program ends
HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def _not_helpers(pids: set[int]) -> set[int]:
    return {p for p in pids if not any(h in cmdline(p) for h in HELPERS)}


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    before = set(descendants())
    cluster = LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        worker_dashboard_address=None,
    )
    c = Client(cluster)
    try:
        c.register_plugin(NSPoolPlugin())
        yield c
    finally:
        c.close()
        cluster.close()
    assert cluster.status.name == "closed"

    def clean() -> bool:
        return not _not_helpers(set(descendants()) - before - shared_launcher_pids())

    assert wait_for(clean, 10), {
        p: cmdline(p) for p in _not_helpers(set(descendants()) - before - shared_launcher_pids())
    }
    # The cluster started multiprocessing's resource tracker in this process: stop it, so that
    # the tests after this module find no child process of ours.
    from multiprocessing import resource_tracker

    tracker: Any = resource_tracker._resource_tracker  # type: ignore[attr-defined]
    if tracker._pid is not None and tracker._pid not in before:
        tracker._stop()
    assert wait_for(lambda: not set(descendants()) - before - shared_launcher_pids(), 10), {
        p: cmdline(p) for p in set(descendants()) - before - shared_launcher_pids()
    }
    assert wait_for(lambda: not nspool_processes_of_ours(), 10), nspool_processes_of_ours()


def nspool_processes_of_ours() -> dict[int, str]:
    """nspool processes that are descendants of this test process or orphans (not this
    process's shared launcher, which outlives pools by design)."""
    mine = set(descendants()) - shared_launcher_pids()
    return {p: c for p, c in nspool_processes().items() if p in mine or _ppid(p) == 1}


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return -1
    return int(data[data.rindex(b")") + 2 :].split()[1])


def pools(client: Client, name: str = "nspool") -> dict[str, dict[str, Any]]:
    """Per Dask worker: its PID, PID namespace, and its nspool pool's launcher and workers."""

    def probe(dask_worker: Any) -> dict[str, Any]:
        ex = dask_worker.executors.get(name)
        return {
            "pid": os.getpid(),
            "ns": os.readlink("/proc/self/ns/pid"),
            "launcher": None if ex is None else ex.pool.launcher_pid,
            "workers": [] if ex is None else ex.pool.worker_pids(),
            "type": type(ex).__name__,
        }

    return client.run(probe)  # type: ignore[no-any-return]


def test_results_come_back_from_nspool_workers(client: Client) -> None:
    with dask.annotate(executor="nspool"):
        squares = client.gather(client.map(tasks_dask.square, range(20)))
        ran_in = client.gather(client.map(tasks_dask.where, range(4), pure=False))
    assert squares == [i * i for i in range(20)]
    info = pools(client)
    assert {i["type"] for i in info.values()} == {"DaskNSPoolExecutor"}
    dask_namespaces = {i["ns"] for i in info.values()}
    assert dask_namespaces == {os.readlink("/proc/self/ns/pid")}  # Dask workers: ours
    for ns, pid in ran_in:
        assert ns not in dask_namespaces  # each task ran in a PID namespace of its own
        assert pid not in {i["pid"] for i in info.values()}
    # Without the annotation, tasks stay on Dask's thread pool, in the Dask worker itself.
    assert client.submit(tasks_dask.where, pure=False).result()[0] in dask_namespaces


def test_default_max_workers_is_the_worker_thread_count(client: Client) -> None:
    sizes = client.run(lambda dask_worker: dask_worker.executors["nspool"].pool._max_workers)
    assert set(sizes.values()) == {1}


def test_leftovers_die_with_their_task(client: Client) -> None:
    with dask.annotate(executor="nspool"):
        daemons = client.gather(client.map(tasks_dask.leave_daemon, range(4), pure=False))
    assert not wait_gone(daemons, 5.0)
    # Dask's own thread pool keeps them (the reason to use nspool): kill that one ourselves.
    daemon = client.submit(tasks_dask.leave_daemon, pure=False).result()
    try:
        assert alive(daemon)
    finally:
        os.kill(daemon, signal.SIGKILL)


def test_a_crashing_task_fails_only_itself(client: Client) -> None:
    with dask.annotate(executor="nspool"):
        crash = client.submit(tasks_dask.crash, pure=False)
        others = client.map(tasks_dask.square, range(10, 20))
        with pytest.raises(Exception, match="exit|died|WorkerDied"):
            crash.result()
        assert client.gather(others) == [i * i for i in range(10, 20)]


@pytest.mark.parametrize("how", ["cancel", "release"])
def test_stopping_a_running_task_kills_its_tree(client: Client, tmp_path: Path, how: str) -> None:
    marker = str(tmp_path / "tree")
    with dask.annotate(executor="nspool"):
        fut = client.submit(tasks_dask.tree_then_block, marker, 60.0, pure=False)
    assert wait_for(lambda: os.path.exists(marker), 20), "the task never started"
    pids = [int(p) for p in Path(marker).read_text().split()]
    assert len(pids) == 4 and all(alive(p) for p in pids)
    t0 = time.monotonic()
    if how == "cancel":
        client.cancel(fut)
    else:
        fut.release()  # the only reference: the scheduler releases and forgets the key
        del fut
    left = wait_gone(pids, 1.0)
    took = time.monotonic() - t0
    assert not left, f"still alive {took:.2f} s after {how}: {left}"
    with dask.annotate(executor="nspool"):  # every pool serves on
        assert client.gather(client.map(tasks_dask.square, range(6))) == [0, 1, 4, 9, 16, 25]
    assert all(i["launcher"] and alive(i["launcher"]) for i in pools(client).values())


def test_kill_9_of_a_dask_worker_leaves_no_nspool_process(client: Client) -> None:
    with dask.annotate(executor="nspool"):
        client.gather(client.map(tasks_dask.square, range(8)))
    info = pools(client)
    addr, victim = sorted(info.items())[0]
    assert victim["launcher"] and victim["workers"], victim
    doomed = {victim["pid"], victim["launcher"], *victim["workers"]}
    os.kill(victim["pid"], signal.SIGKILL)
    assert not wait_gone(doomed, 5.0), {p: cmdline(p) for p in doomed if alive(p)}
    # The nanny starts a new worker, which gets a pool of its own from the plugin.
    assert wait_for(lambda: len(client.scheduler_info()["workers"]) == 2, 30)
    client.wait_for_workers(2, timeout=30)
    assert wait_for(lambda: all(i["launcher"] for i in pools(client).values()), 10)
    with dask.annotate(executor="nspool"):
        assert client.gather(client.map(tasks_dask.square, range(4))) == [0, 1, 4, 9]
    assert addr not in pools(client)


def test_a_late_plugin_reaches_running_and_new_workers(client: Client, tmp_path: Path) -> None:
    client.register_plugin(NSPoolPlugin("late", max_workers=2, task_timeout=30))
    try:
        info = pools(client, "late")
        assert len(info) == 2 and all(i["launcher"] for i in info.values())
        with dask.annotate(executor="late"):
            assert (
                client.submit(tasks_dask.where, pure=False).result()[0]
                != info[next(iter(info))]["ns"]
            )
        cluster = client.cluster
        assert cluster is not None
        cluster.scale(3)
        client.wait_for_workers(3, timeout=30)
        info = pools(client, "late")
        assert len(info) == 3 and all(i["launcher"] for i in info.values())
        assert all(i["launcher"] for i in pools(client).values())  # and the module's plugin
        # A worker that closes takes its pools with it (the plugin's teardown), and kills
        # the task it was running with its tree.
        launchers = {i["launcher"] for i in info.values()} | {
            i["launcher"] for i in pools(client).values()
        }
        newest = max(client.scheduler_info()["workers"].values(), key=lambda w: w["name"])
        marker = str(tmp_path / "tree")
        with dask.annotate(executor="late"):
            fut = client.submit(
                tasks_dask.tree_then_block, marker, 60.0, workers=[newest["id"]], pure=False
            )
        assert wait_for(lambda: os.path.exists(marker), 20), "the task never started"
        tree = [int(p) for p in Path(marker).read_text().split()]
        cluster.scale(2)
        assert wait_for(lambda: len(client.scheduler_info()["workers"]) == 2, 30)
        assert not wait_gone(tree, 5.0)
        client.cancel(fut)
        kept = {i["launcher"] for i in pools(client, "late").values()} | {
            i["launcher"] for i in pools(client).values()
        }
        assert not wait_gone(launchers - kept, 5.0)
    finally:
        client.unregister_worker_plugin("late")
    assert {i["launcher"] for i in pools(client, "late").values()} == {None}


def test_resource_limits_reach_the_pools_of_dask_workers(client: Client) -> None:
    from nspool._cgroups import layout

    if os.geteuid() != 0 or layout.check(["memory"])["memory"] is not None:
        pytest.skip("needs a usable memory controller (root here)")
    import tasks_limits

    from nspool import MemoryLimitError

    client.register_plugin(NSPoolPlugin("limited", memory_limit="64M"))
    try:
        with dask.annotate(executor="limited"):
            hog = client.submit(tasks_limits.hog_in_child, pure=False)
            with pytest.raises(MemoryLimitError) as info:
                hog.result(timeout=60)
            assert info.value.limit == 64 << 20  # it crossed to this process whole
            assert client.submit(tasks_limits.allocate, 8, pure=False).result() == 8 << 20
    finally:
        client.unregister_worker_plugin("limited")


def test_cli_preload_installs_the_plugin(client: Client) -> None:
    """``dask worker ADDRESS --preload nspool.dask --nspool-...``, from a shell."""
    import subprocess

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distributed.cli.dask_worker",
            client.scheduler.address,
            "--name",
            "from-cli",
            "--nthreads",
            "1",
            "--no-dashboard",
            "--preload",
            "nspool.dask",
            "--nspool-name",
            "cli",
            "--nspool-max-workers",
            "2",
            "--nspool-task-timeout",
            "0.5",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client.wait_for_workers(3, timeout=30)
        addr = next(
            a for a, w in client.scheduler_info()["workers"].items() if w["name"] == "from-cli"
        )
        info = pools(client, "cli")[addr]
        assert info["type"] == "DaskNSPoolExecutor" and info["launcher"]
        sizes = client.run(
            lambda dask_worker: dask_worker.executors["cli"].pool._max_workers, workers=[addr]
        )
        assert sizes == {addr: 2}
        with dask.annotate(executor="cli"):
            ns, _ = client.submit(tasks_dask.where, workers=[addr], pure=False).result()
            assert ns != info["ns"]
            slow = client.submit(tasks_dask.nap, 5.0, workers=[addr], pure=False)
            # --nspool-task-timeout reached the pool
            assert isinstance(slow.exception(timeout=20), TaskTimeoutError)
        launcher = info["launcher"]
        worker.terminate()  # dask worker's nanny closes the worker, the plugin its pool
        worker.wait(30)
        assert not wait_gone([launcher], 5.0)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert wait_for(lambda: len(client.scheduler_info()["workers"]) == 2, 30)


def test_import_nspool_does_not_import_distributed() -> None:
    import subprocess

    code = "import sys, nspool; nspool.NSPoolExecutor; print('distributed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
