"""The exceptions a worker itself raises about pickling, kept apart from ``errors`` so that
the launcher does not import ``concurrent.futures.process`` (and multiprocessing) at start-up.
``nspool.errors`` re-exports them."""

from __future__ import annotations

import pickle


class TaskPicklingError(pickle.PicklingError):
    """A task's function, argument, result or exception could not be pickled."""


class TaskUnpicklingError(pickle.UnpicklingError):
    """A task's result or exception could not be unpickled in the program."""


class RemoteTraceback(Exception):
    """Carries the worker-side traceback; attached as ``__cause__`` of a task's exception."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb
