"""One launcher per program, shared by every pool it opens.

Starting a launcher costs tens of milliseconds (an interpreter, its imports, the namespaces);
opening a pool on a running one costs one message and a reply. Each pool still has its own
socket to the launcher, and its workers their own PID namespaces: closing a pool kills only
its workers, and the program's death (even ``kill -9``) still ends the launcher, so every pool.

A pool gets a launcher of its own when it needs one: ``preload`` (modules imported into the
fork server, which every later worker would carry, and whose import may fail or start
threads) and resource limits (the pool's cgroups are made by its launcher, before the user
namespace, and removed when it ends).

The shared launcher lives until :func:`close_shared_launcher`, the program's exit, or its
death (a pool then breaks, and the next pool starts a new launcher). A child forked from the
program drops its copy, and starts its own launcher if it opens a pool.
"""

from __future__ import annotations

import atexit
import os
import threading

from .launcher_link import LaunchConfig, LauncherGone, LauncherProcess, PoolLink

_lock = threading.Lock()
_shared: LauncherProcess | None = None
_atexit_registered = False


def shareable(config: LaunchConfig) -> bool:
    """Whether a pool with ``config`` can be served by the program's shared launcher."""
    return not config.preload and config.cgroups is None


def connect(config: LaunchConfig, start_timeout: float) -> PoolLink:
    """The link of a new pool with ``config``: to the program's shared launcher, or to a
    launcher of the pool's own when it needs one (see the module's docstring). Every pool
    opens here; ``launcher_link`` knows nothing of sharing."""
    if not shareable(config):
        process = LauncherProcess(config, start_timeout)
        try:
            return process.open_pool(config, start_timeout, owned=True)
        except BaseException:
            process.close(kill=True)
            raise
    process = _get(config, start_timeout)
    try:
        return process.open_pool(config, start_timeout, owned=False)
    except LauncherGone:
        # Killed since it started: say goodbye to it, and once more with a new one.
        _drop(process)
        return _get(config, start_timeout).open_pool(config, start_timeout, owned=False)


def _get(config: LaunchConfig, start_timeout: float) -> LauncherProcess:
    global _shared, _atexit_registered
    with _lock:
        process = _shared
        if process is not None and process.proc.poll() is not None:
            _shared = None
            process.close()  # gone: reap it
            process = None
        if process is None:
            process = LauncherProcess(config, start_timeout, spare=True)
            _shared = process
            if not _atexit_registered:
                _atexit_registered = True
                atexit.register(close_shared_launcher)
                # A multiprocessing child (a Dask worker, say) ends with os._exit after
                # multiprocessing's own exit hooks, never atexit's.
                from multiprocessing import util

                util.Finalize(None, close_shared_launcher, exitpriority=0)
        return process


def _drop(process: LauncherProcess) -> None:
    global _shared
    with _lock:
        if _shared is process:
            _shared = None
    process.close(kill=True)


def current() -> LauncherProcess | None:
    """The program's shared launcher, if one runs."""
    return _shared


def close_shared_launcher() -> None:
    """Stop the program's shared launcher, if one runs, and wait until it is gone.

    Every pool still open on it breaks (``LauncherDiedError``); the next pool starts a new
    launcher. Called at the program's exit; useful to a test suite that checks that no
    process outlives its tests.
    """
    global _shared
    with _lock:
        process, _shared = _shared, None
    if process is not None:
        process.close()


def _forget_in_child() -> None:
    global _shared, _lock
    _lock = threading.Lock()  # another thread of the parent may have held it at the fork
    process, _shared = _shared, None
    if process is not None:
        # The launcher must see EOF when the program that started it dies, not when its
        # last forked child does.
        process.forget()


os.register_at_fork(after_in_child=_forget_in_child)
