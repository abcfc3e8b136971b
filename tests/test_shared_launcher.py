"""One launcher per program, shared by its pools: what each pool keeps of its own, what a
pool's close touches (its workers only), and what happens when the launcher goes."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
from pathlib import Path

import anyio
import pytest
import tasks
import tasks_shared
from _procs import (
    alive,
    comm,
    descendants,
    pool_processes,
    shared_launcher_pids,
    spare_worker,
    wait_for,
    wait_gone,
)

import nspool
from nspool import NSPoolExecutor
from nspool._core import shared_launcher
from nspool.errors import BrokenProcessPool


def _children(pid: int) -> set[int]:
    return {p for p in descendants(pid) if p not in shared_launcher_pids()}


def test_pools_of_a_program_share_one_launcher() -> None:
    with NSPoolExecutor(1) as a, NSPoolExecutor(1) as b:
        assert a.submit(tasks.square, 3).result() == 9
        assert b.submit(tasks.square, 4).result() == 16
        assert a.launcher_pid == b.launcher_pid
        shared = shared_launcher.current()
        assert shared is not None and shared.pid == a.launcher_pid
    # It outlives them, with nothing under it, for the next pool.
    assert alive(shared.pid) and not _children(shared.forkserver_pid)
    with NSPoolExecutor(1) as c:
        assert c.submit(tasks.square, 5).result() == 25
        assert c.launcher_pid == shared.pid


def test_closing_a_pool_kills_its_workers_only() -> None:
    with NSPoolExecutor(1, kill_leftovers=False) as keeper:
        kept_daemon = keeper.submit(tasks.spawn_daemon).result()
        running = keeper.submit(tasks.sleep_then_square, 0.5, 7)
        other = NSPoolExecutor(2, kill_leftovers=False)
        daemons = [other.submit(tasks.spawn_daemon).result() for _ in range(3)]
        workers = other.worker_pids()
        assert all(alive(p) for p in daemons + workers)
        other.shutdown(wait=True)
        # Gone by the time shutdown returns: the launcher closed the pool's socket only once
        # it had reaped the pool's last worker (and the kernel its namespace).
        assert not any(alive(p) for p in daemons + workers)
        assert alive(kept_daemon)
        assert running.result(timeout=30) == 49
        assert keeper.submit(tasks.square, 8).result() == 64
    assert not alive(kept_daemon)


def test_a_pool_sees_the_program_as_it_was_when_the_pool_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    with NSPoolExecutor(1) as first:
        first.submit(tasks.square, 1).result()  # the shared launcher runs
        (tmp_path / "shared_marker_mod.py").write_text("VALUE = 'found'\n")
        monkeypatch.setenv("NSPOOL_SHARED_TEST", "second")
        monkeypatch.chdir(tmp_path)
        monkeypatch.syspath_prepend(str(tmp_path))
        with NSPoolExecutor(1) as second:
            assert second.launcher_pid == first.launcher_pid
            assert second.submit(tasks_shared.environment, "NSPOOL_SHARED_TEST").result() == (
                "second",
                str(tmp_path),
            )
            assert second.submit(tasks_shared.import_and_call, "shared_marker_mod").result() == (
                "found"
            )
            second.submit(tasks_shared.write_to_stderr, "from-the-second-pool\n").result()
        # The first pool's workers keep the program of their time.
        got = first.submit(tasks_shared.environment, "NSPOOL_SHARED_TEST").result()
        assert got == (None, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert "from-the-second-pool" in capfd.readouterr().err


def test_pools_with_preload_or_limits_get_a_launcher_of_their_own() -> None:
    with NSPoolExecutor(1) as shared, NSPoolExecutor(1, preload=["json"]) as own:
        assert own.submit(tasks.square, 2).result() == 4
        assert own.launcher_pid != shared.launcher_pid
        own_launcher = own.launcher_pid
    assert not alive(own_launcher)  # closed with its pool


def test_killing_the_shared_launcher_breaks_its_pools_and_the_next_pool_starts_another() -> None:
    a = NSPoolExecutor(1)
    b = NSPoolExecutor(1)
    try:
        a.submit(tasks.square, 1).result()
        b.submit(tasks.square, 1).result()
        victims = [*a.worker_pids(), *b.worker_pids()]
        old = a.launcher_pid
        os.kill(old, signal.SIGKILL)
        assert not wait_gone(victims, 10)
        for ex in (a, b):
            assert wait_for(lambda ex=ex: ex._engine.broken is not None, 10)
            with pytest.raises(BrokenProcessPool, match="launcher"):
                ex.submit(tasks.square, 2).result(timeout=10)
    finally:
        a.shutdown()
        b.shutdown()
    with NSPoolExecutor(1) as c:
        assert c.submit(tasks.square, 6).result() == 36
        assert c.launcher_pid != old


def test_close_shared_launcher_stops_it_and_breaks_open_pools() -> None:
    ex = NSPoolExecutor(1)
    try:
        assert ex.submit(tasks.square, 3).result() == 9
        launcher = ex.launcher_pid
        nspool.close_shared_launcher()
        assert not alive(launcher) and shared_launcher.current() is None
        with pytest.raises(BrokenProcessPool):
            ex.submit(tasks.square, 2).result(timeout=10)
    finally:
        ex.shutdown()
    nspool.close_shared_launcher()  # nothing runs: nothing to do
    with NSPoolExecutor(1) as again:
        assert again.submit(tasks.square, 4).result() == 16


@pytest.mark.leaks_ok  # checks its own: the child's launcher must be gone with the child
@pytest.mark.filterwarnings("ignore:This process.*is multi-threaded:DeprecationWarning")
def test_a_forked_child_opens_pools_on_a_launcher_of_its_own() -> None:
    with NSPoolExecutor(1) as parent_pool:
        parent_pool.submit(tasks.square, 1).result()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through the pipe
            code = 1
            try:
                os.close(r)
                with NSPoolExecutor(1) as child_pool:
                    same = child_pool.launcher_pid == parent_pool.launcher_pid
                    os.write(
                        w,
                        f"{child_pool.submit(tasks.square, 9).result()} {same} "
                        f"{child_pool.launcher_pid}".encode(),
                    )
                code = 0
            finally:
                os._exit(code)  # no atexit: the launcher must still go with this process
        os.close(w)
        with os.fdopen(r, "rb") as f:
            answer = f.read().decode().split()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert answer[:2] == ["81", "False"]
        assert not wait_gone([int(answer[2])], 10), "the child's launcher outlived it"
        # The parent's pool never noticed.
        assert parent_pool.submit(tasks.square, 2).result() == 4
    assert pool_processes() == {}


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_async_pools_share_the_launcher_with_executors(backend: str) -> None:
    async def main() -> tuple[int, int, list[int]]:
        async with nspool.open_pool(1) as p, nspool.open_pool(1) as q:
            results = [await p.run(tasks.square, 2), await q.run(tasks.square, 3)]
            return p.launcher_pid, q.launcher_pid, results

    with NSPoolExecutor(1) as ex:
        ex.submit(tasks.square, 1).result()
        p_pid, q_pid, results = anyio.run(main, backend=backend)
        assert p_pid == q_pid == ex.launcher_pid
        assert results == [4, 9]
        # The async pools' workers are gone; the executor's one remains.
        assert set(pool_processes()) <= set(descendants(ex.launcher_pid))
        assert len([p for p in ex.worker_pids() if alive(p)]) == 1


def test_a_program_that_exits_takes_its_shared_launcher_with_it(tmp_path: Path) -> None:
    """A program that leaves without closing anything: its exit (atexit) waits for the
    launcher; nothing of it remains."""
    script = tmp_path / "prog.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {os.path.dirname(__file__)!r})
            import tasks
            from nspool import NSPoolExecutor
            ex = NSPoolExecutor(2, kill_leftovers=False)
            print(ex.launcher_pid, ex.submit(tasks.spawn_daemon).result(), flush=True)
            """
        )
    )
    import subprocess

    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    launcher, daemon = int(out[0]), int(out[1])
    assert not wait_gone([launcher, daemon], 10)


# -- the spare worker ---------------------------------------------------------------------------
# The shared launcher keeps one worker forked ahead of need; a new pool's first worker is that
# one (no fork while the program waits), and another spare is forked once the launcher is idle.


def _wait_spare(other_than: int | None = None) -> tuple[int, int]:
    """The spare worker's (init, task loop), once there is one (not ``other_than``'s)."""
    found: list[tuple[int, int]] = []

    def there() -> bool:
        spare = spare_worker()
        if spare is not None and spare[0] != other_than:
            found.append(spare)
            return True
        return False

    assert wait_for(there, 10), "the shared launcher has no spare worker"
    return found[-1]


def test_a_new_pools_first_worker_is_the_spare_and_a_new_spare_follows() -> None:
    with NSPoolExecutor(1) as first:
        first.submit(tasks.square, 1).result()  # the shared launcher runs
        init, loop = _wait_spare()
        assert init not in pool_processes() and loop not in pool_processes()
        with NSPoolExecutor(2) as second:
            assert second.submit(tasks_shared.parent_pid).result() == init
            assert second.worker_pids() == [loop]
            # The init names itself once it took the pool's part, which may be just after
            # its task loop (which got its own part) answered.
            assert wait_for(lambda: comm(init) == "nspool-init", 10), comm(init)
            assert comm(loop) == "nspool-worker"
            assert {init, loop} <= set(pool_processes())  # the pool's now, no longer spare
            new_init, new_loop = _wait_spare(other_than=init)
            # The pool's second worker is forked for it; the new spare waits for a new pool.
            both = [second.submit(tasks.sleep_then_square, 0.3, i) for i in range(2)]
            assert [f.result(timeout=30) for f in both] == [0, 1]
            assert len(second.worker_pids()) == 2 and new_loop not in second.worker_pids()
            assert spare_worker() == (new_init, new_loop)
        # Closed with its pool, as any worker; the new spare stays for the next pool.
        assert not wait_gone([init, loop], 10)
        assert spare_worker() == (new_init, new_loop)


def test_a_worker_from_the_spare_is_made_as_a_forked_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    with NSPoolExecutor(1) as first:
        first.submit(tasks.square, 1).result()
        init, _ = _wait_spare()
        (tmp_path / "spare_marker_mod.py").write_text("VALUE = 'found'\n")
        monkeypatch.setenv("NSPOOL_SPARE_TEST", "pool's")
        monkeypatch.chdir(tmp_path)
        monkeypatch.syspath_prepend(str(tmp_path))
        # One task per worker: the first worker is the spare, the second is forked for it.
        with NSPoolExecutor(1, max_tasks_per_child=1) as pool:
            views = [
                pool.submit(
                    tasks_shared.worker_view, "NSPOOL_SPARE_TEST", "spare_marker_mod"
                ).result()
                for _ in range(2)
            ]
            pool.submit(tasks_shared.write_to_stderr, "from-a-spare-made-pool\n").result()
    spare_made, forked = views
    assert spare_made["parent"] == init and forked["parent"] != init
    for view in views:
        assert (view["env"], view["cwd"], view["value"]) == ("pool's", str(tmp_path), "found")
    # The same fds, kind by kind: nothing of the hand-over (its sockets, the state block's fd,
    # the rehearsal's pipes) stays open in a worker made from the spare.
    assert spare_made["fds"] == forked["fds"]
    assert "socket" not in spare_made["fds"]
    assert "from-a-spare-made-pool" in capfd.readouterr().err


@pytest.mark.parametrize("victim", ["init", "task loop"])
def test_a_dead_spare_costs_the_next_pool_a_fork_only(victim: str) -> None:
    with NSPoolExecutor(1) as first:
        first.submit(tasks.square, 1).result()
        init, loop = _wait_spare()
        os.kill(init if victim == "init" else loop, signal.SIGKILL)
        assert not wait_gone([init, loop], 10)  # its init exits when its loop dies
        assert spare_worker() is None  # and none is forked until a pool asks
        with NSPoolExecutor(1) as second:
            assert second.submit(tasks_shared.parent_pid).result() != init
            assert second.submit(tasks.square, 4).result() == 16
            # The pool found no spare: one is made for the next pool.
            new_init, _ = _wait_spare()
        with NSPoolExecutor(1) as third:
            assert third.submit(tasks_shared.parent_pid).result() == new_init
        assert first.submit(tasks.square, 5).result() == 25
