"""Round trip: submit a trivial call and wait for its result, one at a time."""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any

from ._peers import RESULT_TIMEOUT, AsyncPeer, SyncPeer, opened, opened_async, sync_peers
from ._stats import median, no_gc, now_ns
from ._suite import Bench, Config, Figures, Metric
from ._tasks import noop

KEY = "round trip"


# The floor: one child process, a length-prefixed pickle each way over two pipes, no pool.
_CHILD = """
import os, pickle, struct, sys
r, w = sys.stdin.buffer, sys.stdout.buffer
while True:
    head = r.read(4)
    if len(head) < 4:
        break
    fn, args = pickle.loads(r.read(struct.unpack("<I", head)[0]))
    out = pickle.dumps(fn(*args), protocol=5)
    w.write(struct.pack("<I", len(out)) + out)
    w.flush()
"""


class _RawPipe:
    """What any pool's round trip is built on: pickle, a pipe write, a wake-up of the other
    process, and the same way back. A row for the floor, not a pool."""

    def __init__(self, workers: int) -> None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=root
        )

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Future[Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        data = pickle.dumps((fn, args), protocol=5)
        self.proc.stdin.write(struct.pack("<I", len(data)) + data)
        self.proc.stdin.flush()
        size = struct.unpack("<I", self.proc.stdout.read(4))[0]
        fut: Future[Any] = Future()
        fut.set_result(pickle.loads(self.proc.stdout.read(size)))
        return fut

    def map(self, fn: Callable[..., Any], it: Iterable[Any], chunksize: int) -> Iterable[Any]:
        return [self.submit(fn, x).result() for x in it]

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.wait()
        self.proc.stdout.close()


FLOOR = "raw pipe + pickle (floor, no pool)"


def _peers() -> list[SyncPeer]:
    return [*sync_peers(), SyncPeer(FLOOR, _RawPipe, True)]


def _calls(cfg: Config) -> int:
    return cfg.pick(1000, 30)


def sync(peer: SyncPeer, cfg: Config, rep: int) -> Figures:
    samples = []
    with opened(peer) as pool, no_gc():
        for _ in range(_calls(cfg)):
            t = now_ns()
            pool.submit(noop, None).result(RESULT_TIMEOUT)
            samples.append(now_ns() - t)
    return {KEY: median(samples) / 1e3}


async def aio(peer: AsyncPeer, cfg: Config, rep: int) -> Figures:
    samples = []
    async with opened_async(peer) as run:
        with no_gc():
            for _ in range(_calls(cfg)):
                t = now_ns()
                await run(noop, None)
                samples.append(now_ns() - t)
    return {KEY: median(samples) / 1e3}


BENCH = Bench(
    name="roundtrip",
    title="Round trip (one call at a time)",
    about=(
        "A warm pool of 2 workers runs `noop(None)` 1,000 times, each call submitted only after "
        "the previous result arrived; each call is timed alone with `perf_counter_ns` and a "
        "repeat's figure is the median call, in µs (lower is better). The last sync row is "
        "no pool but the floor every pool is built on: one child process, a length-prefixed "
        "pickle each way over two pipes."
    ),
    metrics=lambda cfg, kind: [Metric(KEY, "µs")],
    repeats=(11, 1),
    peers=_peers,
    sync=sync,
    aio=aio,
)

BENCHES = [BENCH]
