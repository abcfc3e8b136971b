"""The fork server: PID 1 of the pool's PID namespace, single-threaded, forking one worker per
SPAWN request: the init (``_init``) of a fresh nested PID namespace, which forks the task loop.

It exits when the program's control socket reaches EOF (the program closed it or died, even by
``kill -9``), when the outer launcher dies (parent-death signal and a lifeline pipe), or on any
catchable signal. Being PID 1, its exit makes the kernel kill every worker and descendant.
"""

from __future__ import annotations

import errno
import importlib
import os
import select
import signal
import socket
import sys
import traceback
from typing import NoReturn

from .._protocol import Control, Ctl, ProtocolError, decode_control, encode_control
from . import _syscalls
from ._explain import explain_private_proc
from ._taskloop import WorkerOptions, mount_private_proc


class ForkServer:
    def __init__(self, ctrl: socket.socket, lifeline: int, options: WorkerOptions) -> None:
        self.ctrl = ctrl
        self.lifeline = lifeline
        self.options = options
        self.pids: dict[int, int] = {}  # pid (in the pool namespace) -> worker id
        self.wids: dict[int, int] = {}  # worker id -> pid
        # Our own PID namespace, to return to after each unshare (see DESIGN.md section 2).
        self.own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)

    def send(self, msg: Control) -> None:
        try:
            self.ctrl.send(encode_control(msg))
        except OSError:
            os._exit(0)  # the program is gone; exiting takes the whole namespace down

    # -- the loop -----------------------------------------------------------------------------
    def serve(self) -> NoReturn:
        poller = select.poll()
        poller.register(self.ctrl.fileno(), select.POLLIN)
        poller.register(self.lifeline, select.POLLIN)
        poller.register(self.wake_r, select.POLLIN)
        while True:
            for fd, _ in poller.poll():
                if fd == self.wake_r:
                    os.read(self.wake_r, 4096)
                    self.reap()
                elif fd == self.lifeline:
                    os._exit(0)  # the outer launcher died
                else:
                    self.on_control()

    def on_control(self) -> None:
        try:
            data, fds, _, _ = socket.recv_fds(self.ctrl, 4096, 4)
        except OSError:
            data, fds = b"", []
        if not data:
            os._exit(0)  # EOF: the program shut the pool down or died
        try:
            msg = decode_control(data)
        except ProtocolError:
            for fd in fds:
                os.close(fd)
            raise
        if msg.kind is Ctl.SPAWN:
            self.spawn(msg.wid, fds)
        elif msg.kind is Ctl.KILL:
            pid = self.wids.get(msg.wid)
            if pid is not None:
                try:
                    os.kill(pid, msg.value)
                except ProcessLookupError:
                    pass

    def fork_pid1(self) -> int:
        """Fork a child that is PID 1 of a new PID namespace (returns 0 in the child)."""
        _syscalls.unshare(_syscalls.CLONE_NEWPID)
        pid = os.fork()
        if pid:
            # Back to our own namespace for children, or the next unshare fails (EINVAL).
            _syscalls.setns(self.own_pidns, _syscalls.CLONE_NEWPID)
        return pid

    def probe_private_proc(self) -> str | None:
        """Try a private /proc in a throwaway child; the error text, or None if it works."""
        r, w = os.pipe()
        pid = self.fork_pid1()
        if pid == 0:
            os.close(r)
            try:
                mount_private_proc()
            except OSError as exc:
                os.write(w, str(exc).encode())
            os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            err = f.read().decode(errors="replace")
        os.waitpid(pid, 0)
        return err or None

    def spawn(self, wid: int, fds: list[int]) -> None:
        if len(fds) != 4:
            for fd in fds:
                os.close(fd)
            self.send(Control(Ctl.SPAWN_FAILED, wid, 0, f"SPAWN carried {len(fds)} fds, not 4"))
            return
        try:
            pid = self.fork_pid1()
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            self.send(Control(Ctl.SPAWN_FAILED, wid, exc.errno or 0, str(exc)))
            return
        if pid == 0:
            self._become_init(fds)
        for fd in fds:
            os.close(fd)
        self.pids[pid] = wid
        self.wids[wid] = pid

    def _become_init(self, fds: list[int]) -> NoReturn:
        try:
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
                signal.signal(sig, signal.SIG_DFL)
            self.ctrl.close()
            for fd in (self.lifeline, self.wake_r, self.wake_w, self.own_pidns):
                os.close(fd)
            for fd in fds:
                os.set_inheritable(fd, False)
            from . import _init

            task_fd, result_fd, stop_fd, state_fd = fds
            _init.run(task_fd, result_fd, stop_fd, state_fd, self.options)
        finally:
            os._exit(70)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            wid = self.pids.pop(pid, None)
            if wid is not None:
                del self.wids[wid]
                self.send(Control(Ctl.EXITED, wid, status))


def _die(signum: int, frame: object) -> None:
    os._exit(128 + signum)


def run(ctrl: socket.socket, lifeline: int, config: dict[str, object]) -> NoReturn:
    """Body of the fork server process (already PID 1 of the pool namespace)."""
    try:
        _syscalls.set_pdeathsig(signal.SIGKILL)
        # The outer launcher may have died before the line above took effect.
        if select.select([lifeline], [], [], 0)[0]:
            os._exit(0)
        # PID 1 only receives signals it has handlers for; make every usual one fatal so that
        # "kill the launcher with any signal" holds for this process too.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, _die)
        _syscalls.set_process_name("nspool-fsrv")
        # What every worker needs, imported once here so that workers fork warm.
        for name in [
            "cloudpickle",
            "nspool.launcher._init",
            "nspool.launcher._taskloop",
            "nspool._chunks",
            *config.get("preload", []),
        ]:  # type: ignore[misc]
            try:
                importlib.import_module(name)
            except BaseException as exc:  # noqa: BLE001
                ctrl.send(
                    encode_control(
                        Control(
                            Ctl.ERROR,
                            0,
                            0,
                            f"preload of module {name!r} failed in the launcher: "
                            f"{type(exc).__name__}: {exc}",
                        )
                    )
                )
                os._exit(1)
        authkey = config.get("authkey")
        if isinstance(authkey, str):
            import multiprocessing.process  # about 1 ms, once per pool

            multiprocessing.process.current_process().authkey = bytes.fromhex(authkey)
        options = WorkerOptions(
            kill_leftovers=bool(config.get("kill_leftovers", True)),
            private_proc=bool(config.get("private_proc", False)),
        )
        server = ForkServer(ctrl, lifeline, options)
        if options.private_proc:
            err = server.probe_private_proc()
            if err is not None:
                server.send(Control(Ctl.ERROR, 0, errno.EPERM, explain_private_proc(err)))
                os._exit(1)
        server.send(Control(Ctl.HELLO, 0, int(os.readlink("/proc/self"))))
        server.serve()
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        sys.stderr.flush()
    os._exit(70)
