"""Program side of the launcher: start it, speak the control protocol, spawn and kill workers.

Used by both fronts. The launcher is started with ``subprocess`` (fork+exec in C, safe from a
threaded program) in a new session, so a terminal's Ctrl-C reaches only the program.
"""

from __future__ import annotations

import errno
import fcntl
import json
import mmap
import multiprocessing.process
import os
import resource
import select
import socket
import subprocess
import sys
import time
from collections import deque
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
from .errors import (
    CgroupUnavailableError,
    LauncherDiedError,
    NamespaceError,
    describe_wait_status,
)

_F_SETPIPE_SZ = 1031
#: pipe size asked for (the unprivileged maximum by default): fewer wake-ups for big payloads
PIPE_SIZE = 1 << 20
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `python -m MODULE`, made to find this very nspool even when it is not installed, without
# putting its folder in front of the standard library (as PYTHONPATH would), and without
# `-c`'s current directory in front, where another nspool checkout may lie.
_BOOTSTRAP = (
    "import sys; sys.path[:1] = [p for p in sys.path[:1] if p]; sys.path.append({parent!r}); "
    "import runpy; "
    "runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
)


def module_command(module: str) -> list[str]:
    """The command line that runs ``python -m module`` from this very nspool (see above)."""
    return [sys.executable, "-c", _BOOTSTRAP.format(parent=_PACKAGE_PARENT, module=module)]


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
    #: per-worker cgroup: {"memory": bytes, "pids": count, "cpu": fraction, "usage": bool}
    #: (limits validated, None where unset); None: no cgroups at all
    cgroups: dict[str, int | float | bool | None] | None = None


def cgroups_config(
    memory_limit: int | str | None,
    pids_limit: int | None,
    cpu_limit: float | None,
    track_usage: bool,
) -> dict[str, int | float | bool | None] | None:
    """The ``LaunchConfig.cgroups`` for a pool's options; ValueError for a bad limit."""
    if memory_limit is None and pids_limit is None and cpu_limit is None and not track_usage:
        return None
    from ._cgroups import Limits  # only pools with limits pay for importing the layer

    limits = Limits.parse(memory_limit, pids_limit, cpu_limit)
    return {
        "memory": limits.memory,
        "pids": limits.pids,
        "cpu": limits.cpu,
        "usage": bool(track_usage),
    }


def _pipe() -> tuple[int, int]:
    r, w = os.pipe()  # both ends are close-on-exec (non-inheritable) already
    try:
        fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # a smaller pipe only costs speed
    return r, w


def _raise_fd_limit() -> bool:
    """Raise this process's soft limit on open files to its hard limit (a pool with many
    workers holds four fds per worker; 1024 is a common soft limit). True if it rose."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            return False
    if soft != resource.RLIM_INFINITY and soft >= target:
        return False
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError):
        return False
    return True


class Launcher:
    """A running launcher process and its control socket."""

    def __init__(self, config: LaunchConfig, start_timeout: float = 60.0) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [*module_command("nspool.launcher"), str(theirs.fileno())],
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
        #: control messages (and the fds they carry, closed once sent) the socket had no room
        #: for yet: a unix socket queues only a few messages with fds (net.unix.max_dgram_qlen)
        self.outbox: deque[tuple[bytes, list[int]]] = deque()
        assert self.proc.stdin is not None
        payload = {
            "preload": list(config.preload),
            "kill_leftovers": config.kill_leftovers,
            "private_proc": config.private_proc,
            "sys_path": config.sys_path,
            # Workers share the program's multiprocessing key, as the stdlib pool's do, so
            # that Manager proxies and Connection objects passed to a task authenticate.
            # (Over this pipe, never the command line or the environment.)
            "authkey": bytes(multiprocessing.process.current_process().authkey).hex(),
            "cgroups": config.cgroups,
        }
        #: the pool's memory limit in bytes (None: none), for the errors it explains
        self.memory_limit = (config.cgroups or {}).get("memory")
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
            if msg.kind is Ctl.LIMITS_ERROR:
                self.proc.wait()
                raise CgroupUnavailableError(msg.value or errno.EPERM, msg.text)
            if msg.kind is Ctl.ERROR:
                self.proc.wait()
                if msg.value:
                    raise NamespaceError(msg.value, msg.text)
                raise LauncherDiedError(msg.text)
            raise ProtocolError(f"unexpected {msg.kind.name} before HELLO")

    def spawn(self, wid: int) -> WorkerEnds:
        """Ask for worker ``wid``; returns the program's ends of its pipes and its state block.

        The request may wait in :attr:`outbox` (see :meth:`flush`). Raises ``OSError`` only if
        this process cannot create the pipes (out of file descriptors even after raising the
        soft limit).
        """
        try:
            return self._spawn(wid)
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE) or not _raise_fd_limit():
                raise
        return self._spawn(wid)

    def _spawn(self, wid: int) -> WorkerEnds:
        theirs: list[int] = []
        ours: list[int] = []
        try:
            task_r, task_w = _pipe()
            theirs.append(task_r)
            ours.append(task_w)
            result_r, result_w = _pipe()
            theirs.append(result_w)
            ours.append(result_r)
            stop_r, stop_w = os.pipe()
            theirs.append(stop_r)
            ours.append(stop_w)
            state_fd = os.memfd_create(f"nspool-worker-{wid}", os.MFD_CLOEXEC)
            theirs.append(state_fd)
            os.ftruncate(state_fd, STATE_SIZE)
            state = mmap.mmap(state_fd, STATE_SIZE)
        except BaseException:
            for fd in theirs + ours:
                os.close(fd)
            raise
        for fd in ours:
            os.set_blocking(fd, False)
        # Their ends are closed once the message carrying them has left.
        self._post(encode_control(Control(Ctl.SPAWN, wid)), theirs)
        return WorkerEnds(task_w, result_r, stop_w, state)

    def kill(self, wid: int, sig: int) -> None:
        """Send ``sig`` to worker ``wid`` (SIGKILL takes its whole namespace down)."""
        self._post(encode_control(Control(Ctl.KILL, wid, sig)), [])

    def _post(self, data: bytes, fds: list[int]) -> None:
        self.outbox.append((data, fds))
        if len(self.outbox) == 1:
            self.flush()

    def flush(self) -> bool:
        """Send what the control socket takes now, in order; True when nothing is left.
        Whoever drives the pool waits for the socket to be writable while this is False."""
        outbox = self.outbox
        while outbox:
            data, fds = outbox[0]
            try:
                if fds:
                    socket.send_fds(self.sock, [data], fds)
                else:
                    self.sock.send(data)
            except BlockingIOError:
                return False
            except OSError:
                # The launcher is gone (EPIPE...): its EOF, read next, breaks the pool.
                self._drop_outbox()
                return True
            outbox.popleft()
            for fd in fds:
                os.close(fd)
        return True

    def _drop_outbox(self) -> None:
        for _, fds in self.outbox:
            for fd in fds:
                os.close(fd)
        self.outbox.clear()

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
            self._drop_outbox()

    def close(self, kill: bool = False, wait: bool = True) -> None:
        """Stop the launcher and (with ``wait``) wait until it and everything under it is gone.

        Closing the control socket makes the fork server exit; it is PID 1 of the pool
        namespace, so the kernel kills every worker, and the outer launcher exits after it.
        """
        if not self.closed:
            self.closed = True
            self.sock.close()
            self._drop_outbox()
            if kill:
                try:
                    self.proc.kill()
                except ProcessLookupError:
                    pass
        if wait:
            self.proc.wait()
