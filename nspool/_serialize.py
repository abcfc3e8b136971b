"""How tasks, results and errors become bytes (cloudpickle, protocol 5) and back, with error
messages that name what could not be pickled. Shared by the fronts and the worker."""

from __future__ import annotations

import pickle
import traceback
from collections.abc import Callable
from typing import Any

import cloudpickle  # type: ignore[import-untyped]

from ._task_errors import RemoteTraceback, TaskPicklingError, TaskUnpicklingError

PROTOCOL = 5


def dumps(obj: Any) -> bytes:
    data: bytes = cloudpickle.dumps(obj, protocol=PROTOCOL)
    return data


loads = pickle.loads


def dumps_result(obj: Any) -> bytes:
    """Pickle a task's result: the C pickler first (several times faster for plain data),
    cloudpickle when the result needs pickling by value (a lambda, a local class...)."""
    try:
        return pickle.dumps(obj, protocol=PROTOCOL)
    except Exception:  # noqa: BLE001 - cloudpickle gets the last word
        return dumps(obj)


def _culprit(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """Find which part of a task does not pickle (only run on the failure path)."""
    parts: list[tuple[str, Any]] = [("the function", fn)]
    parts += [(f"argument {i}", a) for i, a in enumerate(args)]
    parts += [(f"keyword argument {k!r}", v) for k, v in kwargs.items()]
    for name, obj in parts:
        try:
            dumps(obj)
        except Exception as exc:  # noqa: BLE001 - any failure names the culprit
            return f"{name} ({type(obj).__name__}): {type(exc).__name__}: {exc}"
    return "the task"


def dump_task(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """Pickle a call; raise :class:`TaskPicklingError` naming the part that failed."""
    try:
        return dumps((fn, args, kwargs))
    except Exception as exc:
        raise TaskPicklingError(
            f"cannot pickle the task {getattr(fn, '__qualname__', fn)!r}: "
            f"{_culprit(fn, args, kwargs)}"
        ) from exc


def dump_initializer(
    initializer: Callable[..., object] | None, initargs: tuple[Any, ...]
) -> bytes | None:
    """Pickle a pool's initializer and its arguments (None when there is none)."""
    if initializer is None:
        return None
    if not callable(initializer):
        raise TypeError("initializer must be a callable")
    try:
        return dumps((initializer, tuple(initargs)))
    except Exception as exc:
        raise TaskPicklingError(f"cannot pickle the initializer or its arguments: {exc}") from exc


def dump_error(exc: BaseException) -> bytes:
    """Pickle an exception raised by a task together with its traceback text.

    If the exception itself does not pickle, a :class:`TaskPicklingError` that says so is sent
    in its place, so the program still learns what happened.
    """
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        return dumps((exc, tb))
    except Exception as perr:  # noqa: BLE001
        sub = TaskPicklingError(
            f"the task raised {type(exc).__name__}: {exc!s:.500}, "
            f"which could not be pickled ({type(perr).__name__}: {perr})"
        )
        return dumps((sub, tb))


def load_error(payload: Any) -> BaseException:
    """Rebuild a task's exception with the worker traceback as ``__cause__``."""
    try:
        exc, tb = loads(payload)
    except BaseException as uerr:  # noqa: BLE001 - SystemExit too: it fails this future only
        err = TaskUnpicklingError(
            f"the task raised an exception that could not be unpickled here: "
            f"{type(uerr).__name__}: {uerr}"
        )
        err.__cause__ = uerr
        return err
    if not isinstance(exc, BaseException):
        return TaskUnpicklingError(f"the worker sent {type(exc).__name__}, not an exception")
    exc.__cause__ = RemoteTraceback(f'\n"""\n{tb}"""')
    return exc


def load_result(payload: Any) -> Any:
    """Unpickle a result; raise :class:`TaskUnpicklingError` if that fails in any way (a
    ``SystemExit`` from a ``__reduce__`` too: it fails this future, not the program)."""
    try:
        return loads(payload)
    except BaseException as exc:  # noqa: BLE001
        raise TaskUnpicklingError(
            f"the task's result could not be unpickled here: {type(exc).__name__}: {exc}"
        ) from exc
