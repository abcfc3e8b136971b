"""Pickling problems found in a worker, reported without ``concurrent.futures``.

The exceptions a user catches (``TaskPicklingError``, ``TaskUnpicklingError``,
``RemoteTraceback``) live in ``nspool.errors``, which needs ``concurrent.futures.process``
(and multiprocessing: about 12 ms of imports) for ``BrokenProcessPool``. The launcher must
not pay for that, so a worker raises the stand-ins below instead; each pickles as a call that
builds the real exception on the program's side.
"""

from __future__ import annotations

from typing import Any

#: modules whose exception classes a worker names to the program by reference (any program
#: can import them, so the rebuilt error can also be an instance of the original type)
_KNOWN_MODULES = frozenset({"builtins", "pickle", "_pickle", "copyreg"})


def portable_type(exc: BaseException | None) -> type[BaseException] | None:
    """``type(exc)`` if the program can surely import it by reference, else None."""
    if exc is None:
        return None
    cls = type(exc)
    return cls if cls.__module__ in _KNOWN_MODULES else None


class _WorkerSide(Exception):
    """Base of the worker's stand-ins; pickles as a call that builds the real exception."""

    unpickling = False

    def __init__(self, message: str, cause: BaseException | None) -> None:
        super().__init__(message)
        self.base = portable_type(cause)

    def __reduce__(self) -> tuple[Any, ...]:
        return (rebuild, (str(self), self.base, self.unpickling))


class TaskPicklingError(_WorkerSide):
    """The worker's stand-in for ``nspool.errors.TaskPicklingError``."""


class TaskUnpicklingError(_WorkerSide):
    """The worker's stand-in for ``nspool.errors.TaskUnpicklingError``."""

    unpickling = True


def rebuild(message: str, base: type[BaseException] | None, unpickling: bool) -> BaseException:
    """The program's side of a stand-in (runs while unpickling)."""
    from .. import errors  # only ever runs in the program, which has imported it already

    if unpickling:
        return errors.TaskUnpicklingError(message)
    return errors.pickling_error(message, base)
