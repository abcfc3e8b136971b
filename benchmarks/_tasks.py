"""Functions the benchmarks run in workers (importable by reference from every pool)."""

from __future__ import annotations

import os


def noop(x: object = None) -> object:
    return x


def echo(data: bytes) -> bytes:
    return data


def crash() -> None:
    os._exit(3)
