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
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple, NoReturn

from ..errors import (
    CgroupUnavailableError,
    LauncherDiedError,
    NamespaceError,
    describe_wait_status,
)
from .protocol import (
    STATE_SIZE,
    Control,
    Ctl,
    ProtocolError,
    decode_control,
    encode_control,
)

_F_SETPIPE_SZ = 1031
#: pipe size asked for (the unprivileged maximum by default): fewer wake-ups for big payloads
PIPE_SIZE = 1 << 20
#: the folder that holds the nspool package (this file is nspool/_core/launcher_link.py)
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
    from .._cgroups.limits import Limits  # only pools with limits pay for importing the layer

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


def _pool_options(config: LaunchConfig) -> dict[str, object]:
    """What a pool's workers take from the program now (NEW_POOL's text)."""
    try:
        cwd: str | None = os.getcwd()
    except OSError:
        cwd = None
    return {
        "kill_leftovers": config.kill_leftovers,
        "private_proc": config.private_proc,
        "sys_path": config.sys_path,
        # A launcher started for an earlier pool has the program's environment and working
        # directory of then; each pool's workers get those of the pool's creation.
        "env": dict(os.environ),
        "cwd": cwd,
        # Workers share the program's multiprocessing key, as the stdlib pool's do, so
        # that Manager proxies and Connection objects passed to a task authenticate.
        # (Over a socket, never the command line or the environment.)
        "authkey": bytes(multiprocessing.process.current_process().authkey).hex(),
    }


def _raise_error(msg: Control) -> NoReturn:
    """The launcher's ERROR answer as the exception it stands for (errno: a namespace)."""
    if msg.value:
        raise NamespaceError(msg.value, msg.text)
    raise LauncherDiedError(msg.text)


def _limits_error(msg: Control) -> CgroupUnavailableError:
    """The launcher's LIMITS_ERROR answer as the exception it stands for. Its text is the
    launcher's OSError as printed, ``[Errno N] why``: the errno goes in once, as the errno."""
    text = msg.text.removeprefix(f"[Errno {msg.value}] ") if msg.value else msg.text
    return CgroupUnavailableError(msg.value or errno.EPERM, text)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _await_answer(sock: socket.socket, deadline: float, what: str) -> Control | None:
    """The next control message on a blocking ``sock`` (None: EOF), waiting until
    ``deadline``."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{what} did not answer within the start timeout")
        if not select.select([sock], [], [], left)[0]:
            continue
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        return decode_control(data) if data else None


class LauncherGone(LauncherDiedError):
    """The launcher was gone when a pool asked it for service (a shared one may have been
    killed since it started: the caller starts another)."""


class LauncherProcess:
    """A running launcher process (the outer launcher, its fork server) and its socket."""

    def __init__(
        self, config: LaunchConfig, start_timeout: float = 60.0, *, spare: bool = False
    ) -> None:
        """Start a launcher for pools like ``config``; ``spare``: its fork server keeps a
        worker forked ahead of need (a launcher shared by many pools)."""
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
        #: held while sending on or closing the socket: threads opening pools while another
        #: closes the launcher must never send to a closed (or reused) descriptor
        self._lock = threading.Lock()
        assert self.proc.stdin is not None
        # What the launcher needs before it says hello; each pool's own options come with
        # its NEW_POOL.
        payload = {
            "preload": list(config.preload),
            "sys_path": config.sys_path,
            "cgroups": config.cgroups,
            "spare": spare,
        }
        try:
            self.proc.stdin.write(json.dumps(payload).encode())
            self.proc.stdin.close()
            hello = self._wait_hello(time.monotonic() + start_timeout)
        except BaseException:
            self.close(kill=True)
            raise
        #: PID of the fork server (PID 1 of the launcher's namespace), as this program sees it
        self.forkserver_pid = hello.value

    @property
    def pid(self) -> int:
        """PID of the outer launcher process."""
        return self.proc.pid

    def fileno(self) -> int:
        return self.sock.fileno()

    def pids(self) -> set[int]:
        """The launcher's own processes: the outer one, the fork server and its spare worker
        (which belongs to no pool until one takes it)."""
        own = {self.pid, self.forkserver_pid}
        todo = _children(self.forkserver_pid)
        while todo:
            pid = todo.pop()
            try:
                with open(f"/proc/{pid}/comm") as f:
                    name = f.read().strip()
            except OSError:
                continue
            # "nspool-fsrv": a worker just forked names itself as soon as it knows what it is;
            # a pool's worker is only ever that until its SPAWN is answered.
            if name in ("nspool-spare", "nspool-fsrv"):
                own.add(pid)
                todo.extend(_children(pid))
        return own

    def _wait_hello(self, deadline: float) -> Control:
        msg = _await_answer(self.sock, deadline, "the nspool launcher")
        if msg is None:
            code = self.proc.wait()
            raise LauncherDiedError(
                f"the nspool launcher exited during start-up (code {code}); "
                "its error output is above"
            )
        if msg.kind is Ctl.HELLO:
            return msg
        if msg.kind is Ctl.LIMITS_ERROR:
            self.proc.wait()
            raise _limits_error(msg)
        if msg.kind is Ctl.ERROR:
            self.proc.wait()
            _raise_error(msg)
        raise ProtocolError(f"unexpected {msg.kind.name} before HELLO")

    def open_pool(self, config: LaunchConfig, start_timeout: float, owned: bool) -> PoolLink:
        """Ask the launcher to serve one more pool; its link. ``LauncherGone`` if the launcher
        is gone; ``owned``: the link closes this launcher with the pool."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # The pool's workers write where the program's stdout and stderr go now (a
            # launcher started earlier has those of then).
            stdio = [fd for fd in (1, 2) if _is_open(fd)]
            options = {**_pool_options(config), "stdio": stdio}
            packet = encode_control(Control(Ctl.NEW_POOL, 0, 0, json.dumps(options)))
            try:
                with self._lock:
                    if self.closed:
                        raise LauncherGone("the nspool launcher was closed")
                    socket.send_fds(self.sock, [packet], [theirs.fileno(), *stdio])
            except LauncherGone:
                raise
            except OSError as exc:
                if exc.errno == errno.EMSGSIZE:
                    raise ValueError(
                        f"the pool's options ({len(packet)} bytes with the environment) do not "
                        "fit in one message to the launcher"
                    ) from None
                raise LauncherGone(f"the nspool launcher is gone ({exc})") from None
            finally:
                theirs.close()
            msg = _await_answer(mine, time.monotonic() + start_timeout, "the nspool launcher")
            if msg is None:
                raise LauncherGone("the nspool launcher is gone")
            if msg.kind is Ctl.ERROR:
                _raise_error(msg)
            if msg.kind is not Ctl.HELLO:
                raise ProtocolError(f"unexpected {msg.kind.name} before the pool's HELLO")
        except BaseException:
            mine.close()
            raise
        return PoolLink(self, mine, config, owned)

    def exit_description(self, timeout: float | None = None) -> str:
        """How the launcher ended (call once it is gone)."""
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return "is still running, but closed this pool's connection"
        if status < 0:
            return describe_wait_status(-status & 0x7F)[2]
        return f"exited with code {status}"

    def forget(self) -> None:
        """Drop this process's copy of the launcher's socket (in a forked child)."""
        if not self.closed:
            self.closed = True
            self.sock.close()

    def close(self, kill: bool = False, wait: bool = True) -> None:
        """Stop the launcher and (with ``wait``) wait until it and everything under it is gone.

        Closing the launcher's socket makes the fork server exit; it is PID 1 of the
        launcher's namespace, so the kernel kills every worker of every pool it serves, and
        the outer launcher exits after it.
        """
        with self._lock:
            was_open, self.closed = not self.closed, True
            if was_open:
                self.sock.close()
        if was_open:
            if kill:
                try:
                    self.proc.kill()
                except ProcessLookupError:
                    pass
        if wait:
            self.proc.wait()


class PoolLink:
    """One pool's connection to its launcher: worker spawns, kills and exits."""

    def __init__(
        self, process: LauncherProcess, sock: socket.socket, config: LaunchConfig, owned: bool
    ) -> None:
        self.process = process
        self.sock = sock
        sock.setblocking(False)
        #: the pool's own launcher (closed with the pool), not the program's shared one
        self.owned = owned
        self.closed = False  #: the program shut its end (or forgot it)
        self._done = False  #: the launcher's end is closed too: every worker of it is gone
        #: control messages (and the fds they carry, closed once sent) the socket had no room
        #: for yet: a unix socket queues only a few messages with fds (net.unix.max_dgram_qlen)
        self.outbox: deque[tuple[bytes, list[int]]] = deque()
        #: the pool's memory limit in bytes (None: none), for the errors it explains
        self.memory_limit = (config.cgroups or {}).get("memory")

    @property
    def pid(self) -> int:
        """PID of the outer launcher process."""
        return self.process.pid

    @property
    def forkserver_pid(self) -> int:
        return self.process.forkserver_pid

    def fileno(self) -> int:
        return self.sock.fileno()

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
        """How the launcher ended (call once this link saw EOF it did not ask for)."""
        return self.process.exit_description(timeout=5.0)

    def forget(self) -> None:
        """Drop this process's copy of the pool's socket (in a forked child)."""
        if not self.closed:
            self.closed = self._done = True
            self.sock.close()
            self._drop_outbox()
            if self.owned:
                self.process.forget()

    def close(self, kill: bool = False, wait: bool = True) -> None:
        """Close the pool: the launcher kills what is left of its workers. With ``wait``,
        return once every process of the pool is gone (else see :meth:`wait_closed`).

        ``kill``: the pool's own launcher is killed rather than asked to exit.
        """
        if not self.closed:
            self.closed = True
            self._drop_outbox()
            if self.owned:
                self.sock.close()
                self._done = True
                self.process.close(kill=kill, wait=wait)
                return
            try:
                self.sock.shutdown(socket.SHUT_WR)  # the launcher's EOF: kill them all
            except OSError:
                pass  # the launcher is gone, and the pool's processes with it
        if wait:
            self.wait_closed()

    def wait_closed(self) -> None:
        """After :meth:`close`: wait until every process of the pool is gone."""
        if self.owned:
            self.process.close(wait=True)
            return
        if self._done:
            return
        self.sock.setblocking(True)
        while True:  # the launcher closes its end once it reaped the pool's last worker
            try:
                if not self.sock.recv(65536):
                    break
            except OSError:
                break
        self._done = True
        self.sock.close()
