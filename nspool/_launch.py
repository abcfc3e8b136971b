"""Program side of the launcher: start it, speak the control protocol, spawn and kill workers.

Used by both fronts. The launcher is started with ``subprocess`` (fork+exec in C, safe from a
threaded program) in a new session, so a terminal's Ctrl-C reaches only the program.
"""

from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import select
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import NamedTuple

from ._protocol import (
    STATE_SIZE,
    Control,
    Ctl,
    ProtocolError,
    decode_control,
    encode_control,
)
from .errors import LauncherDiedError, NamespaceError, describe_wait_status

_F_SETPIPE_SZ = 1031
#: pipe size asked for (the unprivileged maximum by default): fewer wake-ups for big payloads
PIPE_SIZE = 1 << 20
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `python -m nspool.launcher`, made to find this very nspool even when it is not installed,
# without putting its folder in front of the standard library (as PYTHONPATH would), and
# without `-c`'s current directory in front, where another nspool checkout may lie.
_BOOTSTRAP = (
    "import sys; sys.path[:1] = [p for p in sys.path[:1] if p]; sys.path.append({parent!r}); "
    "import runpy; "
    "runpy.run_module('nspool.launcher', run_name='__main__', alter_sys=True)"
)


class WorkerEnds(NamedTuple):
    """The program's side of one worker."""

    task_fd: int  #: write end of its task pipe (non-blocking)
    result_fd: int  #: read end of its result pipe (non-blocking)
    stop_fd: int  #: write end of its init's stop pipe (non-blocking)
    state: mmap.mmap  #: its state block


@dataclass
class LaunchConfig:
    preload: tuple[str, ...] = ()
    kill_leftovers: bool = True
    private_proc: bool = False
    sys_path: list[str] = field(default_factory=lambda: list(sys.path))


def _pipe() -> tuple[int, int]:
    r, w = os.pipe()  # both ends are close-on-exec (non-inheritable) already
    try:
        fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # a smaller pipe only costs speed
    return r, w


class Launcher:
    """A running launcher process and its control socket."""

    def __init__(self, config: LaunchConfig, start_timeout: float = 60.0) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _BOOTSTRAP.format(parent=_PACKAGE_PARENT),
                    str(theirs.fileno()),
                ],
                stdin=subprocess.PIPE,
                pass_fds=(theirs.fileno(),),
                start_new_session=True,
            )
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        self.sock = mine
        self.closed = False
        assert self.proc.stdin is not None
        payload = {
            "preload": list(config.preload),
            "kill_leftovers": config.kill_leftovers,
            "private_proc": config.private_proc,
            "sys_path": config.sys_path,
        }
        try:
            self.proc.stdin.write(json.dumps(payload).encode())
            self.proc.stdin.close()
            hello = self._wait_hello(start_timeout)
        except BaseException:
            self.close(kill=True)
            raise
        #: PID of the fork server (PID 1 of the pool namespace), as this program sees it
        self.forkserver_pid = hello.value
        self.sock.setblocking(False)

    @property
    def pid(self) -> int:
        """PID of the outer launcher process."""
        return self.proc.pid

    def fileno(self) -> int:
        return self.sock.fileno()

    def _wait_hello(self, timeout: float) -> Control:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the nspool launcher did not start within {timeout:g} s")
            if not select.select([self.sock], [], [], left)[0]:
                continue
            data = self.sock.recv(65536)
            if not data:
                code = self.proc.wait()
                raise LauncherDiedError(
                    f"the nspool launcher exited during start-up (code {code}); "
                    "its error output is above"
                )
            msg = decode_control(data)
            if msg.kind is Ctl.HELLO:
                return msg
            if msg.kind is Ctl.ERROR:
                self.proc.wait()
                if msg.value:
                    raise NamespaceError(msg.value, msg.text)
                raise LauncherDiedError(msg.text)
            raise ProtocolError(f"unexpected {msg.kind.name} before HELLO")

    def spawn(self, wid: int) -> WorkerEnds:
        """Ask for worker ``wid``; returns the program's ends of its pipes and its state block."""
        task_r, task_w = _pipe()
        result_r, result_w = _pipe()
        stop_r, stop_w = os.pipe()
        state_fd = os.memfd_create(f"nspool-worker-{wid}", os.MFD_CLOEXEC)
        theirs = [task_r, result_w, stop_r, state_fd]
        ours = [task_w, result_r, stop_w]
        try:
            os.ftruncate(state_fd, STATE_SIZE)
            state = mmap.mmap(state_fd, STATE_SIZE)
            try:
                socket.send_fds(self.sock, [encode_control(Control(Ctl.SPAWN, wid))], theirs)
            except BaseException:
                state.close()
                raise
        except BaseException:
            for fd in ours:
                os.close(fd)
            raise
        finally:
            for fd in theirs:
                os.close(fd)
        for fd in ours:
            os.set_blocking(fd, False)
        return WorkerEnds(task_w, result_r, stop_w, state)

    def kill(self, wid: int, sig: int) -> None:
        """Send ``sig`` to worker ``wid`` (SIGKILL takes its whole namespace down)."""
        try:
            self.sock.send(encode_control(Control(Ctl.KILL, wid, sig)))
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.EBADF):
                raise

    def receive(self) -> tuple[list[Control], bool]:
        """Every control message waiting now, and whether the launcher is gone (EOF)."""
        out: list[Control] = []
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return out, False
            except OSError:
                data = b""
            if not data:
                return out, True
            out.append(decode_control(data))

    def exit_description(self) -> str:
        """How the launcher ended (call once it is gone)."""
        status = self.proc.wait()
        if status < 0:
            return describe_wait_status(-status & 0x7F)[2]
        return f"exited with code {status}"

    def forget(self) -> None:
        """Drop this process's copy of the control socket (in a forked child)."""
        if not self.closed:
            self.closed = True
            self.sock.close()

    def close(self, kill: bool = False, wait: bool = True) -> None:
        """Stop the launcher and (with ``wait``) wait until it and everything under it is gone.

        Closing the control socket makes the fork server exit; it is PID 1 of the pool
        namespace, so the kernel kills every worker, and the outer launcher exits after it.
        """
        if not self.closed:
            self.closed = True
            self.sock.close()
            if kill:
                try:
                    self.proc.kill()
                except ProcessLookupError:
                    pass
        if wait:
            self.proc.wait()
