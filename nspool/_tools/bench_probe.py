"""Time one worker-spawn mechanism in a fresh, single-threaded interpreter (for ``bench``).

    python -m nspool._tools.bench_probe MODE COUNT

prints a JSON list of COUNT spawn times in ns, after a few untimed ones. A spawn is: fork a
Python child the way MODE says and read one byte it writes to a pipe; the child's exit and
reaping are not timed. On failure it prints the reason to stderr and exits with status 1.

Modes:

- fork: a plain os.fork().
- pidns: unshare(CLONE_NEWPID) + fork + setns back to our own PID namespace (the fork
  server's step per worker when nspool runs as root).
- userns: as nspool unprivileged: this process does unshare(CLONE_NEWUSER | CLONE_NEWPID),
  writes setgroups/uid_map/gid_map and forks a child that is PID 1 of the new namespace; that
  child (the fork server) times pidns spawns.
- pidns+proc, userns+proc: the same, and each spawned child also mounts a private /proc
  (mount_private_proc: a mount namespace, / made rprivate, a new proc mounted), as
  private_proc=True does.

Nothing but the mechanism runs here: the pool's threads and heap play no part.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

from ..launcher import _syscalls
from ..launcher._taskloop import mount_private_proc

MODES = ("fork", "pidns", "userns", "pidns+proc", "userns+proc")
WARMUP = 5


def _spawn_times(count: int, newpid: bool, proc: bool) -> list[int]:
    own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    r, w = os.pipe()
    out = []
    gc.collect()
    gc.disable()  # as timeit does: no collection inside a timed spawn
    for i in range(WARMUP + count):
        t0 = time.perf_counter_ns()
        if newpid:
            _syscalls.unshare(_syscalls.CLONE_NEWPID)
        pid = os.fork()
        if pid == 0:
            status = b"x"
            try:
                if proc:
                    mount_private_proc()
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                status = f"e{type(exc).__name__}: {exc}".encode()[:500]
            finally:
                os.write(w, status)  # one write below PIPE_BUF: the parent reads it whole
                os._exit(0)
        if newpid:
            _syscalls.setns(own, _syscalls.CLONE_NEWPID)
        got = os.read(r, 512)
        t1 = time.perf_counter_ns()
        os.waitpid(pid, 0)
        if got != b"x":
            raise OSError(f"the child could not mount a private /proc: {got[1:].decode()}")
        if i >= WARMUP:
            out.append(t1 - t0)
    os.close(own)
    return out


def _in_user_namespace(count: int, proc: bool) -> list[int]:
    uid, gid = os.geteuid(), os.getegid()
    _syscalls.unshare(_syscalls.CLONE_NEWUSER | _syscalls.CLONE_NEWPID)
    _syscalls.write_id_maps(uid, gid)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # PID 1 of the new namespace: the fork server
        code = 0
        try:
            os.close(r)
            data = json.dumps(_spawn_times(count, True, proc)).encode()
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            data, code = json.dumps(f"{type(exc).__name__}: {exc}").encode(), 1
        with os.fdopen(w, "wb") as f:
            f.write(data)
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        got = json.loads(f.read())
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise OSError(f"the fork server failed: {got}")
    return [int(t) for t in got]


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in MODES or not argv[1].isdigit():
        modes = ",".join(MODES)
        print(f"usage: python -m nspool._tools.bench_probe {{{modes}}} COUNT", file=sys.stderr)
        return 2
    mode, count = argv[0], int(argv[1])
    proc = mode.endswith("+proc")
    try:
        if mode.startswith("userns"):
            times = _in_user_namespace(count, proc)
        else:
            times = _spawn_times(count, mode != "fork", proc)
    except OSError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(times))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
