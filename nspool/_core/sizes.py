"""Sizes in bytes as users write them (``"512M"``, ``"2G"``), and as messages print them."""

from __future__ import annotations

import os
import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(value: int | str, name: str, minimum: int = 1) -> int:
    """Bytes from an int or a string: ``"512M"``, ``"2G"``, ``"1.5g"``, ``"64MiB"``, ``"4096"``
    (K/M/G/T/P are binary multiples: 1K = 1024). ValueError naming ``name`` for anything
    else, or for less than ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{name} must be a number of bytes or a string like '512M', not {value!r}")
    if isinstance(value, int):
        result = value
    else:
        m = _SIZE.match(value)
        if m is None:
            raise ValueError(
                f"{name} {value!r} is not a size: use bytes or a number with K, M, G or T "
                f"(binary multiples), like '512M' or '2G'"
            )
        result = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if result < minimum:
        raise ValueError(f"{name} must be at least {minimum} bytes, not {value!r}")
    return result


def physical_memory() -> int:
    """This machine's memory in bytes (what no single message can usefully exceed)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # pragma: no cover - every Linux has both
        return 1 << 40


def max_result_size(value: int | str | None) -> int:
    """A pool's ``max_result_size`` in bytes; None: the machine's memory."""
    if value is None:
        return physical_memory()
    return parse_size(value, "max_result_size", minimum=1 << 16)


def describe(n: object) -> str:
    """``n`` bytes for people: ``64 MiB (67108864 bytes)``."""
    if not isinstance(n, int):
        return "unknown"
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.4g} {unit} ({n} bytes)"
    return f"{n} bytes"
