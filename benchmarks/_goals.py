"""The latency goals (issue 13) as rows of the report: each goal's ratio from this run's own
tables, paired per repeat, median [min–max], and whether the median meets it.

A goal whose benchmarks did not run (``--only``) or whose rows are missing says so instead."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

from ._stats import Summary, fmt_ratio, paired_ratios
from ._suite import BenchResult, Table

FLOOR = "raw pipe + pickle (floor, no pool)"
FIRST_RESULT = "first result"


@dataclass(frozen=True)
class Check:
    """``value`` over ``baseline`` (both rows of one table, or a fixed figure), compared with
    ``limit``: at most (``at_most``) or at least."""

    bench: str
    kind: str
    row: str
    metric: str  # a pattern (fnmatch) of the metric's key
    limit: float
    at_most: bool = True
    base_bench: str | None = None  # default: the same bench
    base_kind: str | None = None  # default: the same kind
    base_row: str | None = None  # None: the row's own figure against ``limit``
    label: str = ""  # what the ratio is against, in the table

    def measure(self, results: Sequence[BenchResult]) -> tuple[Summary, str] | str:
        values = _values(results, self.bench, self.kind, self.row, self.metric)
        if isinstance(values, str):
            return values
        if self.base_row is None:
            return Summary.of(values), ""
        base = _values(
            results,
            self.base_bench or self.bench,
            self.base_kind or self.kind,
            self.base_row,
            self.metric,
        )
        if isinstance(base, str):
            return base
        # value / baseline per repeat (a rate's goal is "at least", a time's "at most")
        return Summary.of(paired_ratios(values, base, higher_is_better=False)), self.label


@dataclass(frozen=True)
class Goal:
    figure: str
    goal: str
    checks: tuple[Check, ...]


def _values(
    results: Sequence[BenchResult], bench: str, kind: str, row: str, metric: str
) -> list[float] | str:
    table: Table | None = next(
        (t for r in results if r.bench.name == bench for t in r.tables if t.kind == kind), None
    )
    if table is None:
        return f"`{bench}` did not run"
    figures = table.values.get(row, {})
    key = next((k for k in figures if fnmatch.fnmatchcase(k, metric)), None)
    if key is None:
        return f"no `{row}` figure in `{bench}`"
    return figures[key]


GOALS: tuple[Goal, ...] = (
    Goal(
        "sync round trip",
        "<= 1.3x the floor",
        (Check("roundtrip", "sync", "nspool", "round trip", 1.3, base_row=FLOOR, label="floor"),),
    ),
    *(
        Goal(
            f"async round trip, {be} (`open_pool`)",
            "<= 1.2x the floor, and below `anyio.to_process`",
            (
                Check(
                    "roundtrip",
                    "async",
                    f"nspool.open_pool ({be})",
                    "round trip",
                    1.2,
                    base_kind="sync",
                    base_row=FLOOR,
                    label="floor",
                ),
                Check(
                    "roundtrip",
                    "async",
                    f"nspool.open_pool ({be})",
                    "round trip",
                    1.0,
                    base_row=f"anyio.to_process ({be})",
                    label="anyio.to_process",
                ),
            ),
        )
        for be in ("asyncio", "trio")
    ),
    *(
        Goal(
            f"`run_sync` round trip, {be}",
            "within 10% of `open_pool`",
            (
                Check(
                    "roundtrip",
                    "async",
                    f"nspool.run_sync ({be})",
                    "round trip",
                    1.1,
                    base_row=f"nspool.open_pool ({be})",
                    label="open_pool",
                ),
            ),
        )
        for be in ("asyncio", "trio")
    ),
    Goal(
        "cold start, first pool of a program",
        "<= PPE forkserver's cold start with its server already up",
        (
            Check(
                "firstpool",
                "sync",
                "nspool",
                "first pool: first result",
                1.0,
                base_row="PPE forkserver",
                label="PPE forkserver",
            ),
        ),
    ),
    Goal(
        "cold start, another pool in the same program",
        "<= 5 ms",
        (Check("coldstart", "sync", "nspool", FIRST_RESULT, 5.0, label="ms"),),
    ),
    Goal(
        "churn, `max_tasks_per_child=1`",
        ">= 2x today's: the issue measured 455 tasks/s, so 910/s "
        "(this benchmark: about 310/s before the issue's work)",
        (Check("churn", "sync", "nspool", "300 tasks, a new worker each", 910, False, label="/s"),),
    ),
    Goal(
        "20,000 submits",
        "stay >= 3x PPE",
        (
            Check(
                "throughput",
                "sync",
                "nspool",
                "submit *",  # 20,000 (400 in --quick)
                3.0,
                False,
                base_row="PPE fork",
                label="PPE fork",
            ),
        ),
    ),
    Goal(
        "map, chunksize 100",
        "stay >= 1.5x PPE",
        (
            Check(
                "throughput",
                "sync",
                "nspool",
                "map *, chunksize 100",
                1.5,
                False,
                base_row="PPE fork",
                label="PPE fork",
            ),
        ),
    ),
)


def _cell(check: Check, got: tuple[Summary, str] | str) -> tuple[str, bool | None]:
    if isinstance(got, str):
        return f"not measured ({got})", None
    summary, label = got
    if not summary.n:
        return "no figures", None
    met = summary.median <= check.limit if check.at_most else summary.median >= check.limit
    if check.base_row is None:
        text = f"{summary.median:.3g} {check.label} [{summary.lo:.3g}–{summary.hi:.3g}]"
    else:
        text = f"{fmt_ratio(summary)} {label}"
    return text, met


def goal_lines(results: Sequence[BenchResult], goals: Sequence[Goal] = GOALS) -> list[str]:
    """The goals table: figure, goal, measured (median [min–max] per repeat), met."""
    rows = []
    met_count = 0
    for goal in goals:
        cells, verdicts = [], []
        for check in goal.checks:
            text, met = _cell(check, check.measure(results))
            cells.append(text)
            verdicts.append(met)
        if any(v is None for v in verdicts):
            verdict = "not measured"
        elif all(verdicts):
            verdict = "**met**"
            met_count += 1
        else:
            verdict = "not met"
        rows.append(f"| {goal.figure} | {goal.goal} | {'; '.join(cells)} | {verdict} |")
    return [
        "| figure | goal | measured (median [min–max] of per-repeat ratios) | |",
        "| --- | --- | --- | --- |",
        *rows,
        "",
        f"{met_count} of {len(goals)} goals met in this run.",
    ]
