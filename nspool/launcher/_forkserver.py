"""The fork server: PID 1 of the launcher's PID namespace, single-threaded, forking one worker
per SPAWN request: the init (``_init``) of a fresh nested PID namespace, which forks the task
loop.

One launcher serves every pool of a program that has no launcher of its own (see
``_core/shared_launcher.py``): each pool sends ``NEW_POOL`` with its own socket, and its SPAWN, KILL
and EXITED travel on that socket only. When the program shuts a pool's socket, its workers
(and only they) are killed; the socket is closed once the last one is reaped, which is how the
program knows they are gone.

It exits when the launcher's socket reaches EOF (the program closed it or died, even by
``kill -9``), when the outer launcher dies (parent-death signal and a lifeline pipe), or on any
catchable signal. Being PID 1, its exit makes the kernel kill every worker and descendant.
"""

from __future__ import annotations

import errno
import gc
import importlib
import json
import os
import select
import signal
import socket
import sys
import traceback
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn

from .._core.protocol import (
    EXIT_MEMORY_LIMIT,
    Control,
    Ctl,
    ProtocolError,
    decode_control,
    encode_control,
)
from . import _handover, _syscalls, add_sys_path
from ._explain import explain_private_proc
from ._taskloop import WorkerOptions, mount_private_proc

if TYPE_CHECKING:
    from .._cgroups.pool import PoolCgroups
    from .._cgroups.worker import WorkerCgroup

#: how often the fork server retries removing a dead worker's cgroup the kernel still holds
_REMOVE_RETRY_MS = 20
#: the largest NEW_POOL message (a pool's options with the program's environment)
_MAX_LAUNCHER_MESSAGE = 1 << 20


class Pool:
    """The fork server's side of one pool the program opened (``NEW_POOL``)."""

    __slots__ = ("sock", "options", "setup", "stdio", "workers", "closing", "started")

    def __init__(
        self,
        sock: socket.socket,
        options: WorkerOptions,
        setup: PoolSetup,
        stdio: list[tuple[int, int]],
    ) -> None:
        self.sock = sock
        self.options = options
        self.setup = setup
        #: (our copy, its number in a worker): the program's stdout and stderr as they were
        #: when it opened the pool, where the pool's workers write
        self.stdio = stdio
        self.workers: dict[int, Worker] = {}  # worker id (the pool's own numbering) -> worker
        #: the program shut its end: the pool's workers are being killed; the socket is closed
        #: (the program's EOF: "all gone") once the last is reaped
        self.closing = False
        #: a worker of the pool has been started (its first one gets the spare, if any)
        self.started = False


class Worker:
    """One live worker (its init, PID 1 of the worker's namespace)."""

    __slots__ = ("pool", "wid", "pid", "cgroup", "oom_fd", "out_of_memory")

    def __init__(self, pool: Pool, wid: int, pid: int, cgroup: WorkerCgroup | None) -> None:
        self.pool = pool
        self.wid = wid
        self.pid = pid
        self.cgroup = cgroup
        self.oom_fd: int | None = None
        self.out_of_memory = False  # killed by us for running out of memory


class Spare(NamedTuple):
    """A worker forked ahead of need (its init, PID 1 of its namespace, and its task loop),
    that no pool has yet: the next pool's first worker, which the program waits for to see
    anything run, costs no fork then. A pool's later workers are forked as they are asked
    for: a spare for each would add hand-over work to every worker (``max_tasks_per_child``
    churn is bound by CPU) and take nothing off a wait that another worker does not cover."""

    pid: int
    #: where its init and its task loop each wait for their part of a pool (``_handover``)
    init_sock: socket.socket
    loop_sock: socket.socket

    def close(self) -> None:
        self.init_sock.close()
        self.loop_sock.close()


class ForkServer:
    def __init__(
        self,
        ctrl: socket.socket,
        lifeline: int,
        cgroups: PoolCgroups | None = None,
        spare: bool = False,
    ) -> None:
        #: the launcher's socket: NEW_POOL requests; its EOF (the program is gone) ends us
        self.ctrl = ctrl
        self.lifeline = lifeline
        self.pools: dict[int, Pool] = {}  # socket fd -> pool
        self.workers: dict[int, Worker] = {}  # pid (in this namespace) -> worker
        self.poller = select.poll()
        #: the launcher's cgroups (resource limits, usage; only on a launcher of its own)
        self.cgroups = cgroups
        self.oom_fds: dict[int, Worker] = {}  # eventfd -> worker
        self.unremoved: list[WorkerCgroup] = []  # dead workers' cgroups still busy
        self.serial = 0  # names workers' cgroups: pools number their workers each from 1
        #: keep a spare worker (launchers without cgroups: a worker's cgroup is made for it)
        self.keeps_spare = spare and cgroups is None
        self.spare: Spare | None = None
        #: fork a spare when the loop has nothing else to do: at start, after each hand-over
        self.spare_wanted = self.keeps_spare
        self.private_proc_error: str | None = None
        self.private_proc_probed = False
        # Our own PID namespace, to return to after each unshare: a second unshare(CLONE_NEWPID)
        # is refused until we are back (docs/architecture.md, "How the namespaces are made").
        self.own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)

    def send(self, pool: Pool, msg: Control) -> None:
        if pool.closing:
            return  # the program only waits for the socket's end now
        try:
            pool.sock.send(encode_control(msg))
        except OSError:
            self.close_pool(pool)  # that program end is gone: the pool ends with it

    # -- the loop -----------------------------------------------------------------------------
    def serve(self) -> NoReturn:
        poller = self.poller
        poller.register(self.ctrl.fileno(), select.POLLIN)
        poller.register(self.lifeline, select.POLLIN)
        poller.register(self.wake_r, select.POLLIN)
        while True:
            timeout = _REMOVE_RETRY_MS if self.unremoved else None
            if self.spare_wanted:
                timeout = 0
            events = poller.poll(timeout)
            if not events and self.spare_wanted:
                self.make_spare()
            for fd, _ in events:
                if fd == self.wake_r:
                    os.read(self.wake_r, 4096)
                    self.reap()
                elif fd == self.lifeline:
                    os._exit(0)  # the outer launcher died
                elif fd in self.oom_fds:
                    self.on_out_of_memory(fd)
                elif fd == self.ctrl.fileno():
                    self.on_launcher_message()
                else:
                    pool = self.pools.get(fd)
                    if pool is not None and not pool.closing:
                        self.on_pool_message(pool)
            if self.unremoved:
                self.remove_cgroups()

    def on_launcher_message(self) -> None:
        try:
            data, fds, _, _ = socket.recv_fds(self.ctrl, _MAX_LAUNCHER_MESSAGE, 3)
        except OSError:
            data, fds = b"", []
        if not data:
            os._exit(0)  # EOF: the program closed the launcher or died
        try:
            msg = decode_control(data)
            config = json.loads(msg.text) if msg.kind is Ctl.NEW_POOL else {}
            stdio = config.get("stdio", [])
            if msg.kind is not Ctl.NEW_POOL or len(fds) != 1 + len(stdio):
                raise ProtocolError(
                    f"unexpected {msg.kind.name} with {len(fds)} fds on the launcher"
                )
        except (ProtocolError, ValueError):
            for fd in fds:
                os.close(fd)
            raise
        self.open_pool(socket.socket(fileno=fds[0]), config, list(zip(fds[1:], stdio, strict=True)))

    def open_pool(
        self, sock: socket.socket, config: dict[str, Any], stdio: list[tuple[int, int]]
    ) -> None:
        options = WorkerOptions(
            kill_leftovers=bool(config.get("kill_leftovers", True)),
            private_proc=bool(config.get("private_proc", False)),
        )
        pool = Pool(sock, options, PoolSetup.from_config(config), stdio)
        if options.private_proc:
            if not self.private_proc_probed:  # the answer is the same for every pool
                self.private_proc_error = self.probe_private_proc()
                self.private_proc_probed = True
            if self.private_proc_error is not None:
                text = explain_private_proc(self.private_proc_error)
                try:
                    sock.send(encode_control(Control(Ctl.ERROR, 0, errno.EPERM, text)))
                except OSError:
                    pass
                self.release(pool)
                return
        self.pools[sock.fileno()] = pool
        self.poller.register(sock.fileno(), select.POLLIN)
        self.send(pool, Control(Ctl.HELLO, 0, int(os.readlink("/proc/self"))))

    def on_pool_message(self, pool: Pool) -> None:
        try:
            # Never blocks: an event polled for a closed pool's fd may reach a new pool that
            # got the same number within one round of the loop.
            data, fds, _, _ = socket.recv_fds(pool.sock, 4096, 4, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []
        if not data:
            self.close_pool(pool)  # the program closed the pool (or died)
            return
        try:
            msg = decode_control(data)
        except ProtocolError:
            for fd in fds:
                os.close(fd)
            raise
        if msg.kind is Ctl.SPAWN:
            self.spawn(pool, msg.wid, fds)
            return
        for fd in fds:
            os.close(fd)
        if msg.kind is Ctl.KILL:
            worker = pool.workers.get(msg.wid)
            if worker is not None:
                try:
                    os.kill(worker.pid, msg.value)
                except ProcessLookupError:
                    pass

    def close_pool(self, pool: Pool) -> None:
        """The program is done with ``pool``: kill its workers (each its init, so the kernel
        takes its namespace down); its socket closes once the last one is reaped."""
        if pool.closing:
            return
        pool.closing = True
        self.poller.unregister(pool.sock.fileno())
        for worker in pool.workers.values():
            try:
                os.kill(worker.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.finish_pool(pool)

    def finish_pool(self, pool: Pool) -> None:
        # Once only: a failed send while reaping may have finished it already.
        if pool.closing and not pool.workers and self.pools.get(pool.sock.fileno()) is pool:
            del self.pools[pool.sock.fileno()]
            self.release(pool)  # the program's EOF: every process of the pool is gone

    @staticmethod
    def release(pool: Pool) -> None:
        pool.sock.close()
        for fd, _ in pool.stdio:
            os.close(fd)

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

    def spawn(self, pool: Pool, wid: int, fds: list[int]) -> None:
        if len(fds) != 4:
            for fd in fds:
                os.close(fd)
            self.send(
                pool, Control(Ctl.SPAWN_FAILED, wid, 0, f"SPAWN carried {len(fds)} fds, not 4")
            )
            return
        if not pool.started and self.keeps_spare:
            if self.spare is not None and self.hand_over(pool, wid, fds):
                return
            # None was there (it died, or could not be made): one for the next pool, made
            # once per pool at most, so a spare that cannot live costs no fork loop.
            self.spare_wanted = True
        cgroup = oom_fd = None
        try:
            if self.cgroups is not None:
                self.serial += 1
                cgroup = self.cgroups.create_worker(self.serial)
                oom_fd = self.cgroups.watch_oom(cgroup)
            pid = self.fork_pid1()
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            if oom_fd is not None:
                os.close(oom_fd)
            if cgroup is not None:
                self.unremoved.append(cgroup)
            self.send(pool, Control(Ctl.SPAWN_FAILED, wid, exc.errno or 0, str(exc)))
            return
        if pid == 0:
            self._become_init(pool, fds, cgroup)
        for fd in fds:
            os.close(fd)
        worker = self.add_worker(pool, wid, pid, cgroup)
        if oom_fd is not None:
            worker.oom_fd = oom_fd
            self.oom_fds[oom_fd] = worker
            self.poller.register(oom_fd, select.POLLIN)

    def add_worker(self, pool: Pool, wid: int, pid: int, cgroup: WorkerCgroup | None) -> Worker:
        worker = Worker(pool, wid, pid, cgroup)
        self.workers[pid] = worker
        pool.workers[wid] = worker
        pool.started = True
        return worker

    def make_spare(self) -> None:
        """Fork the spare worker (once per want: a failure waits for the next SPAWN)."""
        self.spare_wanted = False
        if self.spare is not None:
            return
        init_ours, init_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        loop_ours, loop_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            pid = self.fork_pid1()
        except OSError:
            for sock in (init_ours, init_theirs, loop_ours, loop_theirs):
                sock.close()
            return
        if pid == 0:
            try:
                init_ours.close()
                loop_ours.close()
                self._leave_launcher()
                _syscalls.set_process_name("nspool-spare")
                from . import _init

                _init.run_spare(init_theirs, loop_theirs)
            except BaseException:  # noqa: BLE001 - say why; nobody waits for a spare
                traceback.print_exc()
            finally:
                os._exit(70)
        init_theirs.close()
        loop_theirs.close()
        self.spare = Spare(pid, init_ours, loop_ours)

    def hand_over(self, pool: Pool, wid: int, fds: list[int]) -> bool:
        """Make the spare worker ``pool``'s worker ``wid``; False if it is gone (the caller
        forks one instead)."""
        spare, self.spare = self.spare, None
        assert spare is not None
        task_fd, result_fd, stop_fd, state_fd = fds
        stdio = [fd for fd, _ in pool.stdio]
        targets = [target for _, target in pool.stdio]
        try:
            # The init's part first: a loop that dies at once finds its init taken already
            # (see _init._wait_for_pool). Each starts as soon as its own part arrives.
            _handover.send(spare.init_sock, targets, [stop_fd, state_fd, *stdio])
            _handover.send(
                spare.loop_sock,
                (pool.options, pool.setup, targets),
                [task_fd, result_fd, state_fd, *stdio],
            )
        except OSError:
            try:
                os.kill(spare.pid, signal.SIGKILL)  # dying or stuck: reaped as a stranger
            except ProcessLookupError:
                pass
            return False
        finally:
            spare.close()
        for fd in fds:
            os.close(fd)
        self.add_worker(pool, wid, spare.pid, None)
        self.spare_wanted = True
        return True

    def _leave_launcher(self) -> None:
        """In a new worker: a session and process group of its own; close everything of the
        launcher's and of the pools' (none may stay open in a worker), and take back the
        launcher's signal handlers."""
        # Process groups cross PID namespaces: in the launcher's group, a task's kill(0, sig),
        # killpg() or a shell's `trap 'kill 0' EXIT` would reach the launcher, the fork server
        # and every worker of every pool of the program. In a session of its own, all that
        # reaches is this worker: its task process and what the task started (this init is
        # PID 1 of its namespace, where such signals only arrive if it handles them).
        os.setsid()
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_DFL)
        self.ctrl.close()
        for other in self.pools.values():
            self.release(other)
        if self.spare is not None:
            self.spare.close()
        for fd in (self.lifeline, self.wake_r, self.wake_w, self.own_pidns, *self.oom_fds):
            os.close(fd)

    def _become_init(self, pool: Pool, fds: list[int], cgroup: WorkerCgroup | None) -> NoReturn:
        try:
            if cgroup is not None:
                assert self.cgroups is not None
                # First, before this process forks anything: its tree is the cgroup's.
                self.cgroups.attach(cgroup)
            for fd, target in pool.stdio:
                os.dup2(fd, target)  # the program's stdout/stderr as the pool found them
            self._leave_launcher()
            for fd in fds:
                os.set_inheritable(fd, False)
            pool.setup.apply()
            from . import _init

            task_fd, result_fd, stop_fd, state_fd = fds
            meter = None if cgroup is None or self.cgroups is None else (self.cgroups, cgroup)
            _init.run(task_fd, result_fd, stop_fd, state_fd, pool.options, meter)
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
        worker = self.oom_fds[fd]
        worker.out_of_memory = True
        try:
            os.kill(worker.pid, signal.SIGKILL)  # its init: the kernel takes the namespace down
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
                break
            if pid == 0:
                break
            worker = self.workers.pop(pid, None)
            if worker is None:
                if self.spare is not None and self.spare.pid == pid:
                    self.spare.close()  # died waiting: the next SPAWN forks a new one
                    self.spare = None
                continue
            pool = worker.pool
            del pool.workers[worker.wid]
            flags = self.worker_gone(worker)
            self.send(pool, Control(Ctl.EXITED, worker.wid, status | flags))
            self.finish_pool(pool)
        if self.unremoved:
            self.remove_cgroups()

    def worker_gone(self, worker: Worker) -> int:
        """Release a dead worker's cgroup (removed after its EXITED is sent); the EXIT_*
        flags of its end."""
        cgroup = worker.cgroup
        if cgroup is None or self.cgroups is None:
            return 0
        if worker.oom_fd is not None:
            self.poller.unregister(worker.oom_fd)
            os.close(worker.oom_fd)
            del self.oom_fds[worker.oom_fd]
        oom = worker.out_of_memory or self.cgroups.oom_killed(cgroup)
        self.unremoved.append(cgroup)
        return EXIT_MEMORY_LIMIT if oom else 0


class PoolSetup(NamedTuple):
    """What a pool's workers take from the program as it was when the pool was opened (a
    shared launcher started earlier, with the program's state of then): applied in each new
    worker before it runs anything."""

    env: dict[str, str] | None  #: None: the launcher's own environment is the pool's
    cwd: str | None  #: None: the launcher's own
    sys_path: list[str]
    authkey: bytes | None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> PoolSetup:
        env = config.get("env")
        if env is not None and env == dict(os.environ):
            env = None  # the common case: nothing to do per worker
        cwd = config.get("cwd")
        if cwd is not None and cwd == _getcwd():
            cwd = None
        authkey = config.get("authkey")
        return cls(
            env,
            cwd,
            list(config.get("sys_path", [])),
            bytes.fromhex(authkey) if isinstance(authkey, str) else None,
        )

    def apply(self) -> None:
        if self.env is not None:
            os.environ.clear()
            os.environ.update(self.env)
        if self.cwd is not None:
            try:
                os.chdir(self.cwd)
            except OSError:
                pass  # gone since: the task sees the launcher's, as a process would see "/"
        add_sys_path(self.sys_path)
        if self.authkey is not None:
            import multiprocessing.process

            multiprocessing.process.current_process().authkey = self.authkey


def _getcwd() -> str | None:
    try:
        return os.getcwd()
    except OSError:
        return None


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
            "nspool._core.chunks",
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
        import multiprocessing.process  # noqa: F401 - workers set the pool's authkey in it

        server = ForkServer(ctrl, lifeline, cgroups, spare=bool(config.get("spare")))
        # Every object so far lives as long as this process: out of the collector's sight,
        # a worker's collections do not touch (so copy) the pages they share with us.
        gc.freeze()
        ctrl.send(encode_control(Control(Ctl.HELLO, 0, int(os.readlink("/proc/self")))))
        server.serve()
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        sys.stderr.flush()
    os._exit(70)
