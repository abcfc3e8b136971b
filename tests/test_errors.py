"""The public exceptions as a user meets them: what they are instances of, how they print, and
that they survive pickling (they cross processes: Dask, a task's result). How the type checker
sees them is tests/test_typing.py's business."""

from __future__ import annotations

import concurrent.futures
import errno
import pickle
import socket
import time
import traceback

import pytest

from nspool import CgroupUnavailableError, TaskTimeoutError
from nspool._core.launcher_link import LauncherProcess
from nspool._core.protocol import Control, Ctl, encode_control


def test_task_timeout_error_is_every_timeout_error_an_except_may_name() -> None:
    """On 3.10 ``concurrent.futures.TimeoutError`` is a class of its own; from 3.11 it is the
    builtin. Either way both ``except`` clauses catch a deadline."""
    err = TaskTimeoutError("the task ran longer than its 1 s deadline")
    assert isinstance(err, TimeoutError)
    assert isinstance(err, concurrent.futures.TimeoutError)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is TaskTimeoutError and str(back) == str(err)


class _Exited:
    """Stands for a launcher process that has exited (what ``_wait_hello`` waits for)."""

    def wait(self) -> int:
        return 1


def test_cgroup_unavailable_error_from_the_launcher_names_its_errno_once() -> None:
    """The launcher answers LIMITS_ERROR with its OSError as printed (launcher/__main__.py):
    the program's CgroupUnavailableError carries that errno once, as its errno, not also in
    its text ("[Errno 1] [Errno 1] ...")."""
    why = "cgroup limits asked for can't be enforced here (memory: ...). To get them, ..."
    sent = CgroupUnavailableError(errno.EPERM, why)
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with mine, theirs:
        theirs.send(encode_control(Control(Ctl.LIMITS_ERROR, 0, errno.EPERM, str(sent))))
        launcher = LauncherProcess.__new__(LauncherProcess)  # its start-up answer alone
        launcher.sock, launcher.proc = mine, _Exited()  # type: ignore[assignment]
        with pytest.raises(CgroupUnavailableError) as info:
            launcher._wait_hello(time.monotonic() + 10)
    assert (info.value.errno, info.value.strerror) == (errno.EPERM, why)
    assert str(info.value) == f"[Errno 1] {why}"


def test_cgroup_unavailable_error_shows_and_pickles_as_public() -> None:
    err = CgroupUnavailableError(errno.EPERM, "no memory controller here")
    shown = traceback.format_exception_only(type(err), err)[-1]
    assert shown == "nspool.errors.CgroupUnavailableError: [Errno 1] no memory controller here\n"
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is CgroupUnavailableError and isinstance(back, OSError)
    assert (back.errno, str(back)) == (errno.EPERM, str(err))
