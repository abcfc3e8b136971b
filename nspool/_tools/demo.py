"""``python -m nspool demo``: shows workers in their own PID namespaces, and a leaked daemon
torn down with its pool (part 1) and with its task (part 2, the default)."""

from __future__ import annotations

import os
import signal
import time


def _host_pid() -> int:
    return int(os.readlink("/proc/self"))  # the host /proc is still mounted in a worker


def whoami(linger: float) -> tuple[int, int, str]:
    """(PID inside the worker's namespace, PID on the host, PID namespace)."""
    time.sleep(linger)  # keep this worker busy so the other call lands on the other worker
    return os.getpid(), _host_pid(), os.readlink("/proc/self/ns/pid")


def start_daemon() -> int:
    """Leave a double-forked, setsid'd, SIGTERM-ignoring daemon behind; return its host PID."""
    r, w = os.pipe()
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            os.write(w, str(_host_pid()).encode())
            os.execvp("sleep", ["sleep", "3600"])
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 32):  # EOF once the daemon exec'd (the pipe is close-on-exec)
        data += chunk
    os.close(r)
    os.wait()
    return int(data)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _ps(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode().strip()
    except OSError:
        return "(gone)"


def main() -> int:
    from .. import NSPoolExecutor

    print(f"program: pid {os.getpid()}, PID namespace {os.readlink('/proc/self/ns/pid')}")
    print()
    print("1. Each worker is a PID namespace of its own: its init is PID 1 there, and the task")
    print("   runs in an ordinary process whose PID there is the init's PID on the host. A pool's")
    print("   shutdown takes everything its tasks started with it. (This pool keeps leftovers")
    print("   until shutdown, kill_leftovers=False, to show that; the default kills them")
    print("   sooner, see 2.)")
    t0 = time.perf_counter()
    with NSPoolExecutor(max_workers=2, kill_leftovers=False) as pool:
        took = (time.perf_counter() - t0) * 1e3
        print(f"   launcher started in {took:.0f} ms, pid {pool.launcher_pid} (one per program)")
        seen = {}
        for ns_pid, host_pid, ns in pool.map(whoami, [0.2, 0.2]):
            seen[host_pid] = (ns_pid, ns)
        for host_pid, (ns_pid, ns) in sorted(seen.items()):
            print(f"   task process {host_pid} on the host is PID {ns_pid} in {ns}")
        daemon = pool.submit(start_daemon).result()
        print(f"   a task left a setsid'd, double-forked, SIGTERM-ignoring daemon: pid {daemon}")
        print(f"   alive after the task returned: {_alive(daemon)}  ({_ps(daemon)})")
        print("   shutting the pool down ...")
        t1 = time.perf_counter()
    took = (time.perf_counter() - t1) * 1e3
    print(f"   shutdown took {took:.1f} ms; daemon {daemon} alive now: {_alive(daemon)}")
    first_ok = not _alive(daemon)
    print()
    print("2. With the default kill_leftovers=True, what a task leaves running dies the moment")
    print("   the task returns, while the pool keeps serving.")
    with NSPoolExecutor(max_workers=1) as pool:
        daemon = pool.submit(start_daemon).result()
        gone = not _alive(daemon)
        print(f"   daemon {daemon} alive after the task returned: {not gone}")
        print(f"   the same worker serves on: 6 * 7 = {pool.submit(int.__mul__, 6, 7).result()}")
    ok = first_ok and gone
    print()
    print("OK: nothing outlived its task or the pool" if ok else "FAILED: something survived")
    return 0 if ok else 1
