"""Entry point of the launcher: ``python -m nspool.launcher CTRL_FD`` (config JSON on stdin).

This outer process creates the pool's PID namespace (plus a user namespace when not root),
forks the fork server into it as PID 1, and waits. If this process dies, the fork server gets
SIGKILL (parent-death signal) and the kernel takes every worker down with it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING, NoReturn

from .._core.protocol import Control, Ctl, encode_control
from . import _syscalls, add_sys_path
from ._explain import explain_unshare_error

if TYPE_CHECKING:
    from .._cgroups.pool import PoolCgroups


def main() -> NoReturn:
    # Any usual signal kills the launcher quietly (no KeyboardInterrupt traceback).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    ctrl = socket.socket(fileno=int(sys.argv[1]))
    config = json.loads(sys.stdin.read() or "{}")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    add_sys_path(config.get("sys_path", []))

    # The pool's cgroups, made here with the program's own credentials and in the host's PID
    # namespace (so that stale subtrees can be told by their owner's PID), before the user
    # namespace. The fork server inherits the object; this process removes the subtree once
    # the fork server is gone, however the program ended.
    cgroups = None
    if config.get("cgroups") is not None:
        cgroups = _make_cgroups(config["cgroups"], ctrl)

    uid, gid = os.geteuid(), os.getegid()  # before the unshare (see write_id_maps)
    user_ns = uid != 0
    flags = _syscalls.CLONE_NEWPID | (_syscalls.CLONE_NEWUSER if user_ns else 0)
    try:
        _syscalls.unshare(flags)
        if user_ns:
            _syscalls.write_id_maps(uid, gid)
    except OSError as exc:
        text = explain_unshare_error(exc, user_ns)
        ctrl.send(encode_control(Control(Ctl.ERROR, 0, exc.errno or 0, text)))
        _remove_cgroups(cgroups)
        os._exit(1)

    lifeline_r, lifeline_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(lifeline_w)
        from . import _forkserver

        _forkserver.run(ctrl, lifeline_r, config, cgroups)
    os.close(lifeline_r)
    ctrl.close()
    _syscalls.set_process_name("nspool-launcher")
    if cgroups is not None:
        # A signal ends the pool as usual but lets this process remove the cgroups after it.
        def stop(signum: int, frame: object) -> None:
            os.kill(pid, signal.SIGKILL)

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, stop)
    _, status = os.waitpid(pid, 0)
    # The fork server was PID 1 of the pool's namespace: every worker is gone or going.
    _remove_cgroups(cgroups)
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def _make_cgroups(spec: dict[str, object], ctrl: socket.socket) -> PoolCgroups:
    from .._cgroups.layout import detect_layout
    from .._cgroups.limits import Limits
    from .._cgroups.pool import PoolCgroups
    from .._cgroups.removal import remove_stale

    try:
        pids = spec.get("pids")
        limits = Limits(
            memory=spec.get("memory"),  # type: ignore[arg-type]
            # +1: the worker's init counts too; the user's figure is the task's tree
            pids=None if pids is None else int(pids) + 1,  # type: ignore[call-overload]
            cpu=spec.get("cpu"),  # type: ignore[arg-type]
        )
        required = set(limits.controllers())
        if spec.get("usage"):
            required.add("cpuacct")
        layout = detect_layout()
        remove_stale(layout)  # left by launchers that were killed with SIGKILL
        return PoolCgroups(required, ("memory", "cpuacct"), limits=limits, layout=layout)
    except OSError as exc:
        ctrl.send(encode_control(Control(Ctl.LIMITS_ERROR, 0, exc.errno or 0, str(exc))))
        os._exit(1)


def _remove_cgroups(cgroups: PoolCgroups | None) -> None:
    if cgroups is None:
        return
    from .._cgroups.removal import remove_pool

    try:
        remove_pool(cgroups.name, cgroups.layout)
    except OSError as exc:
        print(f"nspool: the pool's cgroups could not be removed: {exc}", file=sys.stderr)


if __name__ == "__main__":
    main()
