"""How tasks, results and errors become bytes (cloudpickle, protocol 5) and back, with error
messages that name what could not be pickled. Shared by the fronts and the worker.

The worker must not import ``nspool.errors`` (see ``task_errors``): the functions that only
run in the program import it where they need it.
"""

from __future__ import annotations

import copyreg
import io
import linecache
import pickle
import traceback
import types
from collections import ChainMap
from collections.abc import Callable
from multiprocessing.reduction import ForkingPickler
from typing import Any

import cloudpickle  # type: ignore[import-untyped]

from . import task_errors

PROTOCOL = 5

# multiprocessing's reducers for objects that stand for a file descriptor (Connection,
# socket...): as in the stdlib pool, such an object travels as the descriptor itself (through
# multiprocessing's resource sharer, authenticated with the authkey workers share). Plain
# pickling would send its fd *number*, which names another file in the worker: one of
# nspool's own pipes, perhaps. Looked up after the picklers' own tables, so they only add
# types; a ChainMap sees types registered later (multiprocessing.connection registers
# Connection when it is imported).
_FD_REDUCERS: dict[type, Any] = ForkingPickler._extra_reducers  # type: ignore[attr-defined]


_cloudpickle_code_reduce = cloudpickle.Pickler.dispatch_table[types.CodeType]


def _reduce_code(code: types.CodeType) -> tuple[Any, ...]:
    """A code object pickled by value (a function of ``__main__``, a closure...) keeps the
    name of its file, so that a worker's traceback names the file and shows the source line
    as the stdlib pool's does (``linecache`` reads the file by that name). cloudpickle 3.1.3
    writes ``"<dynamic-code>"`` instead.

    Source that exists only in this program's ``linecache`` (a notebook cell: IPython
    registers each cell there with no modification time) travels along, so the worker can
    show its lines too."""
    rebuild, args = _cloudpickle_code_reduce(code)
    filename = code.co_filename
    entry = linecache.cache.get(filename)
    if entry is not None and len(entry) == 4 and entry[1] is None:
        return _code_in_file, (rebuild, args, filename, entry[2])
    return _code_in_file, (rebuild, args, filename)


def _code_in_file(
    rebuild: Any, args: tuple[Any, ...], filename: str, lines: list[str] | None = None
) -> types.CodeType:
    """Unpickle a code object from cloudpickle's reduction, with its own file name (and the
    in-memory source of that file, if it came along)."""
    code: types.CodeType = rebuild(*args)
    if lines is not None and filename not in linecache.cache:
        linecache.cache[filename] = (sum(map(len, lines)), None, lines, filename)
    return code if code.co_filename == filename else code.replace(co_filename=filename)


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]
    dispatch_table = ChainMap(
        {types.CodeType: _reduce_code}, cloudpickle.Pickler.dispatch_table, _FD_REDUCERS
    )


class _ResultPickler(pickle.Pickler):
    dispatch_table = ChainMap(copyreg.dispatch_table, _FD_REDUCERS)  # type: ignore[arg-type]


def dumps(obj: Any) -> bytes:
    """cloudpickle (functions and classes by value where needed)."""
    with io.BytesIO() as f:
        _Pickler(f, protocol=PROTOCOL).dump(obj)
        return f.getvalue()


loads = pickle.loads


def dumps_result(obj: Any) -> bytes:
    """Pickle a task's result: the C pickler first (several times faster for plain data),
    cloudpickle when the result needs pickling by value (a lambda, a local class...)."""
    try:
        with io.BytesIO() as f:
            _ResultPickler(f, protocol=PROTOCOL).dump(obj)
            return f.getvalue()
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
    """Pickle a call (in the program); raise ``TaskPicklingError`` naming the part that
    failed, also an instance of what pickling raised."""
    try:
        return dumps((fn, args, kwargs))
    except Exception as exc:
        from ..errors import pickling_error

        raise pickling_error(
            f"cannot pickle the task {getattr(fn, '__qualname__', fn)!r}: "
            f"{_culprit(fn, args, kwargs)}",
            type(exc),
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
        from ..errors import pickling_error

        raise pickling_error(
            f"cannot pickle the initializer or its arguments: {type(exc).__name__}: {exc}",
            type(exc),
        ) from exc


def dump_error(exc: BaseException) -> bytes:
    """Pickle an exception raised by a task together with its traceback text.

    If the exception itself does not pickle, a ``TaskPicklingError`` that says so is sent in
    its place, so the program still learns what happened.
    """
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        return dumps((exc, tb))
    except Exception as perr:  # noqa: BLE001
        sub = task_errors.TaskPicklingError(
            f"the task raised {type(exc).__name__}: {exc!s:.500}, "
            f"which could not be pickled ({type(perr).__name__}: {perr})",
            perr,
        )
        return dumps((sub, tb))


def load_error(payload: Any) -> BaseException:
    """Rebuild a task's exception (in the program) with the worker's traceback as
    ``__cause__``, as the stdlib pool does."""
    from ..errors import RemoteTraceback, TaskUnpicklingError

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
    # (typeshed says a traceback object; CPython's own pool passes this text)
    exc.__cause__ = RemoteTraceback(f'\n"""\n{tb}"""')  # type: ignore[arg-type]
    return exc


def load_result(payload: Any) -> Any:
    """Unpickle a result (in the program); raise ``TaskUnpicklingError`` if that fails in any
    way (a ``SystemExit`` from a ``__reduce__`` too: it fails this future, not the program)."""
    try:
        return loads(payload)
    except BaseException as exc:  # noqa: BLE001
        from ..errors import TaskUnpicklingError

        raise TaskUnpicklingError(
            f"the task's result could not be unpickled here: {type(exc).__name__}: {exc}"
        ) from exc
