"""Fixtures and helpers shared by the randomised race tests. A test module imports the fixture
functions to use them (``seed_fixture`` provides the fixture ``seed``)."""

from __future__ import annotations

import os
import random
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

#: how much longer the races run (NSPOOL_RACE_SCALE=6: about 10,000 futures each)
SCALE = float(os.environ.get("NSPOOL_RACE_SCALE") or 1.0)

#: uncaught exceptions of threads (a pool's I/O thread...) since the test began
crashes: list[str] = []


def scaled(n: int) -> int:
    return max(1, round(n * SCALE))


@pytest.fixture(autouse=True, scope="module")
def frequent_thread_switches() -> Iterator[None]:
    """Switch threads every 0.5 ms instead of 5 ms: more interleavings of the callers'
    threads with the pool's own."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    yield
    sys.setswitchinterval(old)


@pytest.fixture(autouse=True)
def thread_crashes() -> Iterator[None]:
    """Collect, in :data:`crashes`, an exception that kills a thread, for the test that saw it
    to count as a violation; the hook that was installed (pytest's) still sees it too."""
    old = threading.excepthook

    def hook(args: Any) -> None:
        name = args.thread.name if args.thread is not None else "?"
        crashes.append(f"thread {name} died of {args.exc_value!r}")
        old(args)

    crashes.clear()
    threading.excepthook = hook
    yield
    threading.excepthook = old


@pytest.fixture(name="seed")
def seed_fixture() -> int:
    env = os.environ.get("NSPOOL_RACE_SEED")
    return int(env) if env else random.SystemRandom().getrandbits(32)


def run_threads(threads: list[threading.Thread], timeout: float) -> int:
    """Start ``threads``, then join each for at most ``timeout`` seconds; how many hung."""
    for t in threads:
        t.start()
    hung = 0
    for t in threads:
        t.join(timeout)
        hung += t.is_alive()
    return hung
