"""The cgroup layer's exceptions, apart so that ``nspool.errors`` re-exports them without
importing the layer itself."""

from __future__ import annotations


class CgroupError(OSError):
    """A cgroup operation failed."""


class CgroupUnavailableError(CgroupError):
    """A resource limit (or usage measurement) was asked for whose cgroup controller can't be
    used here. The message says why and how to get one."""

    # Public as nspool.errors.CgroupUnavailableError: tracebacks name it so, and pickle finds
    # it there (nspool.errors re-exports it).
    __module__ = "nspool.errors"


class CgroupBusyError(CgroupError):
    """A cgroup still held processes when its removal's deadline passed."""
