"""Isolation overhead: what a PID namespace (and a private /proc) adds to spawning a worker,
measured on the mechanism alone, without the pool, in a fresh interpreter
(``nspool._tools.bench_probe``, which ``python -m nspool bench`` runs too)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ._peers import SyncPeer, own_rows
from ._stats import median
from ._suite import Bench, Config, Figures, Metric

KEY = "spawn"
ROOT = str(Path(__file__).resolve().parent.parent)  # where ``benchmarks`` is importable from

#: row -> probe mode
MODES = {
    "plain fork": "fork",
    "unshare(NEWPID) + fork + setns": "pidns",
    "in user+PID ns: unshare + fork + setns": "userns",
    "unshare + fork + setns + private /proc": "pidns+proc",
    "in user+PID ns: ... + private /proc": "userns+proc",
}
BASELINE = "plain fork"


def _spawns(cfg: Config) -> int:
    return cfg.pick(200, 20)


def probe(mode: str, count: int) -> list[int]:
    """Run the probe in a fresh interpreter; the spawn times in ns."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [sys.executable, "-m", "nspool._tools.bench_probe", mode, str(count)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    if done.returncode != 0:
        raise RuntimeError(f"probe {mode} failed: {done.stderr.strip()[-300:]}")
    times = json.loads(done.stdout)
    assert isinstance(times, list) and len(times) == count, done.stdout[:200]
    return [int(t) for t in times]


def sync(peer: SyncPeer, cfg: Config, rep: int) -> Figures:
    return {KEY: median(probe(MODES[peer.name], _spawns(cfg))) / 1e6}


def _skip(peer: object) -> str | None:
    needs_root = not getattr(peer, "name", "").startswith(("plain", "in user"))
    if needs_root and os.geteuid() != 0:
        return (
            "needs root: setns back into the host's PID namespace takes CAP_SYS_ADMIN there; "
            "unprivileged, nspool uses the user-namespace rows"
        )
    return None


BENCH = Bench(
    name="isolation",
    title="Isolation overhead: spawning one worker, mechanism alone",
    about=(
        "From a fresh single-threaded interpreter (`python -m nspool._tools.bench_probe`, like "
        "nspool's launcher, so no thread of the benchmark process matters): the time to fork a "
        "Python child and read one byte it writes to a pipe (the child's exit is not timed), "
        "median of 200 spawns after 5 untimed ones, ms. Rows: a plain `os.fork()`; "
        "`unshare(CLONE_NEWPID)` + fork + `setns` back (the fork server's step per worker, as "
        "root); the same inside a user+PID namespace made first, as nspool does unprivileged "
        "(the probe does `unshare(CLONE_NEWUSER | CLONE_NEWPID)`, writes setgroups/uid_map/"
        "gid_map, forks a PID-1 child, and that child times the spawns); and both with the "
        "child also mounting a private /proc (`mount_private_proc()`: mount namespace, / "
        "rprivate, new proc: what `private_proc=True` adds). The ratio column is the row's time "
        "over a plain fork's from the same repeat."
    ),
    metrics=lambda cfg, kind: [Metric(KEY, "ms")],
    repeats=(9, 1),
    sync=sync,
    peers=lambda: own_rows(MODES),
    skip=_skip,
    baseline=BASELINE,
    ratio="× plain fork",
    summary=False,
)

BENCHES = [BENCH]
