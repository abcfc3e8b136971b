"""The few Linux syscalls the launcher needs, in one place.

Python 3.12+ has ``os.unshare``/``os.setns`` and the ``CLONE_*`` constants; 3.10 and 3.11 do
not, so we fall back to libc through ctypes. ``prctl`` and ``mount`` always go through ctypes.
"""

from __future__ import annotations

import ctypes
import os

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15

MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8


def _load_libc() -> ctypes.CDLL:
    # "libc.so.6" first: ctypes.util.find_library runs ldconfig/gcc (tens of ms at start-up).
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        from ctypes.util import find_library

        return ctypes.CDLL(find_library("c"), use_errno=True)


_libc = _load_libc()
_ulong = ctypes.c_ulong
_libc.prctl.argtypes = [ctypes.c_int, _ulong, _ulong, _ulong, _ulong]
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, _ulong, ctypes.c_void_p]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]

#: Which path this interpreter uses; ``nspool doctor`` reports it.
SYSCALL_PATH = "os module" if hasattr(os, "unshare") else "ctypes (libc)"


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    """unshare(2): detach the caller from the given namespaces."""
    if hasattr(os, "unshare"):
        os.unshare(flags)
    else:
        _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int) -> None:
    """setns(2): join the namespace that ``fd`` refers to."""
    if hasattr(os, "setns"):
        os.setns(fd, nstype)
    else:
        _check(_libc.setns(fd, nstype), "setns")


def set_pdeathsig(sig: int) -> None:
    """Ask the kernel to send ``sig`` when our parent *thread* exits (safe only for a
    single-threaded parent, which the launcher is)."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")


def set_process_name(name: str) -> None:
    """Set the thread name shown by ``ps -o comm`` and ``top`` (at most 15 bytes)."""
    buf = ctypes.create_string_buffer(name.encode()[:15])
    _libc.prctl(PR_SET_NAME, ctypes.cast(buf, ctypes.c_void_p).value or 0, 0, 0, 0)


def mount(source: str, target: str, fstype: str | None, flags: int) -> None:
    """mount(2) without data."""
    _check(
        _libc.mount(
            source.encode(), target.encode(), fstype.encode() if fstype else None, flags, None
        ),
        f"mount({target})",
    )


def set_next_pid(pid: int) -> bool:
    """Make ``pid`` the PID of the next process forked in the caller's PID namespace, if it is
    free there (write ``ns_last_pid``; needs CAP_SYS_ADMIN over the namespace's owner, which
    root and the unprivileged pool's own user namespace both have). False if refused."""
    try:
        fd = os.open("/proc/sys/kernel/ns_last_pid", os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        os.write(fd, str(pid - 1).encode())
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def write_id_maps(uid: int, gid: int) -> None:
    """In a fresh user namespace: map the caller's own ``uid`` and ``gid`` (not root), so that
    files written there belong to the caller; setgroups is denied first, as the kernel requires.

    Read them *before* the unshare: inside the new, unmapped namespace ``os.geteuid()`` says
    65534 (the overflow uid), and mapping that fails for everyone else (EPERM)."""
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{uid} {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{gid} {gid} 1")
