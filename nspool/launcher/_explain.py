"""Turn a failed namespace syscall into a message that says why and how to fix it."""

from __future__ import annotations

import errno
import os


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def explain_unshare_error(exc: OSError, user_ns: bool) -> str:
    """A one-paragraph explanation of why ``unshare`` failed, with the remedy."""
    what = "a user and PID namespace" if user_ns else "a PID namespace"
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    head = f"nspool cannot create {what} for its workers: unshare() failed: {reason}."
    tips: list[str] = []
    code = exc.errno
    if code == errno.EPERM:
        if user_ns:
            if _read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1":
                tips.append(
                    "AppArmor forbids unprivileged user namespaces here "
                    "(kernel.apparmor_restrict_unprivileged_userns=1). Fix: "
                    "sudo sysctl kernel.apparmor_restrict_unprivileged_userns=0, or run as root."
                )
            if _read("/proc/sys/kernel/unprivileged_userns_clone") == "0":
                tips.append(
                    "Unprivileged user namespaces are switched off "
                    "(kernel.unprivileged_userns_clone=0). Fix: "
                    "sudo sysctl kernel.unprivileged_userns_clone=1, or run as root."
                )
            if not tips:
                tips.append(
                    "The kernel or a security policy (seccomp in a container, AppArmor, SELinux) "
                    "refuses user namespaces. Fix: allow them (for Docker: "
                    "--security-opt seccomp=unconfined), or run as root."
                )
        else:
            tips.append(
                "This process lacks CAP_SYS_ADMIN, probably in a container. Fix: run the "
                "container with --cap-add SYS_ADMIN (or --privileged), or as a normal user so "
                "that nspool uses a user namespace."
            )
    elif code == errno.ENOSPC:
        limit = _read("/proc/sys/user/max_user_namespaces")
        tips.append(
            f"A namespace limit is reached (user.max_user_namespaces={limit}, "
            f"user.max_pid_namespaces={_read('/proc/sys/user/max_pid_namespaces')}). Fix: "
            "sudo sysctl user.max_user_namespaces=15000 user.max_pid_namespaces=15000."
        )
    elif code == errno.EINVAL:
        tips.append(
            "The kernel does not support this namespace type, or the caller is threaded or "
            "chrooted. nspool needs Linux >= 3.17 (3.19 unprivileged) with CONFIG_PID_NS and "
            "CONFIG_USER_NS."
        )
    elif code == errno.ENOMEM:
        tips.append("The kernel is out of memory, or the PID namespace nesting limit (32) is hit.")
    elif code == errno.EUSERS:
        tips.append("The user namespace nesting limit (32) is reached.")
    tips.append(f"(uid {os.geteuid()}; run `python -m nspool doctor` for a full report.)")
    return head + " " + " ".join(tips)


def explain_private_proc(err: str) -> str:
    """Why ``private_proc=True`` cannot work here, and what to do."""
    return (
        f"nspool cannot give workers a private /proc: {err}. Mounting proc needs a mount "
        "namespace and a /proc that is fully visible: in a container whose /proc has masked "
        "or read-only sub-mounts (Docker's default), the kernel refuses a new proc mount to "
        "an unprivileged user namespace. Fix: run without private_proc, or as root, or start "
        "the container with an unmasked /proc (e.g. --security-opt systempaths=unconfined)."
    )
