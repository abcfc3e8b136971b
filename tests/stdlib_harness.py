"""Run CPython's own ProcessPoolExecutor tests against ``nspool.NSPoolExecutor``, unmodified.

Usage (from the repository root, with a Python that has nspool installed)::

    python tests/stdlib_harness.py [-v] [-k SUBSTRING]

The tests are those of the running interpreter's ``test`` package: the
``test/test_concurrent_futures/`` package (3.11+) or the single module
``test/test_concurrent_futures.py`` (3.10). Nothing in them is changed: the harness subclasses
the generated test classes with ``executor_type = NSPoolExecutor``, points
``concurrent.futures.ProcessPoolExecutor`` at ``NSPoolExecutor`` while they run (some tests name
it directly), and makes the tests that start a child interpreter (``assert_python_ok``) run
nspool there too.

Only ONE variant runs: the classes derived from ``ProcessPoolForkserverMixin``. The stdlib
generates each test three times, for the fork, forkserver and spawn start methods, but nspool
ignores ``mp_context`` (workers are always forked from its own fork server, a fresh
single-threaded interpreter), so the three would run the same code. The forkserver variant's
expectations are the faithful ones for that launcher: workers do not inherit the test process's
state, yet start from a warm interpreter.

Two lists below adjust the run, each entry a test id ``<OriginalClass>.<test_method>`` where
the class is the one the stdlib passed to ``create_executor_tests`` (so ids do not depend on the
start-method mixin), e.g. ``ProcessPoolExecutorTest.test_killed_child``:

- ``SKIP``: tests that inspect the stdlib pool's internals (``_processes``, ``_broken``,
  ``_executor_manager_thread``, ``_mp_context``, ...) or mock its private classes. They are
  skipped with ``unittest.skip`` so the reason shows.
- ``EXPECTED_FAILURES``: deliberate differences from the stdlib, each with its reason.

An entry must name a test that exists in the running Python's suite, unless it is an ``Entry``
whose ``since``/``before`` versions exclude the running Python; otherwise the run fails, so
the lists can neither grow silently nor rot.

Without the test package (many distributions ship it separately, e.g. Debian's
``libpython3.X-testsuite``) the harness prints one line that says SKIPPED and exits 0.

Exit status 1 on any failure, error, unexpected success, stale list entry, or leftover process:
at the end no child process of the harness (nspool's launchers, fork servers and workers
included) may remain. The harness makes itself a child subreaper, so processes orphaned by a
test's child interpreter are reparented to it and counted as well.
"""

from __future__ import annotations

import argparse
import ctypes
import faulthandler
import functools
import importlib
import importlib.util
import os
import pkgutil
import sys
import sysconfig
import time
import traceback
import types
import unittest
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _procs import cmdline, process_table  # noqa: E402


class Entry(NamedTuple):
    """A list entry: the reason, and the Pythons whose suite has the test (all by default)."""

    reason: str
    since: tuple[int, int] = (3, 0)  #: first Python version whose suite has the test
    before: tuple[int, int] | None = None  #: first version whose suite no longer has it


_INTERNALS = "inspects the stdlib pool's internals"

#: Tests skipped because they look inside the stdlib's ProcessPoolExecutor or mock its private
#: parts; there is nothing of nspool's they could check.
SKIP: dict[str, str | Entry] = {
    "ProcessPoolExecutorTest.test_killed_child": f"{_INTERNALS} (terminates one of `_processes`)",
    "ProcessPoolExecutorTest.test_saturation": f"{_INTERNALS} (counts `_processes`)",
    "ProcessPoolExecutorTest.test_idle_process_reuse_one": f"{_INTERNALS} (counts `_processes`)",
    "ProcessPoolExecutorTest.test_idle_process_reuse_multiple": (
        f"{_INTERNALS} (counts `_processes`)"
    ),
    "ProcessPoolExecutorTest.test_max_tasks_per_child": Entry(
        f"{_INTERNALS} (counts `_processes`)", since=(3, 11)
    ),
    "ProcessPoolExecutorTest.test_max_tasks_per_child_defaults_to_spawn_context": Entry(
        f"{_INTERNALS} (reads `_mp_context`)", since=(3, 11)
    ),
    "ProcessPoolExecutorTest.test_python_finalization_error": Entry(
        f"{_INTERNALS} (mocks `threading._start_joinable_thread` to break the stdlib's "
        "manager/feeder threads)",
        since=(3, 12),
    ),
    "ProcessPoolShutdownTest.test_processes_terminate": f"{_INTERNALS} (counts `_processes`)",
    "ProcessPoolShutdownTest.test_context_manager_shutdown": f"{_INTERNALS} (joins `_processes`)",
    "ProcessPoolShutdownTest.test_del_shutdown": (
        f"{_INTERNALS} (joins `_executor_manager_thread`, `_processes`, `_call_queue`)"
    ),
    "ProcessPoolShutdownTest.test_shutdown_no_wait": (
        f"{_INTERNALS} (joins `_executor_manager_thread`, `_processes`, `_call_queue`)"
    ),
    "ExecutorDeadlockTest.test_shutdown_deadlock_pickle": (
        f"{_INTERNALS} (joins `_executor_manager_thread`)"
    ),
    "ExecutorDeadlockTest.test_gh105829_should_not_deadlock_if_wakeup_pipe_full": Entry(
        f"{_INTERNALS} (mocks `_ExecutorManagerThread.run` and `_ThreadWakeup`)", since=(3, 12)
    ),
    "FailingInitializerMixin.test_initializer": (
        f"{_INTERNALS} (polls `executor._broken`); it also passes a multiprocessing Queue in "
        "initargs and expects the worker to log 'Exception in initializer:' to it"
    ),
}

#: Deliberate differences from the stdlib: tests that must fail, each with why.
EXPECTED_FAILURES: dict[str, str | Entry] = {}

#: A test taking longer than this dumps every thread's traceback and ends the run (the stdlib's
#: own longest timeout, support.LONG_TIMEOUT, is 300 s).
TEST_TIMEOUT = 360.0
#: How long processes get to disappear at the end.
LEAK_GRACE = 5.0

PR_SET_CHILD_SUBREAPER = 36


def _entry(value: str | Entry) -> Entry:
    return value if isinstance(value, Entry) else Entry(value)


def _applies(entry: Entry) -> bool:
    version = sys.version_info[:2]
    return entry.since <= version and (entry.before is None or version < entry.before)


def _version() -> str:
    return ".".join(map(str, sys.version_info[:3]))


# --- finding the stdlib tests ------------------------------------------------------------------


class StdlibSuite(NamedTuple):
    path: str  #: the test package's folder, or the single module's file
    modules: list[types.ModuleType]  #: the modules that hold test classes
    mixin: type  #: ProcessPoolForkserverMixin


def find_suite() -> StdlibSuite | str:
    """The running interpreter's concurrent.futures tests, or why there are none."""
    name = "test.test_concurrent_futures"
    where = os.path.join(sysconfig.get_paths()["stdlib"], "test")
    try:
        spec = importlib.util.find_spec(name)
    except ImportError:  # no `test` package at all
        spec = None
    if spec is None or spec.origin is None:
        return f"no {name} under {where}"
    top = importlib.import_module(name)
    if spec.submodule_search_locations:  # 3.11+: a package
        path = os.path.dirname(spec.origin)
        names = sorted(m.name for m in pkgutil.iter_modules([path]) if m.name.startswith("test_"))
        modules = [importlib.import_module(f"{name}.{m}") for m in names]
        util = importlib.import_module(f"{name}.util")
    else:  # 3.10: one module
        path = spec.origin
        modules = [top]
        util = top
    mixin = getattr(util, "ProcessPoolForkserverMixin", None)
    if not isinstance(mixin, type):
        raise SystemExit(f"stdlib harness: {path} has no ProcessPoolForkserverMixin")
    return StdlibSuite(path, modules, mixin)


def origin_name(cls: type, mixin: type) -> str:
    """The class the stdlib passed to create_executor_tests (its first base that is neither the
    start-method mixin nor a TestCase), or the class itself when it was written by hand."""
    for base in cls.__bases__:
        if base is not mixin and not issubclass(base, unittest.TestCase):
            return base.__name__
    return cls.__name__


def _wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A fresh function that calls ``fn`` (so marking it leaves the stdlib's function alone)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return wrapper


def build_suite(
    stdlib: StdlibSuite, executor: type, select: str | None
) -> tuple[unittest.TestSuite, list[str], list[str]]:
    """The nspool versions of the forkserver test classes: (suite, every test id, problems)."""
    loader = unittest.TestLoader()
    suite = unittest.TestSuite()
    all_ids: list[str] = []
    problems: list[str] = []
    seen: dict[str, type] = {}
    skip = {k: _entry(v) for k, v in SKIP.items() if _applies(_entry(v))}
    xfail = {k: _entry(v) for k, v in EXPECTED_FAILURES.items() if _applies(_entry(v))}
    for module in stdlib.modules:
        for cls in list(vars(module).values()):
            if not (
                isinstance(cls, type)
                and issubclass(cls, unittest.TestCase)
                and issubclass(cls, stdlib.mixin)
                and cls.__module__ == module.__name__
            ):
                continue
            origin = origin_name(cls, stdlib.mixin)
            if origin in seen:
                problems.append(f"two test classes share the id {origin}: {seen[origin]}, {cls}")
                continue
            seen[origin] = cls
            namespace: dict[str, Any] = {
                "executor_type": executor,
                "__module__": cls.__module__,  # so that its setUpModule runs
                "__qualname__": cls.__qualname__,
                "harness_origin": origin,
            }
            names = loader.getTestCaseNames(cls)
            for meth in names:
                test_id = f"{origin}.{meth}"
                if test_id in skip:
                    namespace[meth] = unittest.skip(skip[test_id].reason)(_wrap(getattr(cls, meth)))
                elif test_id in xfail:
                    namespace[meth] = unittest.expectedFailure(_wrap(getattr(cls, meth)))
            sub = type(cls.__name__, (cls,), namespace)
            for meth in names:
                test_id = f"{origin}.{meth}"
                all_ids.append(test_id)
                if select is None or select in test_id:
                    suite.addTest(sub(meth))
    if not all_ids:
        problems.append("no test class derives from ProcessPoolForkserverMixin")
    known = set(all_ids)
    for list_name, entries in (("SKIP", SKIP), ("EXPECTED_FAILURES", EXPECTED_FAILURES)):
        for test_id, value in entries.items():
            if _applies(_entry(value)) and test_id not in known:
                problems.append(
                    f"{list_name} names {test_id}, which Python {_version()}'s suite does not "
                    "have (fix the name, or give the entry since=/before= versions)"
                )
    for test_id in set(SKIP) & set(EXPECTED_FAILURES):
        problems.append(f"{test_id} is in both SKIP and EXPECTED_FAILURES")
    return suite, all_ids, problems


# --- running them -------------------------------------------------------------------------------


def harness_id(test: object) -> str:
    origin = getattr(type(test), "harness_origin", None)
    method = getattr(test, "_testMethodName", None)
    if origin is not None and method is not None:
        return f"{origin}.{method}"
    return str(test)  # a module or class fixture's error holder


def _format(err: Any) -> str:
    return "".join(traceback.format_exception(*err)) if err and err[0] is not None else ""


class Result(unittest.TestResult):
    """Prints one line per test and keeps what the summary needs."""

    def __init__(self, support: types.ModuleType) -> None:
        super().__init__()
        self.support: Any = support  # test.support has no stubs
        #: tests after which test.support warned that the environment was altered (a thread
        #: or a child process still around at tearDown); regrtest's --fail-env-changed would
        #: fail them, the harness only reports them
        self.env_changed: list[str] = []
        self.counts = {
            "passed": 0,
            "skipped (list)": 0,
            "skipped (by the test)": 0,
            "expected failures": 0,
            "FAILED": 0,
            "unexpected successes": 0,
        }
        self.failed: list[tuple[str, str, str]] = []  #: (test id, outcome, traceback)
        self.xfailed: list[tuple[str, str]] = []  #: (test id, traceback)
        self._outcome: tuple[str, str] | None = None
        self._started = 0.0

    def startTest(self, test: unittest.TestCase) -> None:
        super().startTest(test)
        faulthandler.dump_traceback_later(TEST_TIMEOUT, exit=True)
        self._outcome = None
        self._started = time.monotonic()
        self.support.environment_altered = False

    def _set(self, outcome: str, detail: str = "") -> None:
        # The first failure wins (a test may also fail in tearDown, or in several subtests).
        if self._outcome is None or self._outcome[0] in ("ok", "skipped"):
            self._outcome = (outcome, detail)

    def _fail(self, test: unittest.TestCase, outcome: str, err: Any) -> None:
        test_id = harness_id(test)
        self.failed.append((test_id, outcome, _format(err)))
        if getattr(test, "_testMethodName", None) is None:  # outside any test: print it now
            self.counts["FAILED"] += 1
            print(f"{outcome:<20} {test_id}", flush=True)
        else:
            self._set(outcome)

    def addSuccess(self, test: unittest.TestCase) -> None:
        super().addSuccess(test)
        self._set("ok")

    def addFailure(self, test: unittest.TestCase, err: Any) -> None:
        super().addFailure(test, err)
        self._fail(test, "FAIL", err)

    def addError(self, test: unittest.TestCase, err: Any) -> None:
        super().addError(test, err)
        self._fail(test, "ERROR", err)

    def addSubTest(self, test: unittest.TestCase, subtest: unittest.TestCase, err: Any) -> None:
        super().addSubTest(test, subtest, err)
        if err is not None:
            kind = "FAIL" if issubclass(err[0], test.failureException) else "ERROR"
            self.failed.append((str(subtest), kind, _format(err)))
            self._set(kind)

    def addSkip(self, test: unittest.TestCase, reason: str) -> None:
        super().addSkip(test, reason)
        test_id = harness_id(test)
        listed = test_id in SKIP and _applies(_entry(SKIP[test_id]))
        self._set("skipped", f"{'(list) ' if listed else ''}{reason}")

    def addExpectedFailure(self, test: unittest.TestCase, err: Any) -> None:
        super().addExpectedFailure(test, err)
        test_id = harness_id(test)
        self.xfailed.append((test_id, _format(err)))
        self._set("expected failure", _entry(EXPECTED_FAILURES[test_id]).reason)

    def addUnexpectedSuccess(self, test: unittest.TestCase) -> None:
        super().addUnexpectedSuccess(test)
        test_id = harness_id(test)
        self.failed.append((test_id, "UNEXPECTED SUCCESS", "it is listed in EXPECTED_FAILURES"))
        self._set("UNEXPECTED SUCCESS")

    def stopTest(self, test: unittest.TestCase) -> None:
        super().stopTest(test)
        faulthandler.cancel_dump_traceback_later()
        outcome, detail = self._outcome or ("ERROR", "the test reported no outcome")
        if outcome == "ok":
            self.counts["passed"] += 1
        elif outcome == "skipped":
            listed = detail.startswith("(list) ")
            self.counts["skipped (list)" if listed else "skipped (by the test)"] += 1
        elif outcome == "expected failure":
            self.counts["expected failures"] += 1
        elif outcome == "UNEXPECTED SUCCESS":
            self.counts["unexpected successes"] += 1
        else:
            self.counts["FAILED"] += 1
        took = time.monotonic() - self._started
        line = f"{outcome:<20} {harness_id(test)} ({took:.2f} s)"
        if self.support.environment_altered:
            self.env_changed.append(harness_id(test))
            line += " [env changed]"
        print(f"{line}: {detail}" if detail else line, flush=True)


def _child_prelude() -> str:
    """Code put before a child interpreter's ``-c`` script: this very nspool, as the pool.

    The child runs with ``-I`` (no PYTHONPATH), so nspool's folder goes in front of its
    sys.path just for the import (later imports go through ``nspool.__path__``)."""
    import nspool

    parent = os.path.dirname(os.path.dirname(os.path.abspath(nspool.__file__ or "")))
    return (
        "import concurrent.futures, sys\n"
        f"sys.path.insert(0, {parent!r})\n"
        "import nspool\n"
        "del sys.path[0]\n"
        f"if nspool.__file__ != {nspool.__file__!r}:\n"
        "    raise ImportError(f'the child imported another nspool: {nspool.__file__}')\n"
        "concurrent.futures.ProcessPoolExecutor = concurrent.futures.NSPoolExecutor = "
        "nspool.NSPoolExecutor\n"
    )


class _Patched:
    """While the tests run: ``concurrent.futures.ProcessPoolExecutor`` is nspool's, and a child
    interpreter started through ``test.support.script_helper`` gets it too."""

    def __init__(self, executor: type) -> None:
        import concurrent.futures

        self.futures = concurrent.futures
        self.script_helper = importlib.import_module("test.support.script_helper")
        self.executor = executor
        self.saved: list[tuple[object, str, object]] = []

    def __enter__(self) -> None:
        original = self.script_helper.run_python_until_end
        prelude = _child_prelude()

        @functools.wraps(original)
        def run_python_until_end(*args: Any, **env_vars: Any) -> Any:
            args_list = list(args)
            if "-c" in args_list:
                at = args_list.index("-c") + 1
                args_list[at] = prelude + args_list[at]
            return original(*args_list, **env_vars)

        for obj, name, value in (
            (self.futures, "ProcessPoolExecutor", self.executor),
            (self.futures, "NSPoolExecutor", self.executor),
            (self.script_helper, "run_python_until_end", run_python_until_end),
        ):
            self.saved.append((obj, name, obj.__dict__.get(name, _MISSING)))
            setattr(obj, name, value)

    def __exit__(self, *exc: object) -> None:
        for obj, name, value in reversed(self.saved):
            if value is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, value)


_MISSING = object()


# --- leak check ---------------------------------------------------------------------------------


def _descendants() -> Iterator[tuple[int, str, int]]:
    """(pid, state, ppid) of every process under this one."""
    table = process_table()
    children: dict[int, list[int]] = {}
    for pid, (_, ppid) in table.items():
        children.setdefault(ppid, []).append(pid)
    todo = list(children.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        yield pid, table[pid][0], table[pid][1]
        todo.extend(children.get(pid, []))


def leak_check() -> list[str]:
    """Wait up to LEAK_GRACE for every process under the harness to go; describe those left.

    Zombie children (exited, never waited for) are reaped, and reported too."""
    zombies: dict[int, str] = {}
    deadline = time.monotonic() + LEAK_GRACE
    while True:
        left = {}
        for pid, state, ppid in _descendants():
            if state == "Z" and ppid == os.getpid():
                zombies[pid] = cmdline(pid) or "?"
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
            else:
                left[pid] = (state, cmdline(pid))
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    out = []
    for pid, (state, line) in sorted(left.items()):
        kind = "nspool process" if "nspool" in line else "process"
        out.append(f"{kind} {pid} (state {state}) still running: {line!r}")
    for pid, line in sorted(zombies.items()):
        out.append(f"zombie child {pid} was never waited for: {line!r}")
    return out


def _become_subreaper() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


# --- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="the tests' own chatter (support.verbose), and the tracebacks of expected failures",
    )
    parser.add_argument(
        "-k", metavar="SUBSTRING", help="run only the tests whose id contains SUBSTRING"
    )
    args = parser.parse_args(argv)

    found = find_suite()
    if isinstance(found, str):
        print(
            f"SKIPPED: CPython's test package is not installed for Python "
            f"{sys.version_info[0]}.{sys.version_info[1]} ({found}): "
            "the stdlib harness is skipped",
            flush=True,
        )
        return 0

    import nspool
    from nspool import NSPoolExecutor

    support = importlib.import_module("test.support")
    # (test.support has no stubs: it is a plain ModuleType to mypy)
    setattr(support, "verbose", int(args.verbose))  # noqa: B010
    subreaper = _become_subreaper()
    suite, all_ids, problems = build_suite(found, NSPoolExecutor, args.k)
    header = (
        f"CPython {_version()}'s ProcessPoolExecutor tests (forkserver variant) against "
        f"nspool.NSPoolExecutor\n  python: {sys.executable}\n  tests:  {found.path}\n"
        f"  nspool: {os.path.dirname(nspool.__file__ or '?')}"
    )
    print(f"== {header}", flush=True)

    result = Result(support)
    started = time.monotonic()
    with _Patched(NSPoolExecutor):
        result.startTestRun()
        try:
            suite.run(result)
        finally:
            result.stopTestRun()
            faulthandler.cancel_dump_traceback_later()
    took = time.monotonic() - started
    # nspool's per-program launcher outlives its pools by design (as multiprocessing's
    # forkserver does): stop it as the program's exit would, then look for what is left.
    from nspool import close_shared_launcher

    close_shared_launcher()
    leaks = leak_check()

    for test_id, outcome, text in result.failed:
        print(f"\n======== {outcome}: {test_id}\n{text}", end="", flush=True)
    if args.verbose:
        for test_id, text in result.xfailed:
            print(f"\n======== expected failure: {test_id}\n{text}", end="", flush=True)

    c = result.counts
    skipped = c["skipped (list)"] + c["skipped (by the test)"]
    failing = sorted({test_id for test_id, _, _ in result.failed})
    ok = not failing and not problems and not leaks and c["FAILED"] == 0
    ok = ok and c["unexpected successes"] == 0 and result.testsRun > 0
    print(f"\n== summary: {header}")
    print(
        f"  {result.testsRun} of {len(all_ids)} tests ran in {took:.1f} s: "
        f"{c['passed']} passed, {skipped} skipped ({c['skipped (list)']} by the SKIP list, "
        f"{c['skipped (by the test)']} by the tests themselves), "
        f"{c['expected failures']} expected failures, {c['FAILED']} FAILED, "
        f"{c['unexpected successes']} unexpected successes"
    )
    for test_id in failing:
        outcome = next(o for t, o, _ in result.failed if t == test_id)
        print(f"  {outcome}: {test_id}")
    for problem in problems:
        print(f"  LIST ERROR: {problem}")
    if result.env_changed:
        print(
            f"  note: test.support warned 'environment altered' (see the warnings above) after "
            f"{len(result.env_changed)} test(s), not counted as failures: "
            + ", ".join(result.env_changed)
        )
    if leaks:
        print(f"  LEAK CHECK FAILED: {len(leaks)} process(es) outlived the tests:")
        for leak in leaks:
            print(f"    {leak}")
    else:
        note = "" if subreaper else " (could not become a child subreaper: orphans not seen)"
        print(f"  leak check: no process left under the harness{note}")
    print(f"== {'OK' if ok else 'FAILED'} (Python {_version()})", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
