"""Leak checks: every test must leave no process, zombie, fd or I/O thread behind, and the
session must end with no nspool process anywhere on the machine."""

from __future__ import annotations

import os
import sys
import threading

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from _procs import (  # noqa: E402
    alive,
    descendants,
    nspool_processes,
    open_fds,
    pool_cgroups,
    wait_for,
)

GRACE = 5.0  # seconds a test's processes get to disappear after it (shutdown(wait=False))


def _describe(pids: dict[int, str]) -> str:
    from _procs import cmdline

    return "\n".join(f"  pid {p} state {s}: {cmdline(p)!r}" for p, s in pids.items())


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    before_fds = open_fds()
    before_procs = set(descendants())
    before_cgroups = pool_cgroups()
    yield
    if request.node.get_closest_marker("leaks_ok"):
        return

    def clean() -> bool:
        return (
            not (set(descendants()) - before_procs - _shared_launcher_pids())
            and not (open_fds() - before_fds - _shared_launcher_fds())
            and not [t for t in threading.enumerate() if t.name == "nspool-io"]
            and not _our_cgroups(before_cgroups)
        )

    if wait_for(clean, GRACE):
        return
    shared = _shared_launcher_pids()
    procs = {p: s for p, s in descendants().items() if p not in before_procs | shared}
    fds = open_fds() - before_fds - _shared_launcher_fds()
    threads = [t.name for t in threading.enumerate() if t.name == "nspool-io"]
    details = []
    if procs:
        details.append("processes left behind:\n" + _describe(procs))
    if fds:
        targets = {}
        for fd in sorted(fds):
            try:
                targets[fd] = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                targets[fd] = "?"
        details.append(f"fds left open: {targets}")
    if threads:
        details.append(f"I/O threads still running: {threads}")
    cgroups = _our_cgroups(before_cgroups)
    if cgroups:
        details.append(f"pool cgroups left behind: {sorted(cgroups)}")
        _remove_cgroups(cgroups)  # one failure must not poison the machine for the rest
    pytest.fail("test leaked resources:\n" + "\n".join(details), pytrace=False)


def _shared_launcher_pids() -> set[int]:
    """The program's shared launcher (its outer process, fork server and spare worker) is
    meant to outlive the pools, so the test that started it leaks nothing; its pools' workers
    still count."""
    from nspool._core import shared_launcher

    process = shared_launcher.current()
    if process is None:
        return set()
    return process.pids()


def _shared_launcher_fds() -> set[int]:
    from nspool._core import shared_launcher

    process = shared_launcher.current()
    return set() if process is None or process.closed else {process.fileno()}


def _our_cgroups(before: set[str]) -> set[str]:
    """Pool cgroups made since ``before`` that are leaks of this run: their owner (the
    launcher named in ``nspool-<pid>-<hex>``) is ours, or is gone (a live launcher removes
    its subtree before it exits, so a subtree without its owner is always a leak). Pools of
    other programs, such as a benchmark beside the tests, are left alone."""
    mine = set(descendants())
    leaked = set()
    for d in pool_cgroups() - before:
        owner = int(os.path.basename(d).split("-")[1])
        if owner in mine or not alive(owner):
            leaked.add(d)
    return leaked


def _remove_cgroups(dirs: set[str]) -> None:
    for d in dirs:
        if alive(int(os.path.basename(d).split("-")[1])):
            continue  # its launcher still runs: it removes the subtree itself
        for sub in [e.path for e in os.scandir(d) if e.is_dir()] + [d]:
            try:
                os.rmdir(sub)
            except OSError:
                pass


_preexisting: set[int] = set()
_preexisting_cgroups: set[str] = set()


def _ours(pid: int) -> bool:
    """Started by this test run: a descendant of pytest, or an orphan adopted by init (what a
    pool leaks when the program that owned it dies) that was not there when the run began."""
    from _procs import process_table

    if pid in _preexisting:
        return False
    table = process_table()
    me = os.getpid()
    while pid in table:
        ppid = table[pid][1]
        if ppid == me:
            return True
        if ppid <= 1:
            return True
        if "nspool.launcher" not in _cmd(ppid):
            return False  # some other program's pool (a benchmark running beside the tests)
        pid = ppid
    return False


def _cmd(pid: int) -> str:
    from _procs import cmdline

    return cmdline(pid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    from nspool._core import shared_launcher

    shared_launcher.close_shared_launcher()  # what the program's exit would do
    leftover = {p: c for p, c in nspool_processes().items() if _ours(p)}
    zombies = {p: s for p, s in descendants().items() if s == "Z"}
    cgroups = _our_cgroups(_preexisting_cgroups)
    if leftover or zombies or cgroups:
        msg = "nspool processes outlived the test session:\n" + _describe(
            {p: "?" for p in leftover}
        )
        if zombies:
            msg += "\nzombie children of the test process:\n" + _describe(zombies)
        if cgroups:
            msg += f"\npool cgroups outlived the test session: {sorted(cgroups)}"
        print("\n" + msg, file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_hypothesis_home: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "leaks_ok: the test checks leaks itself")
    _preexisting.update(nspool_processes())
    _preexisting_cgroups.update(pool_cgroups())
    # Hypothesis keeps caches in ./.hypothesis; give it a folder removed at the end instead.
    import tempfile

    from hypothesis.configuration import set_hypothesis_home_dir

    _hypothesis_home.append(tempfile.mkdtemp(prefix="nspool-hypothesis-"))
    set_hypothesis_home_dir(_hypothesis_home[0])


def pytest_unconfigure(config: pytest.Config) -> None:
    import shutil

    for path in _hypothesis_home:
        shutil.rmtree(path, ignore_errors=True)
