"""Timing and statistics shared by every benchmark.

A benchmark produces one figure per repeat (say, the median µs per call of that repeat); tables
show the median of those figures with their min–max. Ratios are paired: repeat ``i`` of one
pool is divided by repeat ``i`` of the baseline, both from the same run (peers are interleaved
inside every repeat), and the median of those ratios is shown with its min–max.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

now_ns = time.perf_counter_ns
NAN = float("nan")


@contextmanager
def no_gc() -> Iterator[None]:
    """Keep the cyclic GC out of a timed section (as ``timeit`` does), after a full collection
    so that garbage left by an earlier measurement is not carried into this one."""
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def median(values: Sequence[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return statistics.median(vals) if vals else NAN


@dataclass(frozen=True)
class Summary:
    median: float
    lo: float
    hi: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        vals = [v for v in values if not math.isnan(v)]
        if not vals:
            return cls(NAN, NAN, NAN, 0)
        return cls(statistics.median(vals), min(vals), max(vals), len(vals))


def paired_ratios(
    values: Sequence[float], baseline: Sequence[float], higher_is_better: bool
) -> list[float]:
    """Per-repeat "baseline is this many times better" factors (> 1: baseline wins)."""
    out = []
    for v, b in zip(values, baseline, strict=False):
        if math.isnan(v) or math.isnan(b) or v <= 0 or b <= 0:
            continue
        out.append(b / v if higher_is_better else v / b)
    return out


def fmt_num(x: float) -> str:
    """Three significant figures, thousands separated; '–' for missing."""
    if math.isnan(x):
        return "–"
    if x == 0:
        return "0"
    digits = max(0, 2 - int(math.floor(math.log10(abs(x)))))
    return f"{x:,.{digits}f}"


def fmt_summary(s: Summary) -> str:
    if s.n == 0:
        return "–"
    if s.n == 1:
        return fmt_num(s.median)
    return f"{fmt_num(s.median)} [{fmt_num(s.lo)}–{fmt_num(s.hi)}]"


def fmt_ratio(s: Summary) -> str:
    if s.n == 0:
        return "–"
    if s.n == 1:
        return f"{s.median:.2f}×"
    return f"{s.median:.2f}× [{s.lo:.2f}–{s.hi:.2f}]"
