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
from typing import TYPE_CHECKING, NoReturn

from .._protocol import (
    EXIT_MEMORY_LIMIT,
    Control,
    Ctl,
    ProtocolError,
    decode_control,
    encode_control,
)
from . import _syscalls
from ._explain import explain_private_proc
from ._taskloop import WorkerOptions, mount_private_proc

if TYPE_CHECKING:
    from .._cgroups import PoolCgroups, WorkerCgroup

#: how often the fork server retries removing a dead worker's cgroup the kernel still holds
_REMOVE_RETRY_MS = 20


class ForkServer:
    def __init__(
        self,
        ctrl: socket.socket,
        lifeline: int,
        options: WorkerOptions,
        cgroups: PoolCgroups | None = None,
    ) -> None:
        self.ctrl = ctrl
        self.lifeline = lifeline
        self.options = options
        self.pids: dict[int, int] = {}  # pid (in the pool namespace) -> worker id
        self.wids: dict[int, int] = {}  # worker id -> pid
        self.poller = select.poll()
        #: the pool's cgroups (resource limits, usage); each live worker's, its OOM eventfd
        self.cgroups = cgroups
        self.worker_cgroups: dict[int, WorkerCgroup] = {}
        self.oom_fds: dict[int, int] = {}  # eventfd -> worker id
        self.out_of_memory: set[int] = set()  # worker ids killed for running out of memory
        self.unremoved: list[WorkerCgroup] = []  # dead workers' cgroups still busy
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
        poller = self.poller
        poller.register(self.ctrl.fileno(), select.POLLIN)
        poller.register(self.lifeline, select.POLLIN)
        poller.register(self.wake_r, select.POLLIN)
        while True:
            for fd, _ in poller.poll(_REMOVE_RETRY_MS if self.unremoved else None):
                if fd == self.wake_r:
                    os.read(self.wake_r, 4096)
                    self.reap()
                elif fd == self.lifeline:
                    os._exit(0)  # the outer launcher died
                elif fd in self.oom_fds:
                    self.on_out_of_memory(fd)
                else:
                    self.on_control()
            if self.unremoved:
                self.remove_cgroups()

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
        cgroup = oom_fd = None
        try:
            if self.cgroups is not None:
                cgroup = self.cgroups.create_worker(wid)
                oom_fd = self.cgroups.watch_oom(cgroup)
            pid = self.fork_pid1()
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            if oom_fd is not None:
                os.close(oom_fd)
            if cgroup is not None:
                self.unremoved.append(cgroup)
            self.send(Control(Ctl.SPAWN_FAILED, wid, exc.errno or 0, str(exc)))
            return
        if pid == 0:
            self._become_init(fds, cgroup)
        for fd in fds:
            os.close(fd)
        self.pids[pid] = wid
        self.wids[wid] = pid
        if cgroup is not None:
            self.worker_cgroups[wid] = cgroup
        if oom_fd is not None:
            self.oom_fds[oom_fd] = wid
            self.poller.register(oom_fd, select.POLLIN)

    def _become_init(self, fds: list[int], cgroup: WorkerCgroup | None) -> NoReturn:
        try:
            if cgroup is not None:
                assert self.cgroups is not None
                # First, before this process forks anything: its tree is the cgroup's.
                self.cgroups.attach(cgroup)
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
                signal.signal(sig, signal.SIG_DFL)
            self.ctrl.close()
            for fd in (self.lifeline, self.wake_r, self.wake_w, self.own_pidns, *self.oom_fds):
                os.close(fd)
            for fd in fds:
                os.set_inheritable(fd, False)
            from . import _init

            task_fd, result_fd, stop_fd, state_fd = fds
            meter = None if cgroup is None or self.cgroups is None else (self.cgroups, cgroup)
            _init.run(task_fd, result_fd, stop_fd, state_fd, self.options, meter)
        except BaseException:  # noqa: BLE001 - say why; the program sees the worker die
            traceback.print_exc()
        finally:
            os._exit(70)

    def on_out_of_memory(self, fd: int) -> None:
        """A worker's cgroup ran out of memory (v1): kill the whole worker now, so that no
        task goes on with a process killed under it; its exit reports why."""
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return
        wid = self.oom_fds[fd]
        self.out_of_memory.add(wid)
        pid = self.wids.get(wid)
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)  # its init: the kernel takes the namespace down
            except ProcessLookupError:
                pass

    def remove_cgroups(self) -> None:
        """Remove dead workers' cgroups; those the kernel still holds are retried later."""
        assert self.cgroups is not None
        busy = []
        for cgroup in self.unremoved:
            try:
                self.cgroups.remove(cgroup, timeout=0)
            except OSError:
                busy.append(cgroup)
        self.unremoved = busy

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
                self.send(Control(Ctl.EXITED, wid, status | self.worker_gone(wid)))
        if self.unremoved:
            self.remove_cgroups()

    def worker_gone(self, wid: int) -> int:
        """Release a dead worker's cgroup (removed after its EXITED is sent); the EXIT_*
        flags of its end."""
        cgroup = self.worker_cgroups.pop(wid, None)
        if cgroup is None or self.cgroups is None:
            return 0
        for fd, owner in list(self.oom_fds.items()):
            if owner == wid:
                self.poller.unregister(fd)
                os.close(fd)
                del self.oom_fds[fd]
        oom = wid in self.out_of_memory or self.cgroups.oom_killed(cgroup)
        self.out_of_memory.discard(wid)
        self.unremoved.append(cgroup)
        return EXIT_MEMORY_LIMIT if oom else 0


def _die(signum: int, frame: object) -> None:
    os._exit(128 + signum)


def run(
    ctrl: socket.socket,
    lifeline: int,
    config: dict[str, object],
    cgroups: PoolCgroups | None = None,
) -> NoReturn:
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
        server = ForkServer(ctrl, lifeline, options, cgroups)
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
