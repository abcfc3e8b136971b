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
from typing import NoReturn

from .._protocol import Control, Ctl, encode_control
from . import _syscalls
from ._explain import explain_unshare_error


def main() -> NoReturn:
    # Any usual signal kills the launcher quietly (no KeyboardInterrupt traceback).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    ctrl = socket.socket(fileno=int(sys.argv[1]))
    config = json.loads(sys.stdin.read() or "{}")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    for path in reversed(config.get("sys_path", [])):
        if path not in sys.path:
            sys.path.insert(0, path)

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
        os._exit(1)

    lifeline_r, lifeline_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(lifeline_w)
        from . import _forkserver

        _forkserver.run(ctrl, lifeline_r, config)
    os.close(lifeline_r)
    ctrl.close()
    _syscalls.set_process_name("nspool-launcher")
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


if __name__ == "__main__":
    main()
