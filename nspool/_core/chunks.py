"""The task that runs one chunk of ``map(..., chunksize=N)`` in a worker. A module of its own
that the launcher preloads, so that unpickling the first chunk imports nothing more."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def process_chunk(fn: Callable[..., Any], chunk: list[tuple[Any, ...]]) -> list[Any]:
    return [fn(*args) for args in chunk]
