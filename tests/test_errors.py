"""The public exceptions as a user meets them: what they are instances of, how they print, and
that they survive pickling (they cross processes: Dask, a task's result). How the type checker
sees them is tests/test_typing.py's business."""

from __future__ import annotations

import concurrent.futures
import pickle

from nspool import TaskTimeoutError


def test_task_timeout_error_is_every_timeout_error_an_except_may_name() -> None:
    """On 3.10 ``concurrent.futures.TimeoutError`` is a class of its own; from 3.11 it is the
    builtin. Either way both ``except`` clauses catch a deadline."""
    err = TaskTimeoutError("the task ran longer than its 1 s deadline")
    assert isinstance(err, TimeoutError)
    assert isinstance(err, concurrent.futures.TimeoutError)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is TaskTimeoutError and str(back) == str(err)
